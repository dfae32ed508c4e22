"""Request and response bodies, one model per direction (…Create in, …Public out)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from lorafold.jobs import JobStatus, JobType
from lorafold.merge import METHODS, RULES, MergeRequest
from lorafold.merge.options import (
    DEFAULT_BETA,
    DEFAULT_DENSITY,
    DEFAULT_DROP,
    DEFAULT_METHOD,
    DEFAULT_MIN_ENERGY,
    DEFAULT_RULE,
    DEFAULT_SUBSPACE,
)
from lorafold.service.tuned_merges import TuneSpec
from lorafold.service.unlearning import UnlearnSpec
from lorafold.tune.options import DEFAULT_BUDGET, TUNE_PARAMS

ADAPTER_EXAMPLE: dict[str, Any] = {
    "id": "ad_6f1c2a9e4b7d4e0f9a8b7c6d5e4f3a2b", "name": "support-tickets-v3",
    "source": "upload", "parents": [], "metadata": {"team": "support"}, "job_id": None,
    "base_model": "meta-llama/Llama-2-7b-hf", "r": 16, "alpha": 32.0,
    "target_modules": ["q_proj", "v_proj"], "module_count": 64, "dtype": "float16",
    "size_bytes": 16_794_200, "sha256": "9f2c…", "archive_size_bytes": 16_803_840,
    "created_at": "2026-11-22T09:15:02.120391+00:00",
}
# A job as a submit (POST /v1/merges, /v1/unlearning) answers it: queued, not yet started.
JOB_EXAMPLE: dict[str, Any] = {
    "id": "job_0a1b2c3d4e5f47a8b9c0d1e2f3a4b5c6", "type": "merge", "status": "queued",
    "created_at": "2026-11-22T09:16:00.000000Z", "started_at": None,
    "finished_at": None, "progress": {"stage": "queued", "fraction": 0.0}, "result": None,
    "error": None, "attempts": 0, "cancel_requested": False,
    "params": {"name": "support+billing", "inputs": [
        {"id": "ad_6f1c…", "weight": 1.0, "sha256": "9f2c…"}]},
}


class Problem(BaseModel):
    """RFC 9457 problem details; `code` is stable and machine-readable."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "type": "urn:lorafold:problem:adapter_not_found", "title": "Not Found", "status": 404,
        "detail": "adapter 'ad_0123' not found", "code": "adapter_not_found"}]})

    type: str
    title: str
    status: int
    detail: str
    code: str
    errors: list[dict[str, Any]] | None = Field(
        default=None, description="request validation errors (code request_validation_failed)")


class AdapterPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [ADAPTER_EXAMPLE]})

    id: str
    name: str
    source: Literal["upload", "merge", "unlearn"]
    parents: list[str] = Field(description="ids of the adapters it was made from")
    metadata: dict[str, Any] = Field(default_factory=dict)
    job_id: str | None = Field(default=None, description="the job that produced it (merges)")
    base_model: str | None
    r: int
    alpha: float
    target_modules: list[str] | str | None
    module_count: int
    dtype: str
    size_bytes: int = Field(description="size of adapter_model.safetensors")
    sha256: str = Field(description="sha256 of adapter_model.safetensors")
    archive_size_bytes: int = Field(description="size of the download (.tar)")
    created_at: str


