"""The API's validator processes: refusals keep their code across the process boundary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lorafold.errors import InvalidAdapter
from lorafold.service.validation import ProcessValidator
from tests.adapter_cases import CASES, good_adapter


def test_process_validator(tmp_path: Path) -> None:
    validator = ProcessValidator(1, timeout_s=120)
    try:
        validator.start()
        good = good_adapter(tmp_path / "good")
        archive = Path(shutil.make_archive(str(tmp_path / "good"), "gztar", good))
        inspection = validator.inspect(archive, dest=tmp_path / "unpacked")
        assert inspection.summary["module_count"] == 2
        assert (inspection.directory / "adapter_model.safetensors").exists()
        for case in ("nan", "zip_escape", "pickle_bin"):
            build, code = CASES[case]
            with pytest.raises(InvalidAdapter) as err:
                validator.inspect(build(tmp_path / case))
            assert err.value.code == code
    finally:
        validator.close()


def test_an_unforeseen_error_in_the_validator_is_a_refusal_not_a_500(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever a hostile file makes the reader raise comes back as a coded refusal."""
    from lorafold.errors import InvalidAdapter
    from lorafold.service import validation

    def broken(*args: object, **kwargs: object) -> None:
        raise KeyError("a path no check foresaw")

    monkeypatch.setattr(validation, "open_adapter", broken)
    reply = validation.inspect_adapter(str(tmp_path))
    assert reply["error"]["code"] == "unreadable_adapter"
    with pytest.raises(InvalidAdapter):
        validation._result(reply)
