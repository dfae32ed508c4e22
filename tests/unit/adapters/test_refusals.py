"""Every refused adapter gets its own code, through the library and the CLI, and nothing
is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafold.adapters import open_adapter
from lorafold.cli import main
from lorafold.errors import InvalidAdapter
from lorafold.merge import MergeRequest, merge_adapters
from tests.adapter_cases import CASES, good_adapter


@pytest.mark.parametrize("case", sorted(CASES))
def test_library_refuses_with_its_code(case: str, tmp_path: Path) -> None:
    build, code = CASES[case]
    source = build(tmp_path / "in")
    with pytest.raises(InvalidAdapter) as err, open_adapter(source) as adapter:
        adapter.validate()
    assert err.value.code == code
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize("case", sorted(CASES))
def test_merge_refuses_and_writes_nothing(case: str, tmp_path: Path) -> None:
    build, code = CASES[case]
    bad = build(tmp_path / "bad")
    good = good_adapter(tmp_path / "good")
    out = tmp_path / "out"
    with pytest.raises(InvalidAdapter) as err:
        merge_adapters([good, bad], out, MergeRequest(method="ctm", rank=4))
    assert err.value.code == code
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_exits_nonzero_with_one_line(case: str, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    build, code = CASES[case]
    bad = build(tmp_path / "bad")
    good = good_adapter(tmp_path / "good")
    out = tmp_path / "out"
    rc = main(["merge", str(good), str(bad), "--rank", "4", "--out", str(out), "--quiet"])
    captured = capsys.readouterr()
    assert rc != 0
    assert captured.err.strip().count("\n") == 0
    assert captured.err.startswith(f"error: {code}:")
    assert not out.exists()


def test_inspect_reports_the_verdict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = good_adapter(tmp_path / "good")
    assert main(["inspect", str(good)]) == 0
    assert "VALID" in capsys.readouterr().out
    bad, _ = CASES["nan"]
    assert main(["inspect", str(bad(tmp_path / "bad"))]) != 0
    assert "non_finite" in capsys.readouterr().err


def test_error_message_names_the_offending_key(tmp_path: Path) -> None:
    build, _ = CASES["missing_half"]
    with pytest.raises(InvalidAdapter) as err:
        open_adapter(build(tmp_path / "in"))
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in err.value.message
