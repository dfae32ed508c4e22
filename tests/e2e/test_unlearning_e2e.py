"""Unlearning over HTTP with real worker processes: data sets, a data-driven job driven by
`lorafold client unlearn`, exact removal from a merge, and the bad inputs of issue 4, each
answered 4xx problem+json with nothing stored and no job queued."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafold.synthetic import write_random_adapter
from tests.e2e.stack import (
    DATASET_LIMIT,
    Stack,
    assert_problem,
    client_cli,
    upload_dir,
    wait_job,
)
from tests.unlearn_world import BASE_NAME, facts, jsonl, noise_adapter

FORGET = [{"prompt": p, "completion": c} for p, c in facts(["Zorvania"])]
RETAIN = [{"prompt": p, "completion": c} for p, c in facts(["Bractis", "Quelmar"])]
SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.1.mlp.down_proj": (16, 40)}


@pytest.fixture(scope="module")
def fitting_adapter(e2e_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_adapter(e2e_models / BASE_NAME, tmp_path_factory.mktemp("e2e-unlearn") / "lora")


def _stored(stack: Stack) -> set[str]:
    root = stack.storage_root
    assert root is not None
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}



def test_data_driven_unlearning_with_the_cli_client(stack: Stack, fitting_adapter: Path,
                                                    tmp_path: Path) -> None:
    """`lorafold client unlearn --wait` uploads the JSONL files, runs npo on a worker, and
    the output loads in PEFT on the base model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with stack.client() as client:
        response = upload_dir(client, fitting_adapter, "facts")
        assert response.status_code == 201, response.text
        adapter = response.json()["id"]
    (tmp_path / "forget.jsonl").write_bytes(jsonl(FORGET))
    (tmp_path / "holdout.jsonl").write_bytes(jsonl(RETAIN))
    done = client_cli(stack, "unlearn", "npo", adapter, "--forget",
                       str(tmp_path / "forget.jsonl"), "--holdout",
                       str(tmp_path / "holdout.jsonl"), "--hp", "max_steps=3", "--hp",
                       "lr=1e-3", "--wait", "--timeout", "240")
    assert done.returncode == 0, done.stderr + done.stdout
    job = json.loads(done.stdout)
    metrics = job["result"]["metrics"]
    assert job["status"] == "succeeded" and metrics["steps"] <= 3
    assert {"forget_nll", "holdout_nll", "mia_auc"} <= metrics["after"].keys()
    assert job["params"]["datasets"].keys() == {"forget", "holdout"}

    out = tmp_path / "out"
    got = client_cli(stack, "download", job["result"]["adapter_id"], "--out", str(out),
                      "--extract")
    assert got.returncode == 0, got.stderr
    lineage = json.loads((out / "lorafold.json").read_text())
    assert lineage["kind"] == "unlearn" and lineage["method"] == "npo"
    base = AutoModelForCausalLM.from_pretrained(str(stack_models(stack) / BASE_NAME))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 4, 5, 6]])).logits
    assert torch.isfinite(logits).all()


def stack_models(stack: Stack) -> Path:
    return Path(json.loads(stack.env["LORAFOLD_MODEL_DIRS"])[0])


def test_remove_a_constituent_end_to_end(fs_stack: Stack, tmp_path: Path) -> None:
    with fs_stack.client() as client:
        ids = []
        for i in range(3):
            response = upload_dir(client, write_random_adapter(tmp_path / f"a{i}", SHAPES,
                                                               rank=2, seed=i), f"a{i}")
            ids.append(response.json()["id"])
        merge = client.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                                "rank": 6}).json()
        merged = wait_job(client, merge["id"])["result"]["adapter_id"]
        response = client.post("/v1/unlearning", json={"method": "remove", "adapter": merged,
                                                        "remove": [ids[0]]})
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        job = wait_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["result"]["constituents"] == ids[1:]
        assert [entry["input"] for entry in job["result"]["report"]["inputs"]] == ids[1:]


def test_bad_unlearning_inputs_answer_problems_and_store_nothing(
        fs_stack: Stack, fitting_adapter: Path, tmp_path: Path) -> None:
    wrong = write_random_adapter(tmp_path / "wrong", SHAPES, rank=2, seed=9)
    config = json.loads((wrong / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": BASE_NAME}))
    with fs_stack.client() as client:
        fits = upload_dir(client, fitting_adapter, "fits").json()["id"]
        mismatch = upload_dir(client, wrong, "wrong shapes").json()["id"]
        forget = client.post("/v1/datasets", content=jsonl(FORGET),
                             headers={"Content-Type": "application/jsonl"}).json()["id"]
        before, jobs = _stored(fs_stack), client.get("/v1/jobs").json()["count"]

        def dataset(body: bytes) -> object:
            return client.post("/v1/datasets", content=body, params={"name": "bad"},
                               headers={"Content-Type": "application/jsonl"})

        def unlearning(**body: object) -> object:
            return client.post("/v1/unlearning", json=body)

        malformed = assert_problem(dataset(b'{"text": "ok"}\n{"text": \n'), 422, "invalid_json")
        assert "line 2" in malformed["detail"]
        assert_problem(dataset(b""), 422, "empty_dataset")
        assert_problem(dataset(b'{"text": "' + b"x" * DATASET_LIMIT + b'"}'), 413,
                       "payload_too_large")
        assert_problem(unlearning(method="npo", adapter=fits, forget_dataset=forget,
                                  base_model="someone/unknown-model"), 404,
                       "base_model_not_found")
        assert_problem(unlearning(method="npo", adapter=mismatch, forget_dataset=forget),
                       422, "adapter_base_mismatch")
        assert_problem(unlearning(method="npo", adapter=fits), 422, "forget_dataset_required")
        assert_problem(unlearning(method="remove", adapter=fits, remove=[mismatch]), 422,
                       "no_lineage")
        assert client.get("/v1/jobs").json()["count"] == jobs
    assert _stored(fs_stack) == before
    spool = fs_stack.root / "spool"
    assert not list(spool.glob("upload-*")) and not list(spool.glob("fit-*"))
