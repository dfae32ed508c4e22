"""Submitting unlearning: everything checkable before a job exists is checked here.

Three families, one endpoint (DESIGN.md section 5):
- `remove`: drop constituents from an adapter this service merged. Its lineage
  (lorafold.json) must record a merge whose inputs are this tenant's adapters, unchanged.
- `negate`: the adapter minus λ × a forget adapter, re-compressed with CtM.
- data-driven (`lorafold.unlearn.METHODS`: gradient_ascent, grad_diff, ihl, npo, simnpo,
  feature_alignment): the base model
  must be available locally, the adapter must fit its architecture (checked on the meta
  device, no weights read) and the data sets must exist.

A request refused here answers 4xx and leaves nothing behind: no job, no adapter.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorafold.adapters.safetensors_header import header_size
from lorafold.adapters.source import CONFIG_NAME, WEIGHTS_NAME
from lorafold.errors import (
    AdapterNotFound,
    IncompatibleAdapters,
    InvalidRequest,
    ModelNotFound,
    StorageError,
)
from lorafold.jobs import JobRecord, JobType, body_hash
from lorafold.service.adapters import check_name
from lorafold.service.context import ServiceContext
from lorafold.service.idempotency import idempotent
from lorafold.service.jobs import submit_job
from lorafold.settings import Settings
from lorafold.unlearn import METHODS as DATA_METHODS
from lorafold.unlearn import resolve_base_model, resolve_hyperparams
from lorafold.unlearn.adapter_ops import check_merge_lineage, remaining_inputs
from lorafold.unlearn.base_models import check_adapter_fits_model_dir
from lorafold.unlearn.objectives import get_method

ADAPTER_METHODS = ("remove", "negate")
DATASET_ROLES = ("forget", "retain", "holdout")
LINEAGE_FILE = "lorafold.json"

# The request fields each method reads; any other field given is refused, not ignored.
_DATA_FIELDS = frozenset({"base_model", "forget_dataset", "retain_dataset", "holdout_dataset",
                          "hyperparams"})
METHOD_FIELDS: Mapping[str, frozenset[str]] = {
    "remove": frozenset({"remove"}),
    "negate": frozenset({"forget_adapter", "strength", "rank"}),
    **{name: _DATA_FIELDS for name in DATA_METHODS},
}


@dataclass(frozen=True)
class UnlearnSpec:
    """An unlearning request, as the API received it."""

    method: str
    adapter: str
    remove: tuple[str, ...] = ()
    forget_adapter: str | None = None
    strength: float = 1.0
    rank: int | None = None
    base_model: str | None = None
    forget_dataset: str | None = None
    retain_dataset: str | None = None
    holdout_dataset: str | None = None
    hyperparams: Mapping[str, Any] | None = field(default=None, hash=False)

    def given(self) -> set[str]:
        """The optional fields set to something other than their default."""
        return {f.name for f in dataclasses.fields(self)
                if f.name not in ("method", "adapter") and getattr(self, f.name) != f.default}


def create_unlearning(*, ctx: ServiceContext, tenant: str, spec: UnlearnSpec,
                      name: str | None = None, idempotency_key: str | None = None,
                      webhook_url: str | None = None) -> JobRecord:
    """A queued unlearning job, or the job a previous identical request created."""
    name = check_name(name or f"{spec.method} on {spec.adapter}")
    fingerprint = body_hash({**dataclasses.asdict(spec), "name": name,
                             "webhook_url": webhook_url})
    with idempotent(ctx.idempotency, tenant=tenant, scope="unlearning", key=idempotency_key,
                    fingerprint=fingerprint) as claim:
        if claim.replay is not None:
            return ctx.jobs.get(claim.replay["job_id"], tenant=tenant)
        params = {**plan_unlearning(ctx, tenant, spec), "name": name}
        record = submit_job(ctx=ctx, tenant=tenant, job_type=JobType.UNLEARN, params=params,
                            webhook_url=webhook_url)
        claim.value = {"job_id": record.id}
        return record


def plan_unlearning(ctx: ServiceContext, tenant: str, spec: UnlearnSpec) -> dict[str, Any]:
    """The job's params, once every check that needs no tensor math has passed."""
    if spec.method not in METHOD_FIELDS:
        raise InvalidRequest(f"unknown unlearning method {spec.method!r}; supported: "
                             f"{', '.join(sorted(METHOD_FIELDS))}",
                             code="unknown_unlearning_method")
    stray = sorted(spec.given() - METHOD_FIELDS[spec.method])
    if stray:
        raise InvalidRequest(f"method {spec.method} does not take {', '.join(stray)}",
                             code="unexpected_parameter")
    manifest = ctx.adapters.get_manifest(tenant, spec.adapter)
    if spec.method == "remove":
        return _plan_remove(ctx, tenant, spec, manifest)
    if spec.method == "negate":
        return _plan_negate(ctx, tenant, spec, manifest)
    return _plan_data(ctx, tenant, spec, manifest)


def _stored_lineage(ctx: ServiceContext, manifest: Mapping[str, Any]) -> dict[str, Any] | None:
    ref = manifest.get("files", {}).get(LINEAGE_FILE)
    if ref is None:
        return None
    try:
        lineage = json.loads(ctx.adapters.blobs.read(ref))
    except ValueError:
        return None
    return lineage if isinstance(lineage, dict) else None