class AdapterImport(BaseModel):
    """POST /v1/adapters as JSON: the service fetches the adapter (docs/service.md, "Import
    by reference") and stores it as an upload."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"source": "s3://models/support-v3.tar.gz", "name": "support-v3"},
        {"source": "https://models.example.com/billing.zip"}]})

    source: str = Field(min_length=1, max_length=4096,
                        description="https://host/path (a .zip, .tar.gz or .tar of the "
                                    "adapter), s3://bucket/key (an archive), "
                                    "s3://bucket/prefix/ (the PEFT files below it), or "
                                    "hf://org/name[@revision]")
    name: str | None = Field(default=None, min_length=1, max_length=200,
                             description="default: the source's last path segment")
    metadata: dict[str, Any] = Field(default_factory=dict)


class PreflightCheckPublic(BaseModel):
    rule: str
    ok: bool
    message: str
    severity: Literal["error", "warning"]
    fix: str | None = None


class PreflightPublic(BaseModel):
    """Whether a serving engine will load the adapter: one verdict per engine rule
    (docs/serving.md). `ok` is false when an error-level rule fails."""

    adapter_id: str
    target: str
    ok: bool
    checks: list[PreflightCheckPublic]


class AdaptersPublic(BaseModel):
    data: list[AdapterPublic]
    count: int


class MergeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1, max_length=128)
    weight: float = Field(default=1.0, description="w_t; may be negative")

    @field_validator("weight")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError("weight must be a finite number")
        return value


class TuneCreate(BaseModel):
    """`tune` of a merge: choose the named parameters on validation data (docs/tuning.md)."""

    model_config = ConfigDict(extra="forbid")

    datasets: list[str] = Field(min_length=1, max_length=64,
                                description="validation data set ids (POST /v1/datasets): "
                                            "one for all inputs or one per input")
    base_model: str | None = Field(default=None, min_length=1, max_length=256,
                                   description="default: the inputs' base model")
    params: list[str] | None = Field(
        default=None, max_length=len(TUNE_PARAMS),
        description=f"from {', '.join(TUNE_PARAMS)} (default lambda, plus beta for ctm and "
                    "density/drop for the rules that take them)")
    budget: int | None = Field(default=None, description="validation passes: candidates "
                                                         f"and weight steps (default "
                                                         f"{DEFAULT_BUDGET}, bounded per "
                                                         "tenant)")
    time_limit_s: float | None = Field(default=None, allow_inf_nan=False,
                                       description="stop the search after this long")

    def to_spec(self) -> TuneSpec:
        return TuneSpec(datasets=tuple(self.datasets), base_model=self.base_model,
                        params=None if self.params is None else tuple(self.params),
                        budget=self.budget, time_limit_s=self.time_limit_s)


class MergeCreate(BaseModel):
    """A merge request. `rank` is required by every method but `cat`; an option left out
    (or null) takes its default."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "adapters": [{"id": "ad_6f1c2a9e4b7d4e0f9a8b7c6d5e4f3a2b", "weight": 1.0},
                     {"id": "ad_1d2e3f4a5b6c4d7e8f9a0b1c2d3e4f5a", "weight": 0.5}],
        "method": "ctm", "rule": "ties", "rank": 16, "density": 0.25, "beta": 0.25,
        "name": "support+billing"}]})

    adapters: list[MergeInput] = Field(min_length=1, max_length=64)
    method: str = Field(default=DEFAULT_METHOD,
                        description=f"one of {', '.join(sorted(METHODS))}")
    rule: str | None = Field(default=None, description=f"one of {', '.join(sorted(RULES))} "
                                                       f"(default {DEFAULT_RULE}; cat: ta)")
    rank: int | Literal["auto"] | None = Field(
        default=None, description='output rank r, or "auto" (ctm): the smallest rank at '
                                  "which every input keeps >= min_energy of its energy in "
                                  "every module")

    @field_validator("rank", mode="before")
    @classmethod
    def _rank_or_auto(cls, value: Any) -> Any:
        # One error for the field (not one per member of the union), and no bool or float.
        if value is None or value == "auto" or (isinstance(value, int)
                                                and not isinstance(value, bool)):
            return value
        raise ValueError('rank must be an integer or "auto"')
    min_energy: float | None = Field(
        default=None, gt=0, le=1, allow_inf_nan=False,
        description=f'rank "auto": the share each input keeps (default {DEFAULT_MIN_ENERGY})')
    density: float | None = Field(
        default=None, allow_inf_nan=False,
        description=f"ties, dare_ties: fraction of entries the trim keeps, in (0, 1] "
                    f"(default {DEFAULT_DENSITY})")
    drop: float | None = Field(
        default=None, allow_inf_nan=False,
        description=f"dare, dare_ties: drop rate in [0, 1) (default {DEFAULT_DROP})")
    scale: float = Field(default=1.0, allow_inf_nan=False,
                         description="global scale λ on the merged delta")
    seed: int = Field(default=0, description="seed of dare's random drop")
    beta: float | None = Field(
        default=None, allow_inf_nan=False,
        description="ctm: β ∈ [0, 1] rescaling of the inputs before the shared subspaces are "
                    "chosen: 1 = as they are, 0 = all at the mean norm "
                    f"(default {DEFAULT_BETA})")
    subspace: Literal["hooi", "hosvd"] | None = Field(
        default=None, description="ctm: how the shared subspaces are found: hooi (HOSVD "
                                  f"start, then HOOI sweeps) or hosvd (default "
                                  f"{DEFAULT_SUBSPACE})")
    force: bool = Field(default=False, description="merge adapters of different base models")
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    target: Literal["peft", "vllm", "lorax", "tgi"] | None = Field(
        default=None, description="make the output load in this serving engine (explicit "
                                  "target modules, rank within its limits, every module type "
                                  "in every layer for lorax/tgi, float16 unless dtype); the "
                                  "result's report carries its preflight")
    base_model_name: str | None = Field(default=None, min_length=1, max_length=256,
                                        description="the output's base_model_name_or_path")
    name: str | None = Field(default=None, max_length=200)
    webhook_url: str | None = Field(
        default=None, max_length=2048,
        description="POSTed a signed Standard Webhooks event when the job ends (default: "
                    "the tenant's)")
    tune: TuneCreate | None = Field(default=None, description="make this a tuned merge")

    def to_request(self) -> MergeRequest:
        auto = self.rank == "auto" or (self.rank is None and self.min_energy is not None)
        energy = (self.min_energy or DEFAULT_MIN_ENERGY) if auto else self.min_energy
        rank = self.rank if isinstance(self.rank, int) else None
        return MergeRequest(method=self.method, rule=self.rule, rank=rank, min_energy=energy,
                            weights=tuple(a.weight for a in self.adapters),
                            density=self.density, drop=self.drop, scale=self.scale,
                            seed=self.seed, beta=self.beta, subspace=self.subspace,
                            force=self.force, dtype=self.dtype, target=self.target,
                            base_model_name=self.base_model_name)


