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
