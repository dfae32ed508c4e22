"""tests/conftest.py keeps the user's state out of the tests: a `.lorafold/` in the working
directory (as the quick start's `lorafold up` leaves it), LORAFOLD_* variables, HOME and
HF_HOME. The first test is what every test sees; the second plants that state and runs the
first, and the client test that used to pick the key up, in a pytest of their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafold.cli import build_parser, client_cmd
from lorafold.cli.service_cmd import local_api_key, write_private_json, write_stack_record
from lorafold.errors import InvalidRequest
from lorafold.settings import DEFAULT_URL, LOCAL_DATA_DIR, ClientSettings

THIS_FILE = Path(__file__).resolve()
CLI_TESTS = THIS_FILE.parent / "unit" / "service" / "test_service_cli.py"
PLANTED = ".planted-by-test-hermetic"  # marks the directories the user's state points to
BOGUS_KEY = "lf_bogus-key-planted-by-test-hermetic"
BOGUS_URL = "http://127.0.0.1:9"  # discard port: nothing answers


def test_a_test_sees_none_of_the_users_state() -> None:
    assert not [name for name in os.environ if name.startswith("LORAFOLD_")]
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    for directory in (Path.cwd(), Path.home(), hf_home):
        assert not (directory / PLANTED).exists(), directory
    assert not LOCAL_DATA_DIR.exists()
    # what `lorafold client` does to find its URL and key
    settings = ClientSettings()
    assert settings.url == DEFAULT_URL
    assert settings.api_key is None
    assert local_api_key() is None
    with pytest.raises(InvalidRequest, match="no API key"):
        client_cmd._client(build_parser().parse_args(["client", "list"]))


def plant_users_state(root: Path) -> tuple[Path, dict[str, str]]:
    """A working directory and an environment as the quick start leaves them, all bogus."""
    cwd, home = root / "project", root / "home"
    hf_home = home / ".cache" / "huggingface"
    data_dir = cwd / LOCAL_DATA_DIR
    for directory in (data_dir, hf_home):
        directory.mkdir(parents=True)
    write_private_json(data_dir / "api_keys.json", {BOGUS_KEY: "default"})  # as `up` does
    write_stack_record(data_dir, BOGUS_URL)  # names this (live) process
    for directory in (cwd, home, hf_home):
        (directory / PLANTED).touch()
    env = {**os.environ, "HOME": str(home), "HF_HOME": str(hf_home),
           "LORAFOLD_URL": BOGUS_URL, "LORAFOLD_API_KEY": BOGUS_KEY,
           "LORAFOLD_API_KEYS": json.dumps({BOGUS_KEY: "default"})}
    return cwd, env


def test_the_users_state_does_not_reach_the_tests(tmp_path: Path) -> None:
    cwd, env = plant_users_state(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"--basetemp={tmp_path / 'basetemp'}",
         f"{THIS_FILE}::test_a_test_sees_none_of_the_users_state",
         f"{CLI_TESTS}::test_client_without_a_key_says_so"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=240, check=False)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout
    assert (cwd / LOCAL_DATA_DIR / "api_keys.json").exists()  # still planted, just unseen
