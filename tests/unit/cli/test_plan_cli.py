"""`lorafold plan`: the table, the JSON, the PNG, `--apply`, and its one-line refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lorafold.adapters import open_adapter
from lorafold.adapters.lineage import read_lineage
from lorafold.cli import main
from lorafold.merge.grouping import DEFAULT_MIN_SIMILARITY, RANK_CAP_FACTOR
from lorafold.synthetic import write_random_adapter
from tests.unit.merge.test_grouping import RANK, SHAPES, family, write_factors

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def paths(tmp_path: Path) -> list[str]:
    """a0, a1 sharing a subspace; a2 orthogonal to both."""
    f0, f1 = family(0)
    lone, _ = family(1, avoid=[f0, f1])
    return [write_factors(tmp_path / f"a{i}", f) for i, f in enumerate([f0, f1, lone])]


def plan_json(argv: list[str], capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["plan", *argv, "--json"]) == 0
    out: dict = json.loads(capsys.readouterr().out)
    return out


def test_table_and_json_say_the_same(paths: list[str],
                                     capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_json(paths, capsys)
    (group,) = plan["groups"]
    assert group["members"] == paths[:2] and plan["left_alone"] == [paths[2]]
    assert plan["rank"] == "auto" and plan["max_rank"] == RANK_CAP_FACTOR * RANK
    assert all(e["energy"] >= 0.9 for e in group["energies"])
    before, after = plan["parameters"]["before"], plan["parameters"]["after"]
    assert after < before
    assert main(["plan", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("3 adapters -> 2: 1 group, 1 left alone (rank auto, cap 16")
    assert lines[1].startswith(f"group-1  rank {group['rank']}  2 members")
    for e in group["energies"]:
        row = next(line for line in lines if line.strip().startswith(e["input"]))
        assert f"{e['energy']:.4f}" in row and e["module"] in row
    assert f"left alone: {paths[2]}" in lines
    assert f"parameters: {before:,} before -> {after:,} after" in "\n".join(lines)


def test_a_fixed_rank_and_max_groups_reach_the_planner(paths: list[str],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_json([*paths, "--rank", "8", "--min-similarity", "-1", "--max-groups", "2"],
                     capsys)
    assert plan["rank"] == 8 and plan["max_groups"] == 2 and plan["max_groups_reached"]
    assert [g["members"] for g in plan["groups"]] == [paths[:2]]   # stopped at 2 adapters
    assert plan["groups"][0]["rank"] == 8
    plan = plan_json([*paths, "--rank", "1", "--min-energy", "0.99"], capsys)
    assert plan["groups"] == [] and plan["left_alone"] == paths
    assert main(["plan", *paths, "--rank", "1", "--min-energy", "0.99"]) == 0
    assert "every adapter is left alone" in capsys.readouterr().out


def test_png_is_drawn_by_matplotlib(paths: list[str], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "plan.png"
    assert main(["plan", *paths, "--png", str(png)]) == 0
    data = png.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert b"Software" in data and b"Matplotlib" in data   # the tEXt chunk it writes
    assert f"drew {png}" in capsys.readouterr().out


def test_png_without_matplotlib_is_refused_in_one_line(
        paths: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # `import matplotlib` fails
    png = tmp_path / "plan.png"
    assert main(["plan", *paths, "--png", str(png)]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: missing_dependency: ")
    assert "pip install matplotlib" in captured.err and captured.err.count("\n") == 1
    assert captured.out == "" and not png.exists()


def test_apply_writes_each_group_merge(paths: list[str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["plan", *paths, "--apply", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {(out / 'group-1').resolve()} (group-1: 2 adapters" in printed
    assert sorted(p.name for p in out.iterdir()) == ["group-1"]   # a2 is left alone
    plan = plan_json(paths, capsys)
    (group,) = plan["groups"]
    with open_adapter(out / "group-1") as merged:
        merged.validate()
        assert merged.summary()["parameters"] == group["parameters"]
        assert merged.config.r == group["rank"]
    lineage = read_lineage(out / "group-1")
    assert lineage is not None
    assert [i["label"] for i in lineage["inputs"]] == group["members"]
    assert lineage["parameters"]["method"] == "ctm"
    assert lineage["parameters"]["output_rank"] == group["rank"]


def test_json_lists_what_apply_wrote(paths: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    plan = plan_json([*paths, "--apply", str(tmp_path / "o"), "--device", "cpu"], capsys)
    assert plan["applied"] == [{"group": "group-1",
                                "out_dir": str((tmp_path / "o" / "group-1").resolve())}]


def test_bad_inputs_exit_2_with_one_line(paths: list[str], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plan", paths[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: too_few_inputs: ") and err.count("\n") == 1
    other = str(write_random_adapter(tmp_path / "other", SHAPES, rank=RANK,
                                     base_model="someone/else"))
    assert main(["plan", paths[0], other]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: base_model_mismatch: ") and err.count("\n") == 1
    assert main(["plan", paths[0], other, "--force"]) == 0
    capsys.readouterr()
    assert main(["plan", *paths, "--rank", "4", "--max-rank", "8"]) == 2
    assert capsys.readouterr().err.startswith("error: invalid_parameter: ")
    for argv in (["--bogus"], ["--rank", "x"]):   # usage errors, as in every command
        with pytest.raises(SystemExit) as exit_:
            main(["plan", *paths, *argv])
        assert exit_.value.code == 2


def test_help_states_the_planners_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"default {RANK_CAP_FACTOR} × the largest input rank" in text
    assert f"(default {DEFAULT_MIN_SIMILARITY:g})" in text
    assert "(default: 0.9)" in text and "(default auto)" in text
