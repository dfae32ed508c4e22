"""POST /v1/plans: a consolidation plan runs as a job on a worker; its result is the plan
the core computes from the same files (two adapters sharing a subspace grouped, an
orthogonal one left alone)."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from fastapi.testclient import TestClient

from lorafold.adapters import open_adapter
from lorafold.merge.grouping import plan_groups
from tests.unit.merge.test_grouping import family, write_factors
from workers import tasks


def upload(api: TestClient, directory: str) -> str:
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream"))
             for p in sorted(Path(directory).iterdir())]
    response = api.post("/v1/adapters", files=files, data={"name": Path(directory).name})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def test_a_plan_job_groups_what_shares_a_subspace(api: TestClient, tmp_path: Path) -> None:
    f0, f1 = family(0)
    lone, _ = family(1, avoid=[f0, f1])
    paths = [write_factors(tmp_path / f"a{i}", f) for i, f in enumerate([f0, f1, lone])]
    ids = [upload(api, p) for p in paths]
    response = api.post("/v1/plans", json={"adapters": ids, "min_energy": 0.9})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["type"] == "plan" and response.headers["Location"] == f"/v1/jobs/{job['id']}"
    tasks.run_plan(job["id"])  # what the worker's horse runs
    done = api.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    plan = done["result"]["plan"]
    with ExitStack() as stack:
        opened = [stack.enter_context(open_adapter(p, label=i)) for p, i in zip(paths, ids,
                                                                               strict=True)]
        expected = plan_groups(opened, energy=0.9).to_dict()
    assert plan == expected
    assert [sorted(g["members"]) for g in plan["groups"]] == [sorted(ids[:2])]
    assert plan["left_alone"] == [ids[2]]
    assert plan["parameters"]["after"] < plan["parameters"]["before"]


def test_plan_refusals_queue_nothing(api: TestClient, tmp_path: Path) -> None:
    f0, _ = family(0)
    one = upload(api, write_factors(tmp_path / "one", f0))
    jobs_before = api.get("/v1/jobs").json()["count"]
    for body, status in (({"adapters": [one]}, 422),
                         ({"adapters": [one, "ad_missing"]}, 404),
                         ({"adapters": [one, one], "min_energy": 1.5}, 422),
                         ({"adapters": [one, one], "rank": "big"}, 422),
                         ({"adapters": [one, one], "rank": 4, "max_rank": 8}, 422),
                         ({"adapters": [one, one], "stray": 1}, 422)):
        response = api.post("/v1/plans", json=body)
        assert response.status_code == status, (body, response.text)
    assert api.get("/v1/jobs").json()["count"] == jobs_before