def _plan_remove(ctx: ServiceContext, tenant: str, spec: UnlearnSpec,
                 manifest: Mapping[str, Any]) -> dict[str, Any]:
    lineage = check_merge_lineage(_stored_lineage(ctx, manifest))
    left = remaining_inputs(lineage, list(spec.remove))
    for entry in left:
        try:
            stored = ctx.adapters.get_manifest(tenant, str(entry["label"]))
        except AdapterNotFound:
            raise InvalidRequest(f"constituent {entry['label']} is no longer stored, so the "
                                 "remaining adapters cannot be re-merged",
                                 code="constituent_missing") from None
        if stored["record"].get("sha256") != entry["sha256"]:
            raise InvalidRequest(f"constituent {entry['label']} differs from the one merged "
                                 "(sha256); exact removal is impossible",
                                 code="lineage_mismatch")
    return {"method": "remove", "adapter": spec.adapter, "remove": list(spec.remove),
            "constituents": [entry["label"] for entry in left]}


def _plan_negate(ctx: ServiceContext, tenant: str, spec: UnlearnSpec,
                 manifest: Mapping[str, Any]) -> dict[str, Any]:
    if spec.forget_adapter is None:
        raise InvalidRequest("negate needs forget_adapter: the adapter to subtract",
                             code="forget_adapter_required")
    if not (math.isfinite(spec.strength) and spec.strength > 0):
        raise InvalidRequest("strength (λ) must be a positive number", code="invalid_parameter")
    if spec.rank is not None and spec.rank < 1:
        raise InvalidRequest("rank must be at least 1", code="invalid_parameter")
    forget = ctx.adapters.get_manifest(tenant, spec.forget_adapter)
    bases = {m["record"].get("base_model") for m in (manifest, forget)} - {None, ""}
    if len(bases) > 1:
        raise IncompatibleAdapters(f"the adapters were trained on different base models "
                                   f"({', '.join(sorted(bases))})", code="base_model_mismatch")
    return {"method": "negate", "adapter": spec.adapter, "forget_adapter": spec.forget_adapter,
            "strength": spec.strength, "rank": spec.rank}


def locate_base_model(settings: Settings, name: str, *, allow_download: bool) -> Path:
    """The base model's local directory, looked up as the settings say."""
    return resolve_base_model(name, model_dirs=settings.model_dirs,
                              use_hf_cache=settings.use_hf_cache,
                              cache_dir=settings.hf_cache_dir, allow_download=allow_download)


def _plan_data(ctx: ServiceContext, tenant: str, spec: UnlearnSpec,
               manifest: Mapping[str, Any]) -> dict[str, Any]:
    method = get_method(spec.method)
    hyperparams = resolve_hyperparams(spec.method, spec.hyperparams)
    base_name = spec.base_model or manifest["record"].get("base_model")
    if not base_name:
        raise InvalidRequest("the adapter names no base model; pass base_model",
                             code="base_model_required")
    datasets = {role: getattr(spec, f"{role}_dataset") for role in DATASET_ROLES}
    if datasets["forget"] is None:
        raise InvalidRequest("forget_dataset is required: the examples to forget",
                             code="forget_dataset_required")
    if method.needs_retain and datasets["retain"] is None:
        raise InvalidRequest(f"method {spec.method} needs retain_dataset",
                             code="retain_set_required")
    for dataset_id in datasets.values():
        if dataset_id is not None:
            ctx.datasets.get_manifest(tenant, dataset_id)
    check_fits_base_model(ctx, base_name, [manifest])
    return {"method": spec.method, "adapter": spec.adapter, "base_model": base_name,
            "datasets": {role: i for role, i in datasets.items() if i is not None},
            "hyperparams": dataclasses.asdict(hyperparams)}


def check_fits_base_model(ctx: ServiceContext, base_name: str,
                          manifests: Sequence[Mapping[str, Any]]) -> None:
    """Refuse, before queuing, a base model found nowhere (unless a worker may download it:
    then the worker checks the fit) or an adapter that does not fit it."""
    try:
        model_dir = locate_base_model(ctx.settings, base_name, allow_download=False)
    except ModelNotFound:
        if not ctx.settings.allow_model_download:
            raise
        return  # the worker downloads it; the fit is checked there
    for manifest in manifests:
        _check_fit(ctx, manifest, model_dir)


def _check_fit(ctx: ServiceContext, manifest: Mapping[str, Any], model_dir: Path) -> None:
    """Refuse an adapter whose modules do not exist, or differ in shape, in the base model."""
    try:
        with tempfile.TemporaryDirectory(prefix="fit-", dir=ctx.spool_dir) as tmp:
            check_adapter_fits_model_dir(model_dir, _stage_shapes(ctx, manifest, Path(tmp)))
    except OSError as e:
        raise StorageError(f"cannot stage adapter {manifest['id']} for checking: {e}") from e


def _stage_shapes(ctx: ServiceContext, manifest: Mapping[str, Any], directory: Path) -> Path:
    """The adapter's config and the header of its weights, the tensor data left as a hole
    of the real size (a sparse file): all `open_adapter` needs to know the modules and their
    shapes, without transferring the weights themselves."""
    files, blobs = manifest["files"], ctx.adapters.blobs
    blobs.download(files[CONFIG_NAME], directory / CONFIG_NAME)
    weights = files[WEIGHTS_NAME]
    header = blobs.head(weights, header_size(blobs.head(weights, 8)))
    with (directory / WEIGHTS_NAME).open("wb") as f:
        f.write(header)
        f.truncate(weights["size"])
    return directory
