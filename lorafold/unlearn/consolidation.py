"""feature_alignment's output: the frozen original and the trained residual as one adapter.

By default the two are concatenated (`cat`: B = [B_o B_r], A = [A_o; A_r], scales folded
in), which is exact: the written adapter *is* the model that was trained, at rank
r_original + r_residual. A smaller `output_rank` compresses the pair with Compress-then-
Merge (task arithmetic, weights 1 and 1, β = `consolidation_beta`), which is lossy: the
residual is a small correction next to the original, yet it is what does the forgetting,
so a truncation driven by singular values alone drops much of it. Then the stopping rule
measures the consolidated model (`written_view`) and the report says how much of each
input the output keeps.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lorafold.adapters import LoraAdapter, open_adapter
from lorafold.merge import MergeRequest, merge_adapters
from lorafold.unlearn.hyperparams import Hyperparams
from lorafold.unlearn.model import RESIDUAL, UnlearnModel


def exact_rank(original: LoraAdapter, residual_rank: int) -> int:
    """The rank at which original + residual is written without loss."""
    return max(m.rank for m in original.modules.values()) + residual_rank


def consolidation_request(original: LoraAdapter, hp: Hyperparams,
                          residual_rank: int) -> MergeRequest:
    """cat (exact) unless `output_rank` asks for less than the exact rank."""
    if hp.output_rank is None or hp.output_rank >= exact_rank(original, residual_rank):
        return MergeRequest(method="cat", weights=(1.0, 1.0))
    return MergeRequest(method="ctm", rule="ta", rank=hp.output_rank, weights=(1.0, 1.0),
                        beta=hp.consolidation_beta)


def consolidate(model: UnlearnModel, original: LoraAdapter, request: MergeRequest,
                out_dir: Path, *, device: torch.device) -> dict[str, Any]:
    """Write original + residual to `out_dir` as one adapter; the consolidation record."""
    with tempfile.TemporaryDirectory(prefix=".residual-", dir=out_dir.parent) as scratch:
        residual = model.save_adapter(RESIDUAL, Path(scratch) / "residual")
        result = merge_adapters([original, residual], out_dir, request, device=str(device))
    with open_adapter(result.out_dir) as written:
        out_rank = max(m.rank for m in written.modules.values())
    kept = [{**entry, "input": role} for role, entry
            in zip(("original", "residual"), result.report.get("inputs", []), strict=False)]
    return {**request.parameters(), "weights": [1.0, 1.0], "exact": request.method == "cat",
            "output_rank": out_rank, "inputs": kept}


@contextlib.contextmanager
def written_view(model: UnlearnModel, original: LoraAdapter, request: MergeRequest, *,
                 scratch_root: Path, device: torch.device) -> Iterator[None]:
    """Run as the adapter `consolidate` would write now (for a lossy output's stop checks)."""
    scratch = Path(tempfile.mkdtemp(prefix=".consolidated-", dir=scratch_root))
    try:
        consolidate(model, original, request, scratch / "adapter", device=device)
        with model.temporary_adapter(scratch / "adapter"):
            yield
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
