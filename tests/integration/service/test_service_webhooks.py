"""Webhooks: a real loopback receiver verifies the Standard Webhooks signature of a job's
final-state event, sees a retry after it answered 500, and the job's events record every
try; requests that cannot be signed or name a bad URL are refused before a job exists."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from app.main import create_app
from lorafold.service.context import ServiceContext
from lorafold.settings import Settings
from lorafold.synthetic import write_random_adapter
from tests.integration.service.conftest import KEYS
from tests.integration.service.test_service_api_inprocess import SHAPES, upload
from workers import tasks

SECRET = "whsec_" + base64.b64encode(b"lorafold-test-webhook-secret-32b").decode()


class Receiver:
    """An HTTP server on a free 127.0.0.1 port that answers the given statuses in turn."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.received: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.received.append(({k.lower(): v for k, v in self.headers.items()},
                                          body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/lorafold"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def hooked(settings: Settings) -> Iterator[tuple[TestClient, ServiceContext]]:
    signed = Settings(**{**settings.model_dump(), "webhook_secret": SECRET})
    context = ServiceContext(signed)
    tasks.configure(context, runner="in-process test runner")
    app = create_app(signed, context=context)
    with TestClient(app, headers={"Authorization": f"Bearer {KEYS['tenant-a']}"}) as client:
        yield client, context
    context.close()


def test_a_finished_job_is_reported_signed_and_retried(hooked: tuple[TestClient, Any],
                                                       tmp_path: Path) -> None:
    api, _ = hooked
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    with Receiver([500]) as receiver:  # the first try fails: a retry must follow
        response = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                                "rank": 4, "webhook_url": receiver.url})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        tasks.run_merge(job_id)
    assert len(receiver.received) == 2
    (h1, _), (h2, b2) = receiver.received
    assert h1["webhook-id"] == h2["webhook-id"]  # the same message: receivers can dedupe
    event = Webhook(SECRET).verify(b2, h2)       # raises unless the signature is right
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job_id
    assert event["data"]["result"]["adapter_id"]
    assert "webhook_url" not in event["data"]["params"]
    tampered = json.loads(b2)
    tampered["data"]["status"] = "failed"
    with pytest.raises(WebhookVerificationError):
        Webhook(SECRET).verify(json.dumps(tampered).encode(), h2)
    lines = [e["message"] for e in api.get(f"/v1/jobs/{job_id}/events").json()["data"]
             if e["type"] == "log" and "webhook" in e["message"]]
    assert [line.split(": ")[-1] for line in lines] == ["HTTP 500", "HTTP 200"]


def test_bad_or_unsignable_webhooks_are_refused_before_a_job(
        api: TestClient, hooked: tuple[TestClient, Any], tmp_path: Path) -> None:
    signed_api, _ = hooked
    adapter = upload(signed_api, write_random_adapter(tmp_path / "a", SHAPES, rank=3),
                     "a")["id"]
    body = {"adapters": [{"id": adapter}], "rank": 2}
    for url in ("ftp://example.org/x", "not a url", "http://"):
        response = signed_api.post("/v1/merges", json={**body, "webhook_url": url})
        assert response.status_code == 422 and response.json()["code"] == "invalid_webhook_url"
    unsigned = api.post("/v1/merges", json={**body, "webhook_url": "http://127.0.0.1:9/x"})
    assert unsigned.status_code == 422  # this service has no secret to sign with
    assert unsigned.json()["code"] == "webhooks_not_configured"
