"""Hostile adapter configs over HTTP (in-process API, real Redis, filesystem storage): each
is refused with a 4xx and its code, nothing is stored, and the tenant's listing still
works; a validator that overruns its budget is killed and replaced, never a 500."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.schemas import AdapterPublic
from lorafold.errors import InvalidAdapter
from lorafold.service.adapters import adapter_record, publish_adapter, write_archive
from lorafold.service.context import ServiceContext
from lorafold.service.validation import ProcessValidator, inspect_adapter
from lorafold.settings import Settings
from lorafold.synthetic import write_random_adapter
from tests.adapter_cases import SHAPES, good_adapter
from tests.integration.service.conftest import KEYS

HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "target_modules_number": ({"target_modules": 5}, "invalid_config"),
    "rank_pattern_string": ({"rank_pattern": "x"}, "invalid_config"),
    "base_model_number": ({"base_model_name_or_path": 123}, "invalid_config"),
    "r_string": ({"r": "4"}, "invalid_config"),
    "alpha_nan": ({"lora_alpha": float("nan")}, "invalid_config"),
    "rslora_string": ({"use_rslora": "yes"}, "invalid_config"),
    "alpha_pattern_value": ({"alpha_pattern": {"q_proj": "x"}}, "invalid_config"),
    "modules_to_save_number": ({"modules_to_save": 5}, "invalid_config"),
    "bias_number": ({"bias": 5}, "invalid_config"),
    "dora_string": ({"use_dora": "no"}, "invalid_config"),
    "fan_in_fan_out_number": ({"fan_in_fan_out": 1}, "invalid_config"),
    "layers_to_transform_string": ({"layers_to_transform": "0"}, "invalid_config"),
    "backreference": ({"rank_pattern": {r"(q)\1_proj": 4}}, "unsupported_pattern"),
    "lookahead": ({"alpha_pattern": {r"q(?=_proj)": 2}}, "unsupported_pattern"),
    "long_pattern": ({"rank_pattern": {"q" * 10_000: 4}}, "pattern_too_long"),
}
PATHOLOGICAL_MODULE = "model.layers.0." + "a" * 40 + "_proj"
SLEEP_KEY = "lorafold_test_sleep_s"
PID_FILE_KEY = "lorafold_test_pid_file"
BUDGET_S = 15.0


def files_of(directory: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())]


def with_config(directory: Path, **changes: Any) -> Path:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return directory


def assert_listing(api: TestClient, count: int) -> list[dict[str, Any]]:
    response = api.get("/v1/adapters")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert body["count"] == count
    return list(body["data"])


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_config_is_refused_and_nothing_is_stored(
        case: str, api: TestClient, ctx: ServiceContext, tmp_path: Path) -> None:
    changes, code = HOSTILE[case]
    bad = with_config(good_adapter(tmp_path / "bad"), **changes)
    response = api.post("/v1/adapters", files=files_of(bad), data={"name": case})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == code
    assert list(ctx.adapters.storage.list_keys("")) == []
    assert_listing(api, 0)
    good = api.post("/v1/adapters", files=files_of(good_adapter(tmp_path / "good")),
                    data={"name": "good"})
    assert good.status_code == 201, good.text
    assert_listing(api, 1)


def test_a_pathological_pattern_answers_promptly(api: TestClient, tmp_path: Path) -> None:
    """`(a+)+$` against a 40-'a' module name: hours on Python's re, a scan on RE2. The
    pattern does not match, so the module keeps r and the upload is accepted."""
    shapes = {PATHOLOGICAL_MODULE: (16, 12)}
    directory = write_random_adapter(tmp_path / "a", shapes, rank=4,
                                     config_overrides={"rank_pattern": {"(a+)+$": 2}})
    started = time.perf_counter()
    response = api.post("/v1/adapters", files=files_of(directory), data={"name": "redos"})
    assert response.status_code == 201, response.text
    assert time.perf_counter() - started < 60
    assert response.json()["r"] == 4 and response.json()["module_count"] == 1
    assert_listing(api, 1)

    matching = write_random_adapter(tmp_path / "b", shapes, rank=4,
                                    config_overrides={"rank_pattern": {"(a+)+_proj": 2}})
    refused = api.post("/v1/adapters", files=files_of(matching), data={"name": "redos-2"})
    assert refused.status_code == 422 and refused.json()["code"] == "rank_mismatch"
    assert_listing(api, 1)


def _record(**changes: Any) -> dict[str, Any]:
    summary = {"base_model": "synthetic/llama", "r": 4, "alpha": 8.0, "target_modules": ["q"],
               "module_count": 2, "dtype": "float32", "size_bytes": 10, "sha256": "ab" * 32}
    return {**adapter_record(summary, name="x", source="upload"), **changes}


def test_a_record_the_api_cannot_show_is_not_published(ctx: ServiceContext,
                                                        tmp_path: Path) -> None:
    directory = good_adapter(tmp_path / "good")
    for changes in ({"base_model": 123}, {"alpha": float("inf")}, {"r": "4"},
                    {"target_modules": 5}, {"source": "elsewhere"}):
        with pytest.raises(InvalidAdapter) as err:
            publish_adapter(store=ctx.adapters, tenant="tenant-a", adapter_id="ad_bad",
                            directory=directory, record=_record(**changes), work_dir=tmp_path)
        assert err.value.code == "invalid_adapter_record"
        assert next(iter(changes)) in err.value.message
    assert list(ctx.adapters.storage.list_keys("")) == []
    view = publish_adapter(store=ctx.adapters, tenant="tenant-a", adapter_id="ad_good",
                           directory=directory, record=_record(), work_dir=tmp_path)
    assert AdapterPublic.model_validate(view).id == "ad_good"


def test_a_bad_record_stored_earlier_does_not_break_the_listing(
        api: TestClient, ctx: ServiceContext, tmp_path: Path) -> None:
    """What the attacker left behind before the fix: the other adapters still list."""
    good = api.post("/v1/adapters", files=files_of(good_adapter(tmp_path / "good")),
                    data={"name": "good"})
    assert good.status_code == 201, good.text
    directory = good_adapter(tmp_path / "legacy")
    files = {p.name: p for p in directory.iterdir()}
    ctx.adapters.publish(tenant="tenant-a", adapter_id="ad_legacy", files=files,
                         archive=write_archive(files, tmp_path / "legacy.tar"),
                         record=_record(base_model=123))
    assert [a["id"] for a in assert_listing(api, 1)] == [good.json()["id"]]
    legacy = api.get("/v1/adapters/ad_legacy")  # was a 500: says what to do instead
    assert legacy.status_code == 409, legacy.text
    assert legacy.json()["code"] == "invalid_adapter_record"
    assert api.delete("/v1/adapters/ad_legacy").status_code in (200, 204)
    assert api.get("/v1/adapters/ad_legacy").status_code == 404


def test_the_view_check_covers_every_field_the_api_shows() -> None:
    from lorafold.service.adapters import AdapterViewSchema

    assert set(AdapterViewSchema.model_fields) == set(AdapterPublic.model_fields)


# -- the validator's budget ------------------------------------------------------------

def inspect_or_sleep(source: str, dest: str | None) -> dict[str, Any]:
    """The validator's task, but an adapter whose config has SLEEP_KEY first writes the
    process id to PID_FILE_KEY and sleeps that long: an overrun on demand."""
    config = Path(source) / "adapter_config.json"
    raw = json.loads(config.read_text()) if config.is_file() else {}
    if SLEEP_KEY in raw:
        Path(raw[PID_FILE_KEY]).write_text(str(os.getpid()))
        time.sleep(raw[SLEEP_KEY])
    return inspect_adapter(source, dest)


def sleeper(directory: Path, pid_file: Path) -> Path:
    return with_config(good_adapter(directory), **{SLEEP_KEY: 600, PID_FILE_KEY: str(pid_file)})


def wait_for(predicate: Any, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def is_gone(pid_file: Path) -> bool:
    try:
        return psutil.Process(int(pid_file.read_text())).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def slow_api(settings: Settings) -> Iterator[TestClient]:
    validator = ProcessValidator(1, timeout_s=BUDGET_S, task=inspect_or_sleep)
    context = ServiceContext(settings, validator=validator)
    app = create_app(settings, context=context)  # its start-up starts the validator
    try:
        with TestClient(app, headers={"Authorization": f"Bearer {KEYS['tenant-a']}"}) as client:
            yield client
    finally:
        context.close()


def test_an_overrun_is_killed_and_answered_422(slow_api: TestClient, tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    response = slow_api.post("/v1/adapters", files=files_of(sleeper(tmp_path / "s", pid_file)),
                             data={"name": "slow"})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "validation_timeout"
    assert time.monotonic() - started < BUDGET_S + 30  # not the 600 s it asked for
    assert wait_for(lambda: is_gone(pid_file), 30)
    assert_listing(slow_api, 0)
    good = slow_api.post("/v1/adapters", files=files_of(good_adapter(tmp_path / "good")),
                         data={"name": "good"})
    assert good.status_code == 201, good.text  # on the replacement process
    assert_listing(slow_api, 1)


def test_an_inspection_queued_behind_an_overrun_runs_again(tmp_path: Path) -> None:
    validator = ProcessValidator(1, timeout_s=BUDGET_S, task=inspect_or_sleep)
    pid_file = tmp_path / "pid"
    try:
        validator.start()
        with ThreadPoolExecutor(2) as threads:
            slow = threads.submit(validator.inspect, sleeper(tmp_path / "s", pid_file))
            assert wait_for(pid_file.exists, BUDGET_S)
            queued = threads.submit(validator.inspect, good_adapter(tmp_path / "good"))
            with pytest.raises(InvalidAdapter) as err:
                slow.result(timeout=BUDGET_S + 30)
            assert err.value.code == "validation_timeout"
            assert queued.result(timeout=BUDGET_S + 30).summary["module_count"] == len(SHAPES)
        assert wait_for(lambda: is_gone(pid_file), 30)
    finally:
        validator.close()
