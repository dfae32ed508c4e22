"""The storage sweep a worker runs at start: what crashed publishes left behind.

Deletes free blobs at once (`lorafold.storage.references`); this is the backstop for a
process that died between two steps of a publish or a delete (and, where the S3 server has
no lifecycle rules, for `tmp/` objects). A failure is logged, never fatal: a worker that
cannot sweep can still work.
"""

from __future__ import annotations

import logging

from lorafold.errors import StorageError
from lorafold.service.context import ServiceContext
from lorafold.storage.references import SweepReport

logger = logging.getLogger(__name__)


def sweep_storage(ctx: ServiceContext) -> SweepReport | None:
    try:
        return ctx.adapters.blobs.references.sweep(grace_s=ctx.settings.storage_sweep_grace_s)
    except StorageError as e:
        logger.warning("storage sweep skipped: %s", e)
        return None
