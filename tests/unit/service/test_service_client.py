"""The Python client against a mock transport: requests it sends, errors it raises."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from lorafold.client import ApiError, LorafoldClient
from tests.adapter_cases import good_adapter


def problem(status: int, code: str) -> httpx.Response:
    return httpx.Response(status, json={"type": f"urn:lorafold:problem:{code}", "title": "x",
                                        "status": status, "detail": f"{code} happened",
                                        "code": code},
                          headers={"content-type": "application/problem+json"})


def test_errors_carry_the_server_code() -> None:
    transport = httpx.MockTransport(lambda request: problem(404, "adapter_not_found"))
    with LorafoldClient("http://svc", "k", transport=transport) as client, \
            pytest.raises(ApiError) as err:
        client.get_adapter("ad_x")
    assert err.value.code == "adapter_not_found" and err.value.status == 404
    assert "happened" in err.value.message


def test_upload_sends_the_peft_files_with_auth(tmp_path: Path) -> None:
    seen: dict[str, object] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        body = request.read()
        seen["auth"] = request.headers["authorization"]
        seen["key"] = request.headers.get("idempotency-key")
        seen["names"] = [name for name in (b"adapter_config.json", b"adapter_model.safetensors",
                                           b'name="name"', b'name="metadata"') if name in body]
        return httpx.Response(201, json={"id": "ad_1"})

    directory = good_adapter(tmp_path / "adapter")
    with LorafoldClient("http://svc", "secret", transport=httpx.MockTransport(handler)) as c:
        assert c.upload(directory, metadata={"a": 1}, idempotency_key="k1") == {"id": "ad_1"}
    assert seen["auth"] == "Bearer secret" and seen["key"] == "k1"
    assert len(seen["names"]) == 4  # type: ignore[arg-type]


def test_merge_body_and_wait_until_done() -> None:
    states = iter(["queued", "running", "running", "succeeded"])
    progress: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            body = json.loads(request.read())
            assert body["adapters"] == [{"id": "a", "weight": 1.0}, {"id": "b", "weight": -0.5}]
            assert body["rank"] == 8
            # unset options are not sent: the service's defaults apply
            assert not {"method", "rule", "density", "drop", "beta", "subspace"} & set(body)
            return httpx.Response(202, json={"id": "job_1", "status": "queued"})
        status = next(states)
        return httpx.Response(200, json={"id": "job_1", "status": status,
                                         "progress": {"stage": status, "fraction": 0.5}})

    with LorafoldClient("http://svc", "k", transport=httpx.MockTransport(handler)) as client:
        job = client.merge(["a", "b"], weights=[1.0, -0.5], rank=8)
        final = client.wait(job["id"], poll_s=0.001,
                            on_progress=lambda j: progress.append(j["status"]))
    assert final["status"] == "succeeded"
    assert progress == ["queued", "running", "running", "succeeded"]


def test_merge_sends_the_options_it_is_given() -> None:
    sent: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.read()))
        return httpx.Response(202, json={"id": "job_1", "status": "queued"})

    with LorafoldClient("http://svc", "k", transport=httpx.MockTransport(handler)) as client:
        client.merge(["a", "b"], method="ctm", rule="dare_ties", rank=4, density=0.3, drop=0.2,
                     beta=0.25, subspace="hosvd", seed=3)
    body = sent[0]
    assert {k: body[k] for k in ("method", "rule", "rank", "density", "drop", "beta",
                                 "subspace", "seed")} == {
        "method": "ctm", "rule": "dare_ties", "rank": 4, "density": 0.3, "drop": 0.2,
        "beta": 0.25, "subspace": "hosvd", "seed": 3}
    assert "balance" not in body


def test_wait_gives_up_after_its_timeout() -> None:
    transport = httpx.MockTransport(lambda r: httpx.Response(200, json={
        "id": "job_1", "status": "running", "progress": {"stage": "merge", "fraction": 0.1}}))
    with LorafoldClient("http://svc", "k", transport=transport) as client, \
            pytest.raises(ApiError) as err:
        client.wait("job_1", timeout=0.05, poll_s=0.01)
    assert err.value.code == "wait_timeout"
