"""One exception hierarchy for the whole project.

Every error a user can cause carries a stable, machine-readable ``code`` (lower snake
case) and a message that names the offending thing. The HTTP front end maps the classes
below to status codes in exactly one place (``app/errors.py``); the CLI prints
``code: message`` and exits non-zero. Subclasses group errors by cause; the ``code`` says
which precise case it was.
"""

from __future__ import annotations

from typing import Any


class LorafoldError(Exception):
    """Base of every error lorafold raises on purpose."""

    code: str = "lorafold_error"
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "retryable": self.retryable}

    def __str__(self) -> str:
        return self.message


class InvalidAdapter(LorafoldError):
    """An adapter that cannot be accepted: bad format, bad shapes, unsupported feature."""

    code = "invalid_adapter"


class IncompatibleAdapters(LorafoldError):
    """Adapters that are each valid but cannot be combined (other base model, shapes)."""

    code = "incompatible_adapters"


class InvalidRequest(LorafoldError):
    """A request whose parameters are wrong before any tensor is touched."""

    code = "invalid_request"


class UnknownRule(InvalidRequest):
    code = "unknown_rule"


class UnknownMethod(InvalidRequest):
    code = "unknown_method"


class SourceRefused(InvalidRequest):
    """An import source lorafold will not fetch: its scheme, host, address or bucket is
    not allowed by the settings (codes: source_not_allowed, source_scheme_unsupported,
    source_hub_disabled)."""

    code = "source_not_allowed"


class SourceFetchFailed(InvalidRequest):
    """An allowed import source that could not be fetched: unreachable, an HTTP error, no
    such object, a timeout (codes: source_fetch_failed, source_timeout)."""

    code = "source_fetch_failed"
    retryable = True


class Busy(LorafoldError):
    """Too much of one kind of work in flight here right now; the same request may succeed
    shortly (429 with Retry-After)."""

    code = "busy"
    retryable = True


class InvalidDataset(LorafoldError):
    code = "invalid_dataset"


class NotFound(LorafoldError):
    code = "not_found"


class AdapterNotFound(NotFound):
    code = "adapter_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class DatasetNotFound(NotFound):
    code = "dataset_not_found"


class ModelNotFound(NotFound):
    code = "base_model_not_found"


class Conflict(LorafoldError):
    code = "conflict"


class PayloadTooLarge(LorafoldError):
    code = "payload_too_large"


class QuotaExceeded(LorafoldError):
    """A tenant's limit on concurrent work is reached (HTTP 429): retry once jobs finish."""

    code = "quota_exceeded"
    retryable = True


class StorageError(LorafoldError):
    code = "storage_error"
    retryable = True


class JobCancelled(LorafoldError):
    """Raised inside a job when its cancel flag is seen between two units of work."""

    code = "cancelled"


class NumericalError(LorafoldError):
    """A computation produced NaN/Inf; nothing is written."""

    code = "non_finite_result"
