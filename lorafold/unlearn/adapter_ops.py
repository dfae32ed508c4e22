"""Unlearning without data: exact removal from a merge, and negation of a forget adapter.

`remove` re-merges the constituents that remain, with the method, rule, weights, rank,
seed and options recorded in the merged adapter's lineage (lineage written before `beta`,
`subspace` and `drop` existed is read with the meaning it had then). Since every merge is
a deterministic function of its inputs and parameters (dare's random draws are keyed by
seed and module name), the result is the very merge one would get from the remaining
adapters directly: identical up to float round-off of the same operations (the tests
assert 1e-6 relative).

`negate` subtracts λ·(forget adapter) from a target and re-compresses to rank r with CtM
(weights [1, −λ]): the weight negates the delta, never both factors (−B·−A = BA).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from lorafold.adapters.lineage import read_lineage
from lorafold.adapters.reader import LoraAdapter, open_adapter
from lorafold.errors import InvalidRequest
from lorafold.merge.api import AdapterInput, MergeResult, merge_adapters
from lorafold.merge.executor import Checkpoint, Progress
from lorafold.merge.plan import MergeRequest

# Looks up a constituent from its lineage entry ({label, sha256, weight, ...}).
ResolveInput = Callable[[Mapping[str, Any]], AdapterInput]


def check_merge_lineage(lineage: Mapping[str, Any] | None) -> dict[str, Any]:
    """`lineage` if it records a lorafold merge, else InvalidRequest(no_lineage)."""
    if not isinstance(lineage, Mapping) or lineage.get("kind") != "merge" \
            or not lineage.get("inputs"):
        raise InvalidRequest("this adapter has no merge lineage (it was not produced by a "
                             "lorafold merge), so its constituents cannot be removed exactly",
                             code="no_lineage")
    return dict(lineage)


def merge_lineage_of(adapter_dir: Path) -> dict[str, Any]:
    """The lineage of a lorafold merge, or InvalidRequest(no_lineage)."""
    return check_merge_lineage(read_lineage(adapter_dir))


# Before `beta`, `subspace` and `drop` existed, lineage recorded `balance` (bool), ctm's
# subspaces were always the HOSVD ones, and dare/dare_ties used `density` as their keep
# probability (default 0.5) with no ties trim in dare_ties.
_LEGACY_DARE_DENSITY = 0.5


def _request_from(parameters: Mapping[str, Any], weights: Sequence[float]) -> MergeRequest:
    """The MergeRequest that redoes a recorded merge, from lineage of any lorafold version.

    Lineage written before `beta`/`subspace`/`drop` is read with the meaning it had then:
    ctm gets `subspace="hosvd"` and `beta` 0 (`balance: true`) or 1; dare's `density` d
    becomes `drop = 1 − d`, and dare_ties also gets `density=1` (no trim).
    """
    method, rule = parameters["method"], parameters["rule"]
    ctm = method == "ctm"
    density, drop = parameters.get("density"), parameters.get("drop")
    if "drop" not in parameters and rule in ("dare", "dare_ties"):
        keep = _LEGACY_DARE_DENSITY if density is None else float(density)
        drop, density = 1.0 - keep, (1.0 if rule == "dare_ties" else None)
    legacy_beta = (0.0 if parameters.get("balance") else 1.0) if ctm else None
    beta = parameters.get("beta", legacy_beta)
    subspace = parameters.get("subspace", "hosvd" if ctm else None)
    return MergeRequest(method=method, rule=rule, rank=parameters["rank"],
                        weights=tuple(weights), density=density, drop=drop,
                        scale=parameters.get("scale", 1.0), seed=parameters.get("seed", 0),
                        beta=beta, subspace=subspace, force=True, dtype=parameters.get("dtype"),
                        min_energy=parameters.get("min_energy"),
                        target=parameters.get("target"),
                        base_model_name=parameters.get("base_model_name"))


def remaining_inputs(lineage: Mapping[str, Any], remove: Sequence[str]) -> list[dict[str, Any]]:
    """The lineage entries left after removing `remove` (labels or sha256s)."""
    inputs = [dict(entry) for entry in lineage["inputs"]]
    known = {entry["label"] for entry in inputs} | {entry["sha256"] for entry in inputs}
    unknown = [item for item in remove if item not in known]
    if unknown:
        raise InvalidRequest(f"{', '.join(unknown)} is not a constituent of this merge "
                             f"(constituents: {', '.join(e['label'] for e in inputs)})",
                             code="not_a_constituent")
    if not remove:
        raise InvalidRequest("name at least one constituent to remove", code="nothing_to_remove")
    left = [e for e in inputs if e["label"] not in remove and e["sha256"] not in remove]
    if not left:
        raise InvalidRequest("removing every constituent leaves nothing to merge; delete the "
                             "adapter instead", code="nothing_left")
    return left


def remove_constituents(merged_dir: Path, remove: Sequence[str], out_dir: Path, *,
                        resolve: ResolveInput, device: str | None = None,
                        progress: Progress | None = None,
                        checkpoint: Checkpoint | None = None) -> MergeResult:
    """Re-merge what remains of a lorafold merge after dropping constituents.

    Every remaining constituent must still hash to the sha256 in the lineage; that is
    checked before anything is computed or written.
    """
    lineage = merge_lineage_of(merged_dir)
    left = remaining_inputs(lineage, remove)
    with contextlib.ExitStack() as stack:
        inputs: list[LoraAdapter] = []
        for entry in left:
            item = resolve(entry)
            if not isinstance(item, LoraAdapter):
                item = stack.enter_context(open_adapter(item, label=entry["label"]))
            if item.sha256 != entry["sha256"]:
                raise InvalidRequest(f"constituent {entry['label']} has changed since the merge "
                                     "(sha256 differs); exact removal is impossible",
                                     code="lineage_mismatch")
            inputs.append(item)
        request = _request_from(lineage["parameters"], [e["weight"] for e in left])
        extra = {"removed_from": {"inputs": [e["sha256"] for e in lineage["inputs"]],
                                  "removed": list(remove)}}
        return merge_adapters(inputs, out_dir, request, device=device, progress=progress,
                              checkpoint=checkpoint, lineage_extra=extra)


def negate_adapter(target: AdapterInput, forget: AdapterInput, out_dir: Path, *,
                   strength: float = 1.0, rank: int | None = None, device: str | None = None,
                   progress: Progress | None = None,
                   checkpoint: Checkpoint | None = None) -> MergeResult:
    """target − strength·forget, compressed to `rank` (default: the target's r) with CtM."""
    if not strength > 0:
        raise InvalidRequest("the negation strength λ must be positive", code="invalid_parameter")
    if rank is None:
        if isinstance(target, LoraAdapter):
            rank = target.config.r
        else:
            with open_adapter(target) as opened:
                rank = opened.config.r
    request = MergeRequest(method="ctm", rule="ta", rank=rank, weights=(1.0, -strength))
    return merge_adapters([target, forget], out_dir, request, device=device, progress=progress,
                          checkpoint=checkpoint,
                          lineage_extra={"kind": "negate", "negate": {"lambda": strength}})