class PlanCreate(BaseModel):
    """A consolidation plan: which of these adapters to merge together, into how many
    groups, at what rank (docs/planning.md). The plan runs as a job; its result holds the
    groups, ranks, per-member energies and the parameters before and after."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "adapters": ["ad_6f1c2a9e4b7d4e0f9a8b7c6d5e4f3a2b", "ad_1d2e3f4a5b6c4d7e8f9a0b1c2d3e4f5a",
                     "ad_9a8b7c6d5e4f4a3b2c1d0e9f8a7b6c5d"],
        "rank": "auto", "min_energy": 0.9}]})

    adapters: list[str] = Field(min_length=2, max_length=64)
    rank: int | Literal["auto"] = Field(
        default="auto", description='"auto": each group at its smallest rank keeping '
                                    "min_energy for every member; or one rank for all")
    min_energy: float = Field(default=DEFAULT_MIN_ENERGY, gt=0, le=1, allow_inf_nan=False)
    max_rank: int | None = Field(default=None, ge=1, description="rank auto: the cap")
    max_groups: int | None = Field(default=None, ge=1,
                                   description="stop once at most this many adapters remain")
    min_similarity: float = Field(default=0.0, ge=-1, le=1, allow_inf_nan=False,
                                  description="the least mean cosine a group may have")
    force: bool = Field(default=False, description="plan adapters of different base models")
    webhook_url: str | None = Field(
        default=None, max_length=2048,
        description="POSTed a signed Standard Webhooks event when the job ends (default: "
                    "the tenant's)")

    @field_validator("rank", mode="before")
    @classmethod
    def _rank_or_auto(cls, value: Any) -> Any:
        return MergeCreate._rank_or_auto(value)

    def options(self) -> dict[str, Any]:
        return {"rank": self.rank if isinstance(self.rank, int) else None,
                "min_energy": self.min_energy, "max_rank": self.max_rank,
                "max_groups": self.max_groups, "min_similarity": self.min_similarity,
                "force": self.force}


class DatasetPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "id": "ds_3b9f0c1d2e4a4b5c8d7e6f5a4b3c2d1e", "name": "tenant-42-forget",
        "examples": 120, "prompt_completion_examples": 120, "text_examples": 0,
        "size_bytes": 18_230, "sha256": "5d1e…", "fingerprint": "a07c…",
        "created_at": "2026-11-22T09:20:11.004211+00:00"}]})

    id: str
    name: str
    examples: int
    prompt_completion_examples: int
    text_examples: int
    size_bytes: int
    sha256: str = Field(description="sha256 of the uploaded file")
    fingerprint: str = Field(description="sha256 of the parsed records (kept in lineage)")
    created_at: str


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    count: int


class UnlearningCreate(BaseModel):
    """An unlearning request. Which fields apply depends on `method`; a field that does not
    apply is refused (422 unexpected_parameter)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"method": "remove", "adapter": "ad_6f1c2a9e4b7d4e0f9a8b7c6d5e4f3a2b",
         "remove": ["ad_1d2e3f4a5b6c4d7e8f9a0b1c2d3e4f5a"], "name": "without tenant 42"},
        {"method": "negate", "adapter": "ad_6f1c2a9e4b7d4e0f9a8b7c6d5e4f3a2b",
         "forget_adapter": "ad_1d2e3f4a5b6c4d7e8f9a0b1c2d3e4f5a", "strength": 1.0},
        {"method": "npo", "adapter": "ad_6f1c2a9e4b7d4e0f9a8b7c6d5e4f3a2b",
         "forget_dataset": "ds_3b9f0c1d2e4a4b5c8d7e6f5a4b3c2d1e",
         "holdout_dataset": "ds_9a8b7c6d5e4f4a3b2c1d0e9f8a7b6c5d",
         "hyperparams": {"max_steps": 50}}]})

    method: str = Field(description="remove, negate, or a data method: gradient_ascent, "
                                    "grad_diff, ihl, npo, simnpo or feature_alignment")
    adapter: str = Field(min_length=1, max_length=128, description="the adapter to change")
    remove: list[str] = Field(default_factory=list, max_length=64,
                              description="remove: constituent adapter ids to drop")
    forget_adapter: str | None = Field(default=None, max_length=128,
                                       description="negate: the adapter to subtract")
    strength: float = Field(default=1.0, allow_inf_nan=False,
                            description="negate: λ in adapter − λ·forget")
    rank: int | None = Field(default=None, description="negate: output rank (default: the "
                                                       "adapter's r)")
    base_model: str | None = Field(default=None, max_length=256,
                                   description="data methods: default the adapter's base model")
    forget_dataset: str | None = Field(default=None, max_length=128)
    retain_dataset: str | None = Field(default=None, max_length=128)
    holdout_dataset: str | None = Field(
        default=None, max_length=128,
        description="never-seen examples: enables the gold-free stopping rule and the "
                    "membership-inference AUC")
    hyperparams: dict[str, Any] | None = Field(default=None,
                                               description="overrides of the method's "
                                                           "defaults (lr, max_steps, ...)")
    name: str | None = Field(default=None, max_length=200)
    webhook_url: str | None = Field(
        default=None, max_length=2048,
        description="POSTed a signed Standard Webhooks event when the job ends (default: "
                    "the tenant's)")

    @field_validator("hyperparams")
    @classmethod
    def _finite_hyperparams(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        def finite(item: Any) -> bool:
            if isinstance(item, float):
                return math.isfinite(item)
            if isinstance(item, list):
                return all(finite(v) for v in item)
            if isinstance(item, dict):
                return all(finite(v) for v in item.values())
            return True

        if value is not None and not finite(value):
            raise ValueError("hyperparameters must be finite numbers")
        return value

    def to_spec(self) -> UnlearnSpec:
        return UnlearnSpec(method=self.method, adapter=self.adapter, remove=tuple(self.remove),
                           forget_adapter=self.forget_adapter, strength=self.strength,
                           rank=self.rank, base_model=self.base_model,
                           forget_dataset=self.forget_dataset,
                           retain_dataset=self.retain_dataset,
                           holdout_dataset=self.holdout_dataset, hyperparams=self.hyperparams)


class ProgressPublic(BaseModel):
    stage: str
    fraction: float


class JobErrorPublic(BaseModel):
    code: str
    message: str
    retryable: bool


class JobPublic(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [JOB_EXAMPLE]})

    id: str
    type: JobType
    status: JobStatus
    created_at: str
    started_at: str | None
    finished_at: str | None
    progress: ProgressPublic
    result: dict[str, Any] | None = Field(
        default=None, description="on success: {adapter_id, ...}: a merge's report, an "
                                  "unlearning job's metrics")
    error: JobErrorPublic | None
    attempts: int
    cancel_requested: bool
    params: dict[str, Any]


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int
    next_cursor: str | None = Field(default=None,
                                    description="pass as `cursor` for the next page")


class JobEventPublic(BaseModel):
    model_config = ConfigDict(extra="allow")

    seq: int
    ts: str
    type: str


class JobEventsPublic(BaseModel):
    data: list[JobEventPublic]
    count: int
    last_seq: int = Field(description="pass as `since` to get only newer events")


class HealthPublic(BaseModel):
    status: Literal["ok"] = "ok"


class ReadyPublic(BaseModel):
    status: Literal["ready", "not_ready"]
    checks: dict[str, str]
