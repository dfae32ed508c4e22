"""Fetch an adapter's PEFT files from the Hugging Face Hub: `hf://org/name@revision`.

Off unless the settings turn it on (`import_hub`), and never used by the tests: it needs
the network to reach the Hub (huggingface_hub's own endpoint and token settings apply,
HF_ENDPOINT and HF_TOKEN). The repo's file sizes are read first and refused past the
byte budget before anything is downloaded; the files are then downloaded into a private
directory under `work_dir` and poured into the sink through the same budget. The revision
is pinned to the commit the metadata named, so both files come from one commit.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from lorafold.budget import Budget
from lorafold.errors import LorafoldError, SourceFetchFailed, SourceRefused
from lorafold.fetch.policy import Deadline, FetchPolicy
from lorafold.fetch.s3 import DIRECTORY_FILES
from lorafold.fetch.sink import Sink, pour, refuse_declared
from lorafold.fetch.sources import HubSource
from lorafold.storage.blobs import file_chunks

logger = logging.getLogger(__name__)


def _hub() -> Any:
    try:
        import huggingface_hub
    except ImportError as e:
        raise SourceRefused("hf:// imports need the huggingface_hub package, which is not "
                            "installed", code="source_hub_disabled") from e
    return huggingface_hub


def check_hub_allowed(source: HubSource, policy: FetchPolicy) -> None:
    if not policy.hub:
        raise SourceRefused(f"hf://{source.repo_id}: imports from the Hugging Face Hub are "
                            "off (set import_hub to allow them)", code="source_hub_disabled")


def fetch_hub(source: HubSource, *, policy: FetchPolicy, sink: Sink, budget: Budget,
              deadline: Deadline, work_dir: Path) -> None:
    check_hub_allowed(source, policy)
    hub = _hub()
    uri = f"hf://{source.repo_id}@{source.revision}"
    try:
        info = hub.HfApi().model_info(source.repo_id, revision=source.revision,
                                      files_metadata=True, timeout=deadline.wait_s())
        sizes = {s.rfilename: int(s.size or 0) for s in info.siblings or []}
        names = [name for name in DIRECTORY_FILES if name in sizes]
        if not names:
            raise SourceFetchFailed(f"{uri}: the repo has no adapter_config.json or "
                                    "adapter_model.safetensors at its root")
        refuse_declared(sum(sizes[n] for n in names), budget)
        with tempfile.TemporaryDirectory(prefix="hub-", dir=work_dir) as tmp:
            for name in names:
                deadline.check()
                path = hub.hf_hub_download(source.repo_id, name, revision=info.sha,
                                           local_dir=tmp, etag_timeout=deadline.wait_s())
                pour(file_chunks(Path(path)), sink.file(name), budget=budget,
                     deadline=deadline)
    except LorafoldError:  # ours: too large, timeout, refused
        raise
    except Exception as e:  # the hub client's errors (HTTP, repo/revision not found, I/O)
        raise SourceFetchFailed(f"{uri}: {type(e).__name__}: {str(e)[:200]}") from e
    logger.info("import: fetched %s (%s)", uri, info.sha)
