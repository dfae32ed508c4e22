"""The one settings object of the service: API, workers and `lorafold up` share it.

Built once per process (`Settings()` reads `LORAFOLD_*` environment variables) and handed
down explicitly; nothing else in lorafold reads the environment. Validators refuse values
that would be unsafe or would make the job machinery misbehave (a job declared abandoned
while its worker is still heartbeating, short API keys in production, a world-readable
key file), so a bad deployment fails at start, not at 3 a.m.

Secrets (API keys, the S3 secret key, the webhook secret) are `SecretStr`: they never
appear in a repr, a log line or a traceback, and are unwrapped only where they are used.
Only the API authenticates, so only the API needs keys: `require_api_keys()` is its
start-up check (at least one key in production); workers start without them.

`ClientSettings` is the client side (`lorafold client`, `lorafold.client`): the URL and the
API key, from `LORAFOLD_URL` / `LORAFOLD_API_KEY`; with no URL given, that of a `lorafold up`
running in this directory (its `.lorafold/stack.json`), else `http://127.0.0.1:8000`.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from lorafold.storage.layout import is_valid_name

Environment = Literal["development", "test", "production"]

MIB = 1024 * 1024
GIB = 1024 * MIB
MIN_PRODUCTION_KEY_LENGTH = 24
PLACEHOLDER_KEYS = frozenset({"changeme", "change-me", "secret", "dev", "dev-key", "test",
                              "key1", "apikey", "api-key", "password"})
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "minioadmin",
                                 "lorafold-dev-secret"})


def key_digest(key: str) -> str:
    """API keys are looked up by their sha256, never compared as plain strings."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _read_keys_file(path: Path) -> dict[str, str]:
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise ValueError(f"api_keys_file {path}: {e.strerror}") from e
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"api_keys_file {path} is readable by group or others "
                         f"(mode {stat.S_IMODE(mode):o}); chmod 600 it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"api_keys_file {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in data.items()):
        raise ValueError(f"api_keys_file {path} must hold a JSON object {{key: tenant}}")
    return data


