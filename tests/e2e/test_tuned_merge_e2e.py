"""Tuned merges over HTTP with a real worker (issue 12): the job's result carries the chosen
values and the search, `remove` re-merges at them, and bad inputs are refused with codes
before anything is queued."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from lorafold.synthetic import write_random_adapter
from tests.e2e.stack import Stack, assert_problem, client_cli, upload_dir, wait_job
from tests.unlearn_world import BASE_NAME, facts, jsonl, noise_adapter

VALIDATION = [{"prompt": p, "completion": c} for p, c in facts(["Zorvania", "Quelmar"])]
SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16)}


@pytest.fixture(scope="module")
def noise_adapters(e2e_models: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("e2e-tune")
    return [noise_adapter(e2e_models / BASE_NAME, root / f"lora{i}", seed=i) for i in range(2)]


def _setup(stack: Stack, adapters: list[Path]) -> tuple[list[str], str]:
    with stack.client() as client:
        ids = [upload_dir(client, path, path.name).json()["id"] for path in adapters]
        dataset = client.post("/v1/datasets", content=jsonl(VALIDATION), params={"name": "val"},
                              headers={"Content-Type": "application/jsonl"})
        assert dataset.status_code == 201, dataset.text
    return ids, dataset.json()["id"]


def test_a_tuned_merge_job_reports_its_choice(fs_stack: Stack,
                                              noise_adapters: list[Path]) -> None:
    ids, dataset = _setup(fs_stack, noise_adapters)
    with fs_stack.client() as client:
        response = client.post("/v1/merges", json={
            "adapters": [{"id": i} for i in ids], "rank": 4,
            "tune": {"datasets": [dataset], "budget": 5}})
        assert response.status_code == 202, response.text
        job = wait_job(client, response.json()["id"], timeout=240)
        assert job["status"] == "succeeded", job
        tuning = job["result"]["report"]["tuning"]
        assert set(tuning["chosen"]) == {"lambda", "beta"}
        assert tuning["candidates_evaluated"] <= 5 and tuning["wall_time_s"] > 0
        assert tuning["best"]["loss"] == min(c["loss"] for c in tuning["curve"])
        assert job["params"]["tune"]["base_model"] == BASE_NAME
        merged = job["result"]["adapter_id"]

        removed = client.post("/v1/unlearning", json={"method": "remove", "adapter": merged,
                                                       "remove": [ids[0]]})
        assert removed.status_code == 202, removed.text
        done = wait_job(client, removed.json()["id"], timeout=120)
        assert done["status"] == "succeeded", done
        download = client.get(f"/v1/adapters/{done['result']['adapter_id']}/download")
        assert download.status_code == 200, download.text
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        member = tar.extractfile("lorafold.json")
        assert member is not None
        lineage = json.loads(member.read())
    # the remaining input is re-merged at the tuned values, as recorded
    assert lineage["parameters"]["scale"] == tuning["chosen"]["lambda"]
    assert lineage["parameters"]["beta"] == tuning["chosen"]["beta"]
    assert [entry["label"] for entry in lineage["inputs"]] == ids[1:]


def test_bad_tuned_merges_are_refused_and_nothing_is_queued(
        fs_stack: Stack, noise_adapters: list[Path], tmp_path: Path) -> None:
    ids, dataset = _setup(fs_stack, noise_adapters)
    wrong = write_random_adapter(tmp_path / "wrong", SHAPES, rank=2, seed=9,
                                 base_model=BASE_NAME)
    with fs_stack.client() as client:
        mismatch = upload_dir(client, wrong, "wrong shapes").json()["id"]
        jobs = client.get("/v1/jobs").json()["count"]

        def merge(tune: dict[str, object], inputs: list[str] = ids,
                  **body: object) -> object:
            return client.post("/v1/merges", json={"adapters": [{"id": i} for i in inputs],
                                                   "rank": 4, "tune": tune, **body})

        assert_problem(merge({"datasets": [dataset], "base_model": "someone/unknown"}), 404,
                       "base_model_not_found")
        assert_problem(merge({"datasets": ["ds_missing"]}), 404, "dataset_not_found")
        assert_problem(merge({"datasets": [dataset], "budget": 100_000}), 422,
                       "tune_budget_exceeded")
        assert_problem(merge({"datasets": [dataset] * 3}), 422, "invalid_tune")
        assert_problem(merge({"datasets": [dataset], "params": ["weights"]}), 422,
                       "invalid_tune")
        assert_problem(merge({"datasets": [dataset], "params": ["lambda"]}, rank="auto"),
                       422, "invalid_tune")
        assert_problem(merge({"datasets": [dataset]}, inputs=[ids[0], mismatch]), 422,
                       "adapter_base_mismatch")
        assert_problem(merge({"datasets": []}), 422, "request_validation_failed")
        assert_problem(merge({"datasets": [dataset], "extra": 1}), 422,
                       "request_validation_failed")
        assert client.get("/v1/jobs").json()["count"] == jobs


def test_the_cli_client_uploads_the_validation_file_and_tunes(
        fs_stack: Stack, noise_adapters: list[Path], tmp_path: Path) -> None:
    ids, _ = _setup(fs_stack, noise_adapters)
    validation = tmp_path / "val.jsonl"
    validation.write_bytes(jsonl(VALIDATION))
    done = client_cli(fs_stack, "merge", *ids, "--rank", "4", "--tune-data", str(validation),
                      "--tune-params", "lambda", "--tune", "3", "--wait")
    assert done.returncode == 0, done.stderr
    job = json.loads(done.stdout[done.stdout.index("{"):])
    assert job["status"] == "succeeded"
    tuning = job["result"]["report"]["tuning"]
    assert tuning["params"] == ["lambda"] and tuning["candidates_evaluated"] <= 3
    with fs_stack.client() as client:  # the file was uploaded as a data set, and named
        names = [d["name"] for d in client.get("/v1/datasets").json()["data"]]
    assert "val (validation)" in names
