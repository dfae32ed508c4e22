"""Tenants see only their own adapters and jobs; POSTs honour Idempotency-Key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafold.synthetic import write_random_adapter
from tests.e2e.stack import KEYS, Stack, assert_problem, upload_dir, wait_job

SHAPES = {"model.layers.0.self_attn.q_proj": (32, 32), "model.layers.0.mlp.up_proj": (48, 32)}


@pytest.fixture
def owned(fs_stack: Stack, tmp_path: Path) -> dict[str, Any]:
    """Tenant A's adapter and a finished merge job."""
    with fs_stack.client("tenant-a") as client:
        ids = []
        for i in range(2):
            directory = write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=4, seed=i)
            response = upload_dir(client, directory, f"a{i}")
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
        job = client.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                               "rank": 4}).json()
        job = wait_job(client, job["id"])
        assert job["status"] == "succeeded", job
    return {"adapter_ids": ids, "job": job}


def test_other_tenant_gets_404_everywhere(fs_stack: Stack, owned: dict[str, Any]) -> None:
    adapter_id = owned["adapter_ids"][0]
    job_id = owned["job"]["id"]
    with fs_stack.client("tenant-b") as other:
        for method, path, code in [
            ("GET", f"/v1/adapters/{adapter_id}", "adapter_not_found"),
            ("GET", f"/v1/adapters/{adapter_id}/download", "adapter_not_found"),
            ("DELETE", f"/v1/adapters/{adapter_id}", "adapter_not_found"),
            ("GET", f"/v1/jobs/{job_id}", "job_not_found"),
            ("GET", f"/v1/jobs/{job_id}/events", "job_not_found"),
            ("POST", f"/v1/jobs/{job_id}/cancel", "job_not_found"),
        ]:
            assert_problem(other.request(method, path), 404, code)
        merge = other.post("/v1/merges", json={"adapters": [{"id": adapter_id}], "rank": 4})
        assert_problem(merge, 404, "adapter_not_found")
        listed = {a["id"] for a in other.get("/v1/adapters").json()["data"]}
        assert not listed & set(owned["adapter_ids"])
        assert job_id not in {j["id"] for j in other.get("/v1/jobs").json()["data"]}
    with fs_stack.client("tenant-a") as owner:  # still there for its owner
        assert owner.get(f"/v1/adapters/{adapter_id}").status_code == 200
        assert job_id in {j["id"] for j in owner.get("/v1/jobs").json()["data"]}


def test_requests_without_a_valid_key_get_401(fs_stack: Stack) -> None:
    with httpx.Client(base_url=fs_stack.url) as anonymous:
        response = anonymous.get("/v1/adapters")
        assert_problem(response, 401, "missing_api_key")
        assert response.headers["www-authenticate"].startswith("Bearer")
        wrong = anonymous.get("/v1/jobs", headers={"Authorization": "Bearer nope"})
        assert_problem(wrong, 401, "invalid_api_key")
        basic = anonymous.get("/v1/jobs", headers={"Authorization": f"Basic {KEYS['tenant-a']}"})
        assert_problem(basic, 401, "invalid_authorization")


def test_idempotent_merge(fs_stack: Stack, owned: dict[str, Any]) -> None:
    body = {"adapters": [{"id": i} for i in owned["adapter_ids"]], "rank": 2}
    key = {"Idempotency-Key": "merge-once-7f3a"}
    with fs_stack.client() as client:
        first = client.post("/v1/merges", json=body, headers=key)
        again = client.post("/v1/merges", json=body, headers=key)
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"]
        other = client.post("/v1/merges", json={**body, "rank": 3}, headers=key)
        assert_problem(other, 409, "idempotency_key_reused")
        assert wait_job(client, first.json()["id"])["status"] == "succeeded"
        jobs = [j for j in client.get("/v1/jobs", params={"type": "merge"}).json()["data"]
                if j["params"]["request"]["rank"] == 2]
        assert len(jobs) == 1


def test_idempotent_upload(fs_stack: Stack, tmp_path: Path) -> None:
    directory = write_random_adapter(tmp_path / "once", SHAPES, rank=4, seed=42)
    key = {"Idempotency-Key": "upload-once-91c2"}
    with fs_stack.client() as client:
        count = client.get("/v1/adapters").json()["count"]
        first = upload_dir(client, directory, "once", headers=key)
        again = upload_dir(client, directory, "once", headers=key)
        assert first.status_code == again.status_code == 201
        assert first.json()["id"] == again.json()["id"]
        assert client.get("/v1/adapters").json()["count"] == count + 1
        renamed = upload_dir(client, directory, "twice", headers=key)
        assert_problem(renamed, 409, "idempotency_key_reused")
