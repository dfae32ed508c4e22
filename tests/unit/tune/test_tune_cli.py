"""`lorafold merge --tune-data ... --base-model DIR`: a tuned merge from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafold.cli import main
from tests.unit.tune.conftest import TuneWorld
from tests.unlearn_world import jsonl


def _write_sets(world: TuneWorld, root: Path) -> list[str]:
    paths = []
    for t, ds in enumerate(world.sets):
        path = root / f"val{t}.jsonl"
        path.write_bytes(jsonl([{"prompt": e.prompt, "completion": e.completion} for e in ds]))
        paths.append(str(path))
    return paths


def test_a_tuned_merge_from_the_cli(tune_world: TuneWorld, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    sets = _write_sets(tune_world, tmp_path)
    out = tmp_path / "out"
    rc = main(["merge", *map(str, tune_world.tasks), "--rank", "4", "--out", str(out),
               "--tune-data", sets[0], "--tune-data", sets[1], "--base-model",
               str(tune_world.base_dir), "--tune", "5", "--tune-params", "lambda",
               "--quiet", "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "tuned lambda: 5 candidates" in printed
    lineage = json.loads((out / "lorafold.json").read_text())
    assert lineage["tuning"]["candidates_evaluated"] == 5
    assert lineage["parameters"]["scale"] == lineage["tuning"]["chosen"]["lambda"]


def test_tune_data_without_a_base_model_is_refused(tune_world: TuneWorld, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    sets = _write_sets(tune_world, tmp_path)
    rc = main(["merge", *map(str, tune_world.tasks), "--rank", "4", "--out",
               str(tmp_path / "out"), "--tune-data", sets[0], "--quiet"])
    assert rc != 0
    assert "base_model_required" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_malformed_validation_file_is_refused_with_its_line(tune_world: TuneWorld,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str],
                                                              ) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    rc = main(["merge", *map(str, tune_world.tasks), "--rank", "4", "--out",
               str(tmp_path / "out"), "--tune-data", str(bad), "--base-model",
               str(tune_world.base_dir), "--quiet"])
    assert rc != 0
    assert "invalid_json" in capsys.readouterr().err
