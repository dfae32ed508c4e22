"""`lorafold unlearn data` on the tiny fact world: base model found by name, JSONL in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafold.adapters.lineage import read_lineage
from lorafold.cli import main
from lorafold.unlearn.datasets import TextDataset
from tests.unlearn_world import BASE_NAME, FactWorld


def write_jsonl(path: Path, data: TextDataset) -> Path:
    path.write_text("".join(json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
                            for e in data.examples))
    return path


def test_cli_unlearns_by_base_model_name(fact_world: FactWorld, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["unlearn", "data", "--base-model", BASE_NAME,
               "--model-dir", str(fact_world.base_dir.parents[len(BASE_NAME.split("/")) - 1]),
               "--adapter", str(fact_world.adapter_dir),
               "--forget", str(write_jsonl(tmp_path / "forget.jsonl", fact_world.forget)),
               "--retain", str(write_jsonl(tmp_path / "retain.jsonl", fact_world.retain)),
               "--holdout", str(write_jsonl(tmp_path / "holdout.jsonl", fact_world.holdout)),
               "--method", "grad_diff", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    printed = capsys.readouterr().out
    metrics = json.loads(printed[printed.index("{"):])
    assert metrics["after"]["forget_accuracy"] < metrics["before"]["forget_accuracy"]
    lineage = read_lineage(out)
    assert lineage is not None and lineage["kind"] == "unlearn"


def test_cli_refuses_an_unknown_base_model(fact_world: FactWorld, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    forget = write_jsonl(tmp_path / "forget.jsonl", fact_world.forget)
    rc = main(["unlearn", "data", "--base-model", "nobody/nothing", "--model-dir", str(tmp_path),
               "--adapter", str(fact_world.adapter_dir), "--forget", str(forget),
               "--out", str(tmp_path / "out")])
    assert rc == 2
    assert "base_model_not_found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
