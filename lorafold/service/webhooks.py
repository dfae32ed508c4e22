"""Webhooks: tell a pipeline when its job ends, signed per the Standard Webhooks spec.

A job may name a `webhook_url` (else the tenant's default, `LORAFOLD_WEBHOOK_URLS`); when
it reaches a final state the worker POSTs `{"type": "job.<status>", "timestamp", "data":
<the job>}` there with the spec's `webhook-id`, `webhook-timestamp` and `webhook-signature`
headers (HMAC-SHA256 with `LORAFOLD_WEBHOOK_SECRET`, via the `standardwebhooks` package;
receivers verify with any Standard Webhooks library). A delivery that fails (no answer,
or a status that is not 2xx) is retried with exponential backoff, `webhook_retries`
times; every try is a line in the job's events. The webhook-id is the same on every try,
so a receiver can drop duplicates.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from urllib.parse import urlsplit

import httpx

from lorafold.errors import InvalidRequest
from lorafold.jobs import JobRecord
from lorafold.settings import Settings

logger = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
BACKOFF_S = 0.5  # first retry after this, then doubling


def check_webhook_url(url: str) -> str:
    parts = urlsplit(url)
    if len(url) > MAX_URL_LENGTH or parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"webhook_url must be an http(s) URL of at most {MAX_URL_LENGTH} "
                             "characters", code="invalid_webhook_url")
    return url


def resolve_webhook(settings: Settings, tenant: str, url: str | None) -> str | None:
    """The URL a job of `tenant` reports to: the request's, else the tenant's default.
    Refused when there is one but no secret to sign with."""
    url = url if url is not None else settings.webhook_urls.get(tenant)
    if url is None:
        return None
    if settings.webhook_secret is None:
        raise InvalidRequest("webhooks are not configured on this service (no "
                             "LORAFOLD_WEBHOOK_SECRET)", code="webhooks_not_configured")
    return check_webhook_url(url)


def event_body(record: JobRecord) -> str:
    job = record.to_dict()
    job["params"] = {k: v for k, v in job.get("params", {}).items() if k != "webhook_url"}
    return json.dumps({"type": f"job.{record.status.value}",
                       "timestamp": datetime.now(timezone.utc).isoformat(), "data": job},
                      sort_keys=True, default=str)


def deliver(settings: Settings, record: JobRecord,
            log: Callable[[str], object] | None = None,
            sleep: Callable[[float], object] = time.sleep) -> bool:
    """POST the job's final state to its webhook, retrying; True once a 2xx answered.

    `log(message)` records each try (the job's events); never raises.
    """
    url = record.params.get("webhook_url") if isinstance(record.params, dict) else None
    if not url or settings.webhook_secret is None:
        return False
    from standardwebhooks.webhooks import Webhook

    signer = Webhook(settings.webhook_secret.get_secret_value())
    message_id = f"msg_{record.id}_{record.status.value}"
    body = event_body(record)
    tries = settings.webhook_retries + 1
    for attempt in range(1, tries + 1):
        now = datetime.now(timezone.utc)
        headers = {"content-type": "application/json", "webhook-id": message_id,
                   "webhook-timestamp": str(int(now.timestamp())),
                   "webhook-signature": signer.sign(message_id, now, body)}
        try:
            response = httpx.post(url, content=body, headers=headers,
                                  timeout=settings.webhook_timeout_s)
            outcome, ok = f"HTTP {response.status_code}", response.is_success
        except httpx.HTTPError as e:
            outcome, ok = f"{type(e).__name__}: {e}", False
        _note(log, f"webhook try {attempt}/{tries} to {url}: {outcome}")
        if ok:
            return True
        if attempt < tries:
            sleep(BACKOFF_S * 2 ** (attempt - 1))
    logger.warning("job %s: webhook to %s failed after %d tries", record.id, url, tries)
    return False


def _note(log: Callable[[str], object] | None, message: str) -> None:
    if log is None:
        return
    try:
        log(message)
    except Exception:  # the record may have expired meanwhile: the delivery still counts
        logger.warning("could not record: %s", message, exc_info=True)
