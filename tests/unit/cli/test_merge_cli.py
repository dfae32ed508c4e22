"""`lorafold merge`: its options reach the lineage, bad values are refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafold.cli import build_parser, main
from lorafold.merge.methods import DEFAULT_BETA
from lorafold.merge.plan import DEFAULT_METHOD, DEFAULT_RULE
from lorafold.merge.subspaces import DEFAULT_SUBSPACE
from lorafold.synthetic import write_random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (20, 12)}


@pytest.fixture
def inputs(tmp_path: Path) -> list[str]:
    return [str(write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i))
            for i in range(3)]


def test_new_options_are_recorded_in_the_lineage(inputs: list[str], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m"
    rc = main(["merge", *inputs, "--rank", "4", "--beta", "0.25", "--subspace", "hosvd",
               "--rule", "dare_ties", "--density", "0.3", "--drop", "0.2", "--seed", "7",
               "--out", str(out), "--quiet"])
    assert rc == 0
    written = json.loads((out / "lorafold.json").read_text())
    parameters = written["parameters"]
    assert {k: parameters[k] for k in ("method", "rule", "rank", "density", "drop", "beta",
                                       "subspace", "seed")} == {
        "method": "ctm", "rule": "dare_ties", "rank": 4, "density": 0.3, "drop": 0.2,
        "beta": 0.25, "subspace": "hosvd", "seed": 7}
    assert "balance" not in parameters
    printed = capsys.readouterr().out
    assert "ctm/dare_ties" in printed
    subspaces = written["report"]["subspaces"]
    assert subspaces["mode"] == "hosvd"
    line = next(row for row in printed.splitlines() if row.startswith("subspaces:"))
    assert "hosvd" in line and f"{subspaces['mean_energy']:.4f}" in line


def test_defaults_come_from_the_core(inputs: list[str], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["merge", *inputs, "--out", "x"])
    assert (args.method, args.rule) == (DEFAULT_METHOD, None)
    assert (args.beta, args.subspace, args.drop, args.density) == (None, None, None, None)
    assert main(["merge", *inputs, "--rank", "4", "--out", str(tmp_path / "m"),
                 "--quiet"]) == 0
    parameters = json.loads((tmp_path / "m" / "lorafold.json").read_text())["parameters"]
    assert (parameters["beta"], parameters["subspace"]) == (DEFAULT_BETA, DEFAULT_SUBSPACE)
    assert parameters["rule"] == DEFAULT_RULE
    # cat takes no rule: its default is the plain weighted sum whatever DEFAULT_RULE is
    assert main(["merge", *inputs, "--method", "cat", "--out", str(tmp_path / "c"),
                 "--quiet"]) == 0
    assert json.loads((tmp_path / "c" / "lorafold.json").read_text())["parameters"][
        "rule"] == "ta"
    assert f"subspaces: {DEFAULT_SUBSPACE}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["merge", "--help"])
    text = capsys.readouterr().out
    assert f"default {DEFAULT_METHOD}" in text and f"default {DEFAULT_BETA}" in text


def test_mtc_with_iso_is_accepted(inputs: list[str], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["merge", *inputs, "--method", "mtc", "--rule", "iso", "--rank", "4",
                 "--out", str(tmp_path / "m"), "--quiet"]) == 0
    assert "subspaces:" not in capsys.readouterr().out  # ctm only


@pytest.mark.parametrize(("options", "word"), [
    (["--beta", "2"], "beta"),
    (["--beta", "-0.5"], "beta"),
    (["--beta", "nan"], "beta"),
    (["--method", "mtc", "--beta", "0.5"], "beta"),
    (["--method", "core", "--subspace", "hooi"], "subspace"),
    (["--rule", "dare", "--density", "0.5"], "drop"),
    (["--rule", "dare", "--drop", "1"], "drop"),
    (["--rule", "ties", "--drop", "0.2"], "drop"),
    (["--rule", "ties", "--density", "0"], "density"),
])
def test_bad_values_exit_nonzero_and_write_nothing(
        inputs: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
        options: list[str], word: str) -> None:
    out = tmp_path / "m"
    rc = main(["merge", *inputs, "--rank", "4", *options, "--out", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0
    assert err.startswith("error: invalid_parameter: ") and err.strip().count("\n") == 0
    assert word in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".m")]


def test_a_subspace_mode_outside_the_choices_is_a_usage_error(
        inputs: list[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["merge", *inputs, "--rank", "4", "--subspace", "x", "--out", str(tmp_path / "m")])
    assert exit_.value.code == 2
    assert not (tmp_path / "m").exists()


def test_rank_auto_picks_the_cores_rank_and_remove_stays_exact(inputs: list[str],
                                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lorafold.adapters import open_adapter
    from lorafold.merge.auto_rank import auto_rank

    out = tmp_path / "auto"
    assert main(["merge", *inputs, "--rank", "auto:0.95", "--out", str(out), "--quiet"]) == 0
    written = json.loads((out / "lorafold.json").read_text())
    with open_adapter(inputs[0]) as a, open_adapter(inputs[1]) as b, \
            open_adapter(inputs[2]) as c:
        expected = auto_rank([a, b, c], energy=0.95)
    assert written["report"]["auto_rank"]["rank"] == expected.rank
    assert written["parameters"]["output_rank"] == expected.rank
    assert (written["parameters"]["rank"], written["parameters"]["min_energy"]) == (None, 0.95)
    # removing a constituent re-merges with rank auto, as a direct merge of the rest would
    removed, direct = tmp_path / "removed", tmp_path / "direct"
    assert main(["unlearn", "remove", str(out), "--remove", inputs[2], "--inputs", *inputs,
                 "--out", str(removed)]) == 0
    assert main(["merge", inputs[0], inputs[1], "--rank", "auto:0.95", "--out", str(direct),
                 "--quiet"]) == 0
    a_removed = load_file(str(removed / "adapter_model.safetensors"))
    a_direct = load_file(str(direct / "adapter_model.safetensors"))
    assert a_removed.keys() == a_direct.keys()
    assert all(bool((a_removed[k] - a_direct[k]).abs().max() <= 1e-6) for k in a_direct)
    with pytest.raises(SystemExit):  # a usage error
        main(["merge", *inputs, "--rank", "auto:x", "--out", str(tmp_path / "bad")])
    assert main(["merge", *inputs, "--rank", "auto", "--method", "mtc", "--quiet",
                 "--out", str(tmp_path / "bad")]) != 0  # rank auto measures CtM only
    assert not (tmp_path / "bad").exists()
