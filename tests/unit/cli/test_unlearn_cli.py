"""`lorafold unlearn remove|negate` end to end on synthetic adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafold.adapters.lineage import read_lineage
from lorafold.cli import main
from lorafold.synthetic import write_random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12)}


def test_remove_then_negate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = [str(write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i))
              for i in range(3)]
    assert main(["merge", *inputs, "--rank", "6", "--out", str(tmp_path / "m"), "--quiet"]) == 0
    rc = main(["unlearn", "remove", str(tmp_path / "m"), "--remove", inputs[1],
               "--inputs", *inputs, "--out", str(tmp_path / "r")])
    assert rc == 0
    lineage = read_lineage(tmp_path / "r")
    assert lineage is not None
    assert [e["label"] for e in lineage["inputs"]] == [inputs[0], inputs[2]]
    capsys.readouterr()
    rc = main(["unlearn", "remove", str(tmp_path / "m"), "--remove", inputs[1],
               "--inputs", inputs[0], inputs[1], "--out", str(tmp_path / "r2")])
    assert rc == 2 and "constituent_missing" in capsys.readouterr().err
    assert not (tmp_path / "r2").exists()
    assert main(["unlearn", "negate", inputs[0], inputs[1], "--strength", "0.5",
                 "--out", str(tmp_path / "n")]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed[printed.index("{"):])["kind"] == "negate"
