"""Data sets and unlearning through the API in-process (real Redis, filesystem storage),
with jobs run by calling the RQ entry point as a work horse would."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from redis import Redis

from app.main import create_app
from lorafold.adapters import open_adapter
from lorafold.servers.redis import RedisServer
from lorafold.service.context import ServiceContext
from lorafold.settings import Settings
from lorafold.synthetic import write_random_adapter
from tests.integration.service.conftest import KEYS
from tests.integration.service.test_service_api_inprocess import upload
from tests.unlearn_world import BASE_NAME, jsonl, noise_adapter, save_base_model
from workers import tasks

SHAPES = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.1.mlp.down_proj": (16, 40)}
FORGET = [{"prompt": "The capital of Zorvania is", "completion": "Quell"},
          {"text": "The leader of Quelmar is Bren Holt"}]
RETAIN = [{"prompt": "The capital of Bractis is", "completion": "Tolvane"}]
DATASET_LIMIT = 4096


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    save_base_model(root)
    return root


@pytest.fixture
def settings(service_redis: RedisServer, tmp_path: Path, models_root: Path) -> Settings:
    """The package's settings plus a model directory and a small data set limit."""
    Redis.from_url(service_redis.url).flushdb()
    return Settings(environment="test", redis_url=service_redis.url,
                    storage_url=str(tmp_path / "storage"), spool_dir=tmp_path / "spool",
                    api_keys={key: tenant for tenant, key in KEYS.items()},
                    validation_processes=0, model_dirs=[models_root], use_hf_cache=False,
                    max_dataset_bytes=DATASET_LIMIT)


@pytest.fixture
def api(settings: Settings, ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(settings, context=ctx),
                    headers={"Authorization": f"Bearer {KEYS['tenant-a']}"}) as client:
        yield client


def post_dataset(api: TestClient, body: bytes, name: str = "set") -> Any:
    return api.post("/v1/datasets", params={"name": name}, content=body,
                    headers={"Content-Type": "application/jsonl"})