class Settings(BaseSettings):
    """Everything configurable, with safe defaults for a laptop (`environment=development`)."""

    model_config = SettingsConfigDict(env_prefix="LORAFOLD_", extra="ignore", frozen=True)

    environment: Environment = "development"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    # -- auth: Bearer API key -> tenant -----------------------------------------------
    api_keys: dict[SecretStr, str] = Field(default_factory=dict, repr=False,
                                           description="JSON object {api_key: tenant} "
                                                       "(the API's only)")
    api_keys_file: Path | None = Field(default=None,
                                       description="JSON file {api_key: tenant}, mode 600")

    # -- backends -----------------------------------------------------------------------
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_max_connections: int = Field(default=64, ge=4, le=10_000)
    storage_url: str = ".lorafold/storage"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key: str | None = None
    s3_secret_key: SecretStr | None = None
    s3_path_style: bool = True
    s3_public_endpoint_url: str | None = Field(
        default=None, description="S3 endpoint clients reach, for presigned download URLs "
                                  "(default: s3_endpoint_url)")
    presign_expires_s: int = Field(default=300, ge=1, le=7 * 24 * 3600,
                                   description="life of a presigned download URL: it keeps "
                                               "working this long, even after a delete")

    # -- uploads ------------------------------------------------------------------------
    max_upload_bytes: int = Field(default=2 * GIB, ge=1024)
    upload_drain_bytes: int = Field(default=256 * MIB, ge=0,
                                    description="bytes past the limit read and dropped so "
                                                "the client sees the 413 instead of a reset")
    validation_processes: int = Field(default=1, ge=0, le=64,
                                      description="API processes that validate uploads "
                                                  "(0: validate inside the API process)")
    spool_dir: Path | None = Field(default=None,
                                   description="temporary files of uploads and jobs")

    # -- import by reference: POST /v1/adapters {"source": ...} (docs/service.md) ---------
    import_allowed_hosts: list[str] = Field(
        default_factory=list,
        description="hosts (name, name:port) and IP networks (CIDR) that imports may reach "
                    "over http or at non-public addresses (JSON list)")
    import_public_https: bool = Field(default=True,
                                      description="import over https from any host at a "
                                                  "public address")
    import_s3_buckets: list[str] = Field(
        default_factory=list,
        description="buckets (or bucket/prefix) s3:// imports may read, with the service's "
                    "S3 endpoint and credentials (JSON list)")
    import_hub: bool = Field(default=False, description="allow hf://org/name@rev imports "
                                                        "(needs the Hugging Face Hub)")
    import_timeout_s: float = Field(default=300.0, gt=0, le=24 * 3600,
                                    description="the whole fetch of one import")

    # -- unlearning: data sets and base models -------------------------------------------
    max_dataset_bytes: int = Field(default=64 * MIB, ge=1024,
                                   description="largest JSONL data set accepted")
    model_dirs: list[Path] = Field(
        default_factory=list,
        description="directories holding base models as <dir>/<org>/<name> (JSON list)")
    use_hf_cache: bool = Field(default=True,
                               description="also look for base models in the local "
                                           "Hugging Face cache")
    hf_cache_dir: Path | None = Field(default=None,
                                      description="Hugging Face hub cache (default: HF's)")
    allow_model_download: bool = Field(default=False,
                                       description="download a base model found nowhere "
                                                   "locally (off: jobs never fetch models)")

    # -- tuned merges (docs/tuning.md) ----------------------------------------------------
    max_tune_budget: int = Field(default=64, ge=1,
                                 description="most validation passes a tuned merge may ask for")
    tenant_tune_budgets: dict[str, int] = Field(
        default_factory=dict, description="JSON object {tenant: its own bound on a tuned "
                                          "merge's budget}, overriding max_tune_budget")
    max_tune_time_s: float = Field(default=1800.0, gt=0,
                                   description="longest search a tuned merge may ask for")

    # -- quotas per tenant and bounds on work (0: no quota) -------------------------------
    tenant_max_stored_bytes: int = Field(default=100 * GIB, ge=0,
                                         description="bytes of adapters and data sets one "
                                                     "tenant may store (413 past it)")
    tenant_max_active_jobs: int = Field(default=16, ge=0,
                                        description="queued + running jobs per tenant (429 "
                                                    "past it)")
    max_dataset_examples: int = Field(default=100_000, ge=1,
                                      description="examples in one data set (422 past it)")
    max_rank: int = Field(default=1024, ge=1,
                          description="largest output rank a merge, plan or negate may ask")
    max_unlearn_steps: int = Field(default=10_000, ge=1,
                                   description="largest max_steps (and relearn_probe_steps) "
                                               "of a data-driven unlearning job")
    storage_sweep_grace_s: int = Field(default=24 * 3600, ge=60,
                                       description="age past which a storage sweep collects "
                                                   "unfinished uploads and stale references")

    # -- jobs ---------------------------------------------------------------------------
    queue_prefix: str = Field(default="lorafold", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    merge_timeout_s: int = Field(default=3600, ge=10)
    unlearn_timeout_s: int = Field(default=4 * 3600, ge=10)
    plan_timeout_s: int = Field(default=3600, ge=10)
    job_retries: int = Field(default=2, ge=1, le=10,
                             description="re-runs of a job whose worker died")
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=60)
    webhook_secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks secret (whsec_<base64>) that signs "
                                  "job webhooks; without it, webhooks are refused")
    webhook_urls: dict[str, str] = Field(default_factory=dict,
                                         description="JSON object {tenant: default webhook "
                                                     "URL of its jobs}")
    webhook_retries: int = Field(default=3, ge=0, le=10)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    job_retention_s: int = Field(default=30 * 24 * 3600, ge=0,
                                 description="finished job records and their events expire "
                                             "this long after the job ended (0: kept forever)")

    # -- workers ------------------------------------------------------------------------
    workers: int = Field(default=1, ge=1, le=256,
                         description="worker processes when no GPU is visible")
    gpus: str = Field(default="auto",
                      description="'auto', 'none' or a list of GPU indices '0,1'")
    worker_device: Literal["auto", "cpu", "cuda"] = "auto"
    worker_job_types: list[Literal["merge", "unlearn", "plan"]] | None = Field(
        default=None, min_length=1,
        description="job types this host's workers take, first = highest priority (JSON "
                    "list; default: every type); docs/deploy.md")
    worker_threads: int | None = Field(default=None, ge=1,
                                       description="torch threads per CPU worker")
    job_monitoring_interval_s: int = Field(default=10, ge=1,
                                           description="worker heartbeat period")
    abandoned_after_s: int = Field(default=60, ge=2,
                                   description="a job whose worker missed its heartbeat for "
                                               "this long is retried by another worker")
    maintenance_interval_s: int = Field(default=60, ge=1)
    worker_ttl_s: int = Field(default=120, ge=20)
    # The GPU mask we are started with (not ours, hence no prefix); the launcher reads it
    # here so that nothing outside this module touches the environment.
    cuda_visible_devices: str | None = Field(
        default=None, validation_alias=AliasChoices("CUDA_VISIBLE_DEVICES",
                                                    "LORAFOLD_CUDA_VISIBLE_DEVICES"))

    _key_tenants: dict[str, str] = PrivateAttr(default_factory=dict)

    @field_validator("gpus")
    @classmethod
    def _check_gpus(cls, value: str) -> str:
        value = value.strip()
        if value in ("auto", "none"):
            return value
        parts = [p.strip() for p in value.split(",")]
        if not parts or not all(p.isdigit() for p in parts):
            raise ValueError("gpus must be 'auto', 'none' or comma-separated indices like '0,1'")
        return ",".join(parts)

    @field_validator("import_allowed_hosts")
    @classmethod
    def _check_import_hosts(cls, value: list[str]) -> list[str]:
        from lorafold.fetch.policy import parse_allowed_host

        for entry in value:
            parse_allowed_host(entry)  # ValueError names the bad entry
        return value

    @field_validator("redis_url")
    @classmethod
    def _check_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value

    @field_validator("storage_url")
    @classmethod
    def _check_storage_url(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("storage_url is empty")
        if "://" in value and not value.startswith(("file://", "s3://")):
            raise ValueError("storage_url must be a path, file:///path or s3://bucket[/prefix]")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        keys = {key.get_secret_value(): tenant for key, tenant in self.api_keys.items()}
        if self.api_keys_file is not None:
            keys.update(_read_keys_file(self.api_keys_file))
        production = self.environment == "production"
        for key, tenant in keys.items():
            if not is_valid_name(tenant):
                raise ValueError(f"tenant {tenant!r}: use letters, digits, '_', '-', '.' "
                                 "(at most 128, starting with a letter or digit)")
            if not key or key != key.strip() or not key.isprintable():
                raise ValueError("API keys must be non-empty printable text without spaces "
                                 "at either end")
            if production and (len(key) < MIN_PRODUCTION_KEY_LENGTH
                               or key.lower() in PLACEHOLDER_KEYS):
                raise ValueError(f"in production every API key needs at least "
                                 f"{MIN_PRODUCTION_KEY_LENGTH} random characters")
        if self.uses_s3 and production and self.s3_endpoint_url and (
                self.s3_secret_key is None
                or self.s3_secret_key.get_secret_value() in PLACEHOLDER_SECRETS):
            raise ValueError("in production the S3 secret key must be set to a real secret")
        if self.abandoned_after_s < 2 * self.job_monitoring_interval_s:
            raise ValueError("abandoned_after_s must be at least twice "
                             "job_monitoring_interval_s, or jobs of live workers would be "
                             "declared abandoned and run twice")
        self._key_tenants = {key_digest(key): tenant for key, tenant in keys.items()}
        return self

    @classmethod
    def from_env_overrides(cls, env: dict[str, str]) -> Settings:
        """Settings as a child process given `env` (LORAFOLD_* names) on top of ours sees."""
        values: dict[str, Any] = {key.removeprefix("LORAFOLD_").lower(): value
                                  for key, value in env.items() if key.startswith("LORAFOLD_")}
        return cls(**values)

    # -- derived values -----------------------------------------------------------------

    def require_api_keys(self) -> None:
        """The API's start-up check: in production it must have at least one key (workers
        and other processes that authenticate nothing do not)."""
        if self.environment == "production" and not self._key_tenants:
            raise ValueError("in production the API needs at least one API key "
                             "(LORAFOLD_API_KEYS or LORAFOLD_API_KEYS_FILE)")

    def tenant_for_digest(self, digest: str) -> str | None:
        return self._key_tenants.get(digest)

    @property
    def tenants(self) -> set[str]:
        return set(self._key_tenants.values())

    @property
    def uses_s3(self) -> bool:
        return self.storage_url.startswith("s3://")

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for `resolve_storage` (ignored for filesystem storage)."""
        return {
            "endpoint_url": self.s3_endpoint_url,
            "region": self.s3_region,
            "access_key": self.s3_access_key,
            "secret_key": (self.s3_secret_key.get_secret_value()
                           if self.s3_secret_key is not None else None),
            "path_style": self.s3_path_style,
        }

    def presign_options(self) -> dict[str, Any] | None:
        """Storage options for presigning with the public S3 endpoint, if it differs."""
        if not self.uses_s3 or not self.s3_public_endpoint_url:
            return None
        return {**self.storage_options(), "endpoint_url": self.s3_public_endpoint_url,
                "create_bucket": False}

    def tune_budget_for(self, tenant: str) -> int:
        """The bound on a tuned merge's budget for `tenant`."""
        return self.tenant_tune_budgets.get(tenant, self.max_tune_budget)

    def job_timeout_s(self, job_type: str) -> int:
        timeouts = {"merge": self.merge_timeout_s, "unlearn": self.unlearn_timeout_s,
                    "plan": self.plan_timeout_s}
        return timeouts[job_type]


LOCAL_DATA_DIR = Path(".lorafold")  # `lorafold up`'s default data dir, relative to the CWD
STACK_FILE = "stack.json"  # {"url", "pid"} of the `lorafold up` running on a data dir
DEFAULT_URL = "http://127.0.0.1:8000"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def local_stack_url(data_dir: Path = LOCAL_DATA_DIR) -> str | None:
    """The URL of the `lorafold up` running on `data_dir`, from its `stack.json`, or None
    (no record, unreadable, or left by a process that is gone)."""
    try:
        record = json.loads((data_dir / STACK_FILE).read_text(encoding="utf-8"))
        url, pid = record["url"], int(record["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return url if isinstance(url, str) and url and _pid_alive(pid) else None


class ClientSettings(BaseSettings):
    """Where `lorafold client` talks to: `LORAFOLD_URL`, `LORAFOLD_API_KEY`.

    The URL, when neither given nor in `LORAFOLD_URL`, is that of the `lorafold up` running
    in this directory (`.lorafold/stack.json`: it may serve on another port than 8000),
    else `DEFAULT_URL`. (`lorafold client --url` overrides all of these.)
    """

    model_config = SettingsConfigDict(env_prefix="LORAFOLD_", extra="ignore", frozen=True)

    url: str = DEFAULT_URL
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=60.0, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _url_of_local_stack(cls, data: Any) -> Any:
        # `data` holds the init arguments merged with the environment: no "url" in it means
        # that no URL was configured explicitly.
        if isinstance(data, dict) and data.get("url") is None:
            url = local_stack_url()
            if url is not None:
                return {**data, "url": url}
        return data
