"""Readiness: can this process reach Redis and the object storage right now?"""

from __future__ import annotations

import logging

from redis.exceptions import RedisError

from lorafold.errors import LorafoldError
from lorafold.service.context import ServiceContext

logger = logging.getLogger(__name__)


def readiness(*, ctx: ServiceContext) -> dict[str, str]:
    """Each dependency → "ok" or a short reason it is not."""
    checks: dict[str, str] = {}
    try:
        ctx.redis.ping()
        checks["redis"] = "ok"
    except RedisError as e:
        logger.warning("readiness: redis unreachable: %s", e)
        checks["redis"] = f"unreachable: {type(e).__name__}"
    try:
        ctx.storage.ping()
        checks["storage"] = "ok"
    except LorafoldError as e:
        logger.warning("readiness: storage unreachable: %s", e)
        checks["storage"] = f"unreachable: {e.code}"
    return checks
