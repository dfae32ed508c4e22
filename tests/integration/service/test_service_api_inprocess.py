"""The API in-process against real Redis and filesystem storage, with the job executed
by calling the RQ entry point directly (as the work horse would)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from rq import Queue
from rq.serializers import JSONSerializer

from lorafold.merge.plan import DEFAULT_METHOD, DEFAULT_RULE
from lorafold.service.context import ServiceContext
from lorafold.synthetic import write_random_adapter
from tests.integration.service.conftest import KEYS
from workers import tasks

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.1.mlp.down_proj": (16, 40)}


def upload(api: TestClient, directory: Path, name: str, **kwargs: Any) -> dict[str, Any]:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]
    response = api.post("/v1/adapters", files=files, data={"name": name}, **kwargs)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def test_upload_merge_run_download(api: TestClient, ctx: ServiceContext, tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    response = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                            "method": "ctm", "rule": "ta", "rank": 6})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] == "queued" and job["attempts"] == 0

    queue = Queue("lorafold-merge", connection=ctx.redis, serializer=JSONSerializer)
    rq_job = queue.fetch_job(job["id"])
    assert rq_job is not None
    assert rq_job.func_name == "workers.tasks.run_merge" and rq_job.args == [job["id"]]
    assert rq_job.timeout == ctx.settings.merge_timeout_s
    assert rq_job.retries_left == ctx.settings.job_retries

    tasks.run_merge(job["id"])  # what the worker's horse runs
    done = api.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded" and done["attempts"] == 1
    assert done["progress"] == {"stage": "done", "fraction": 1.0}
    output = done["result"]["adapter_id"]
    assert done["result"]["report"]["output_rank"] == 6

    events = api.get(f"/v1/jobs/{job['id']}/events").json()
    stages = [e.get("stage") for e in events["data"] if e["type"] == "progress"]
    assert stages == ["fetch", "plan", "merge", "write", "publish"]
    assert api.get(f"/v1/jobs/{job['id']}/events",
                   params={"since": events["last_seq"]}).json()["count"] == 0

    download = api.get(f"/v1/adapters/{output}/download")
    assert download.status_code == 200
    assert download.headers["content-disposition"] == f'attachment; filename="{output}.tar"'
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors",
                                          "lorafold.json"]
    assert api.delete(f"/v1/adapters/{output}").status_code == 204
    assert api.get(f"/v1/adapters/{output}").status_code == 404


def test_merge_options_reach_the_lineage(api: TestClient, tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    options = {"method": "ctm", "rule": "dare_ties", "rank": 4, "density": 0.3, "drop": 0.2,
               "beta": 0.25, "subspace": "hosvd", "seed": 5}
    response = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids], **options})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    tasks.run_merge(job_id)
    done = api.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded", done
    download = api.get(f"/v1/adapters/{done['result']['adapter_id']}/download")
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        member = tar.extractfile("lorafold.json")
        assert member is not None
        written = json.loads(member.read())
    assert {k: written["parameters"][k] for k in options} == options
    assert written["report"]["subspaces"]["mode"] == "hosvd"

    nulls = {"beta": None, "subspace": None, "drop": None, "density": None}
    defaults = api.post("/v1/merges", json={"adapters": [{"id": ids[0]}], "rank": 2, **nulls})
    assert defaults.status_code == 202, defaults.text  # null: the default
    request = defaults.json()["params"]["request"]
    assert (request["method"], request["rule"]) == (DEFAULT_METHOD, DEFAULT_RULE)


def test_rank_auto_and_a_serving_target_over_http(api: TestClient, tmp_path: Path) -> None:
    from lorafold.adapters import open_adapter
    from lorafold.merge.auto_rank import auto_rank

    paths = [write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i) for i in range(2)]
    ids = [upload(api, path, f"a{i}")["id"] for i, path in enumerate(paths)]
    response = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                            "rank": "auto", "min_energy": 0.8,
                                            "target": "vllm"})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    tasks.run_merge(job_id)
    done = api.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded", done
    report = done["result"]["report"]
    with open_adapter(paths[0], label="a0") as a, open_adapter(paths[1], label="a1") as b:
        expected = auto_rank([a, b], energy=0.8).rank  # the core's choice on the same inputs
    assert report["auto_rank"]["rank"] == report["output_rank"] == expected
    assert all(i["min_energy"] >= 0.8 - 1e-9 for i in report["auto_rank"]["inputs"])
    assert report["serving"]["target"] == "vllm" and report["serving"]["ok"] is True
    for bad in ({"rank": "auto", "method": "mtc"}, {"rank": 4, "min_energy": 0.9},
                {"rank": "auto", "min_energy": 1.5}, {"target": "triton", "rank": 4}):
        response = api.post("/v1/merges", json={"adapters": [{"id": ids[0]}], **bad})
        assert response.status_code == 422, (bad, response.text)


def test_bad_merge_options_are_refused_before_a_job(api: TestClient) -> None:
    jobs_before = api.get("/v1/jobs").json()["count"]
    base = {"adapters": [{"id": "ad_x"}], "method": "ctm", "rank": 4}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"beta": 1.5}, "invalid_parameter"),
        ({"beta": -0.1}, "invalid_parameter"),
        ({"method": "mtc", "beta": 0.5}, "invalid_parameter"),
        ({"method": "mtc", "subspace": "hooi"}, "invalid_parameter"),
        ({"rule": "dare", "density": 0.5}, "invalid_parameter"),
        ({"rule": "dare", "drop": 1.0}, "invalid_parameter"),
        ({"rule": "ties", "drop": 0.2}, "invalid_parameter"),
        ({"subspace": "x"}, "request_validation_failed"),
        ({"beta": "high"}, "request_validation_failed"),
        ({"balance": True}, "request_validation_failed"),
    ]
    for extra, code in cases:
        response = api.post("/v1/merges", json={**base, **extra})
        assert response.status_code == 422, (extra, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == code, extra
    for field in ("beta", "drop", "density", "scale"):
        for value in ("NaN", "Infinity", "-Infinity"):  # Python's json accepts these
            raw = f'{{"adapters": [{{"id": "ad_x"}}], "rank": 4, "{field}": {value}}}'
            response = api.post("/v1/merges", content=raw.encode(),
                                headers={"Content-Type": "application/json"})
            assert response.status_code == 422, (field, value, response.text)
            body = response.json()
            assert body["code"] == "request_validation_failed"
            assert body["errors"][0]["loc"] == ["body", field]
    assert api.get("/v1/jobs").json()["count"] == jobs_before


def test_a_retried_job_overwrites_its_output(api: TestClient, ctx: ServiceContext,
                                             tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    job_id = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                          "rank": 2}).json()["id"]
    ctx.jobs.mark_running(job_id)  # attempt 1 "dies" here, having started
    tasks.run_merge(job_id)        # attempt 2
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded" and job["attempts"] == 2
    tasks.run_merge(job_id)        # a late duplicate delivery does nothing
    assert api.get(f"/v1/jobs/{job_id}").json()["attempts"] == 2
    listed = [a for a in api.get("/v1/adapters").json()["data"] if a["source"] == "merge"]
    assert [a["job_id"] for a in listed] == [job_id]


def test_job_failures_are_recorded_with_their_code(api: TestClient, ctx: ServiceContext,
                                                   tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    job_id = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                          "rank": 2}).json()["id"]
    refused = api.delete(f"/v1/adapters/{ids[1]}")  # a queued job's input stays
    assert refused.status_code == 409 and refused.json()["code"] == "adapter_in_use"
    ctx.adapters.delete("tenant-a", ids[1])  # gone behind the service's back before it runs
    tasks.run_merge(job_id)
    job = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "adapter_not_found" and job["error"]["retryable"] is False


def test_cancel_before_and_during(api: TestClient, ctx: ServiceContext, tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    body = {"adapters": [{"id": i} for i in ids], "rank": 2}
    queued = api.post("/v1/merges", json=body).json()["id"]
    cancelled = api.post(f"/v1/jobs/{queued}/cancel").json()
    assert cancelled["status"] == "cancelled"
    tasks.run_merge(queued)  # the worker picks it up later: nothing happens
    assert api.get(f"/v1/jobs/{queued}").json()["attempts"] == 0

    running = api.post("/v1/merges", json=body).json()["id"]
    ctx.jobs.mark_running(running)
    flagged = api.post(f"/v1/jobs/{running}/cancel").json()
    assert flagged["status"] == "running" and flagged["cancel_requested"] is True
    tasks.run_merge(running)  # a retry of it sees the flag at its first checkpoint
    assert api.get(f"/v1/jobs/{running}").json()["status"] == "cancelled"
    finished = api.post(f"/v1/jobs/{running}/cancel")
    assert finished.status_code == 202  # cancelling a cancelled job is a no-op
    listed = [j["status"] for j in api.get("/v1/jobs", params={"status": "cancelled"})
              .json()["data"]]
    assert listed == ["cancelled", "cancelled"]


def test_job_listing_pages(api: TestClient, tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / "a", SHAPES, rank=2), "a")["id"]]
    created = [api.post("/v1/merges", json={"adapters": [{"id": ids[0]}], "rank": 2}).json()["id"]
               for _ in range(3)]
    first = api.get("/v1/jobs", params={"limit": 2}).json()
    assert first["count"] == 2 and first["next_cursor"]
    second = api.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]}).json()
    assert [j["id"] for j in first["data"] + second["data"]] == created[::-1]
    bad = api.get("/v1/jobs", params={"cursor": "job_nope"})
    assert bad.status_code == 422 and bad.json()["code"] == "invalid_cursor"


def test_other_tenant_and_idempotent_upload(api: TestClient, tmp_path: Path) -> None:
    directory = write_random_adapter(tmp_path / "a", SHAPES, rank=2)
    headers = {"Idempotency-Key": "up-1"}
    first = upload(api, directory, "a", headers=headers)
    assert upload(api, directory, "a", headers=headers)["id"] == first["id"]
    other = {"Authorization": f"Bearer {KEYS['tenant-b']}"}
    assert api.get(f"/v1/adapters/{first['id']}", headers=other).status_code == 404
    assert api.get("/v1/adapters", headers=other).json() == {"data": [], "count": 0}


def test_readiness_reports_a_dead_redis(settings: Any, tmp_path: Path) -> None:
    from app.main import create_app

    broken = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(broken)) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["code"] == "not_ready" and body["checks"]["storage"] == "ok"
    assert body["checks"]["redis"].startswith("unreachable")