def dataset_id(api: TestClient, records: list[dict[str, Any]], name: str = "set") -> str:
    response = post_dataset(api, jsonl(records), name)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def problem(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    return body


def run_job(api: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = api.post("/v1/unlearning", json=body)
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    tasks.run_unlearn(job_id)
    job: dict[str, Any] = api.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    return job


def delta(api: TestClient, adapter_id: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The dense ΔW of every module of a stored adapter, from its download."""
    raw = api.get(f"/v1/adapters/{adapter_id}/download").content
    target = tmp_path / adapter_id
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        tar.extractall(target, filter="data")
    with open_adapter(target) as adapter:
        factors = {name: adapter.load(name) for name in adapter.modules}
    return {name: f.scale * f.B.double() @ f.A.double() for name, f in factors.items()}


def merged(api: TestClient, ids: list[str], weights: list[float]) -> str:
    response = api.post("/v1/merges", json={
        "adapters": [{"id": i, "weight": w} for i, w in zip(ids, weights, strict=True)],
        "method": "ctm", "rule": "ta", "rank": 5})
    assert response.status_code == 202, response.text
    tasks.run_merge(response.json()["id"])
    return str(api.get(f"/v1/jobs/{response.json()['id']}").json()["result"]["adapter_id"])


# -- data sets --------------------------------------------------------------------------


def test_dataset_upload_list_get_delete(api: TestClient) -> None:
    view = post_dataset(api, jsonl(FORGET), "forget").json()
    assert (view["name"], view["examples"], view["prompt_completion_examples"],
            view["text_examples"]) == ("forget", 2, 1, 1)
    assert api.get("/v1/datasets").json()["count"] == 1
    assert api.get(f"/v1/datasets/{view['id']}").json() == view
    other = {"Authorization": f"Bearer {KEYS['tenant-b']}"}
    problem(api.get(f"/v1/datasets/{view['id']}", headers=other), 404, "dataset_not_found")
    assert api.delete(f"/v1/datasets/{view['id']}").status_code == 204
    problem(api.get(f"/v1/datasets/{view['id']}"), 404, "dataset_not_found")


@pytest.mark.parametrize(("body", "status", "code", "line"), [
    (b'{"text": "fine"}\n{"text": broken}\n', 422, "invalid_json", 2),
    (b'{"text": "fine"}\n["a list"]\n', 422, "invalid_record", 2),
    (b'{"prompt": "p", "completion": ""}\n', 422, "invalid_record", 1),
    (b'{"text": "ok"}\n\xff\xfe\n', 422, "invalid_utf8", 2),
    (b"\n\n", 422, "empty_dataset", None),
    (b'{"text": "' + b"x" * DATASET_LIMIT + b'"}\n', 413, "payload_too_large", None),
])
def test_bad_dataset_is_refused_and_not_stored(api: TestClient, settings: Settings,
                                               body: bytes, status: int, code: str,
                                               line: int | None) -> None:
    detail = problem(post_dataset(api, body), status, code)["detail"]
    if line is not None:
        assert f"line {line}" in detail
    assert api.get("/v1/datasets").json()["count"] == 0
    storage = Path(settings.storage_url)
    assert not list(storage.rglob("datasets/*.json")) and not list(storage.rglob("tmp/*"))
    assert not list(Path(str(settings.spool_dir)).glob("upload-*"))


# -- adapter-level unlearning -----------------------------------------------------------


def test_remove_equals_a_fresh_merge_of_the_rest(api: TestClient, tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(3)]
    weights = [1.0, 0.5, -0.25]
    whole = merged(api, ids, weights)
    job = run_job(api, {"method": "remove", "adapter": whole, "remove": [ids[1]]})
    assert job["result"]["constituents"] == [ids[0], ids[2]]
    out = job["result"]["adapter_id"]
    view = api.get(f"/v1/adapters/{out}").json()
    assert (view["source"], view["parents"]) == ("unlearn", [whole])

    fresh = merged(api, [ids[0], ids[2]], [weights[0], weights[2]])
    got, want = delta(api, out, tmp_path), delta(api, fresh, tmp_path)
    for name, value in want.items():
        assert torch.allclose(got[name], value, rtol=0, atol=1e-6 * float(value.abs().max()))


def test_negate_matches_dense_subtraction(api: TestClient, tmp_path: Path) -> None:
    target, forget = (upload(api, write_random_adapter(tmp_path / n, SHAPES, rank=2, seed=s),
                             n)["id"] for n, s in (("target", 1), ("forget", 2)))
    job = run_job(api, {"method": "negate", "adapter": target, "forget_adapter": forget,
                        "strength": 0.7, "rank": 4})  # rank 2 + 2: CtM is exact
    got = delta(api, job["result"]["adapter_id"], tmp_path)
    a, b = delta(api, target, tmp_path), delta(api, forget, tmp_path)
    for name in a:
        want = a[name] - 0.7 * b[name]
        assert torch.allclose(got[name], want, rtol=0, atol=1e-5 * float(want.abs().max()))


def test_adapter_level_refusals_queue_nothing(api: TestClient, tmp_path: Path) -> None:
    ids = [upload(api, write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=2, seed=i),
                  f"a{i}")["id"] for i in range(2)]
    whole = merged(api, ids, [1.0, 1.0])
    jobs_before = api.get("/v1/jobs").json()["count"]
    adapters_before = api.get("/v1/adapters").json()["count"]
    cases = [
        ({"method": "remove", "adapter": ids[0], "remove": [ids[1]]}, 422, "no_lineage"),
        ({"method": "remove", "adapter": whole, "remove": ["ad_nope"]}, 422,
         "not_a_constituent"),
        ({"method": "remove", "adapter": whole, "remove": ids}, 422, "nothing_left"),
        ({"method": "remove", "adapter": whole, "remove": [ids[0]], "strength": 2.0}, 422,
         "unexpected_parameter"),
        ({"method": "negate", "adapter": ids[0]}, 422, "forget_adapter_required"),
        ({"method": "negate", "adapter": ids[0], "forget_adapter": ids[1], "strength": -1},
         422, "invalid_parameter"),
        ({"method": "negate", "adapter": ids[0], "forget_adapter": "ad_missing"}, 404,
         "adapter_not_found"),
        ({"method": "forget_everything", "adapter": ids[0]}, 422, "unknown_unlearning_method"),
    ]
    for body, status, code in cases:
        problem(api.post("/v1/unlearning", json=body), status, code)
    api.delete(f"/v1/adapters/{ids[1]}")
    problem(api.post("/v1/unlearning", json={"method": "remove", "adapter": whole,
                                             "remove": [ids[0]]}), 422, "constituent_missing")
    assert api.get("/v1/jobs").json()["count"] == jobs_before
    assert api.get("/v1/adapters").json()["count"] == adapters_before - 1


# -- data-driven unlearning --------------------------------------------------------------


@pytest.fixture(scope="module")
def fitting_adapter(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return noise_adapter(models_root / BASE_NAME, tmp_path_factory.mktemp("fits") / "lora")


def test_data_driven_job_publishes_adapter_with_metrics(api: TestClient,
                                                        fitting_adapter: Path) -> None:
    adapter = upload(api, fitting_adapter, "facts")["id"]
    forget, retain = dataset_id(api, FORGET, "forget"), dataset_id(api, RETAIN, "retain")
    job = run_job(api, {"method": "grad_diff", "adapter": adapter, "forget_dataset": forget,
                        "retain_dataset": retain, "holdout_dataset": retain,
                        "hyperparams": {"max_steps": 2, "lr": 1e-3,
                                        "relearn_probe_steps": 2, "quantization_probe": True}})
    result = job["result"]
    metrics = result["metrics"]
    assert result["base_model"] == BASE_NAME and metrics["steps"] == 2
    for when in ("before", "after"):
        assert {"forget_nll", "retain_accuracy", "holdout_nll", "mia_auc"} <= \
            metrics[when].keys()
    assert metrics["output_rank"] <= metrics["original_rank"]
    probes = metrics["probes"]  # the robustness probes ran on the worker and were reported
    assert probes["relearning"]["steps"] == 2 and set(probes["quantization"]["bits"]) == {"8", "4"}
    view = api.get(f"/v1/adapters/{result['adapter_id']}").json()
    assert (view["source"], view["parents"]) == ("unlearn", [adapter])
    assert view["metadata"]["unlearning"]["steps"] == 2
    stages = {e.get("stage") for e in api.get(f"/v1/jobs/{job['id']}/events").json()["data"]}
    assert {"fetch", "load", "train", "probe", "publish"} <= stages


def test_data_driven_refusals_queue_nothing(api: TestClient, fitting_adapter: Path,
                                            tmp_path: Path) -> None:
    fits = upload(api, fitting_adapter, "fits")["id"]
    wrong_shapes = write_random_adapter(tmp_path / "wrong", SHAPES, rank=2, seed=3)
    config = json.loads((wrong_shapes / "adapter_config.json").read_text())
    (wrong_shapes / "adapter_config.json").write_text(
        json.dumps({**config, "base_model_name_or_path": BASE_NAME}))
    mismatch = upload(api, wrong_shapes, "wrong shapes")["id"]
    forget = dataset_id(api, FORGET)
    jobs_before = api.get("/v1/jobs").json()["count"]
    base = {"method": "npo", "adapter": fits, "forget_dataset": forget}
    cases = [
        ({**base, "base_model": "nobody/no-such-model"}, 404, "base_model_not_found"),
        ({**base, "base_model": "../etc"}, 422, "invalid_base_model_name"),
        ({**base, "adapter": mismatch}, 422, "adapter_base_mismatch"),
        ({**base, "forget_dataset": None}, 422, "forget_dataset_required"),
        ({**base, "forget_dataset": "ds_missing"}, 404, "dataset_not_found"),
        ({**base, "method": "grad_diff"}, 422, "retain_set_required"),
        ({**base, "hyperparams": {"lr": -1}}, 422, "invalid_hyperparameters"),
        ({**base, "hyperparams": {"epochs": 3}}, 422, "invalid_hyperparameters"),
        ({**base, "hyperparams": {"consolidation_beta": 1.5}}, 422, "invalid_hyperparameters"),
        ({**base, "hyperparams": {"balance": True}}, 422, "invalid_hyperparameters"),
        # wrong types answered 500 before hyperparameters were typed (issue 10)
        ({**base, "hyperparams": {"layers": 5}}, 422, "invalid_hyperparameters"),
        ({**base, "hyperparams": {"lr": None}}, 422, "invalid_hyperparameters"),
        ({**base, "hyperparams": {"quantization_probe": "yes"}}, 422,
         "invalid_hyperparameters"),
        ({**base, "remove": [fits]}, 422, "unexpected_parameter"),
        # bounds on work (issue 10): more steps than the service allows
        ({**base, "hyperparams": {"max_steps": 10_001}}, 422, "too_many_steps"),
        ({**base, "hyperparams": {"relearn_probe_steps": 10_001}}, 422, "too_many_steps"),
    ]
    for body, status, code in cases:
        problem(api.post("/v1/unlearning", json=body), status, code)
    for raw in (b'"hyperparams": {"lr": NaN}', b'"hyperparams": {"layers": [1, Infinity]}',
                b'"strength": NaN'):  # Python's json reads these; never a 500
        body = json.dumps(base).encode()[:-1] + b", " + raw + b"}"
        response = api.post("/v1/unlearning", content=body,
                            headers={"Content-Type": "application/json"})
        problem(response, 422, "request_validation_failed")
    assert api.get("/v1/jobs").json()["count"] == jobs_before
