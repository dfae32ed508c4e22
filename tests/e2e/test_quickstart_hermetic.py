"""The README in order: `lorafold up` in a directory, the client from the same directory,
then the test command run from there too. The stack leaves its API key in `./.lorafold/`
(and the user may have exported what it prints); the client finds the stack, the tests do
not (tests/conftest.py), so they pass while it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lorafold.cli.service_cmd import local_api_key
from lorafold.servers.process import free_port
from tests.up_process import lorafold_argv, start_up

CLIENT_TESTS = Path(__file__).resolve().parents[1] / "unit" / "service" / "test_service_cli.py"


def test_the_tests_pass_in_the_directory_of_a_running_quick_start(tmp_path: Path) -> None:
    project = tmp_path / "project"
    # --port: a free one rather than 8000, which may be someone else's
    stack = start_up(project, "--port", str(free_port()))
    try:
        key = local_api_key(stack.data_dir)
        assert key is not None
        listed = subprocess.run([*lorafold_argv(), "client", "list"], cwd=project,
                                capture_output=True, text=True, timeout=120, check=False)
        assert listed.returncode == 0, listed.stderr  # the second terminal finds the stack
        exported = {**os.environ, "LORAFOLD_URL": stack.url, "LORAFOLD_API_KEY": key}
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
             f"--basetemp={tmp_path / 'basetemp'}", str(CLIENT_TESTS)],
            cwd=project, env=exported, capture_output=True, text=True, timeout=300,
            check=False)
        assert tests.returncode == 0, tests.stdout[-4000:] + tests.stderr[-2000:]
        assert stack.process.alive()  # it ran against a live stack
    finally:
        assert stack.stop() == 0
