"""The client side starts light: importing the client, or running `lorafold --help` or
`lorafold client ...`, loads no torch, safetensors or transformers (2–3 s of CPU on every
call), nor the server's web and queue libraries. Each case runs in a fresh interpreter,
which prints what of those it has in `sys.modules`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "safetensors", "transformers", "fastapi", "starlette", "uvicorn", "redis",
         "rq", "boto3")

REPORT = """
import json, sys
loaded = sorted({heavy!r} & {{name.split(".")[0] for name in sys.modules}})
print("LOADED=" + json.dumps(loaded))
"""
RUN_CLI = """
import runpy, sys
sys.argv = ["lorafold", *{argv!r}]
try:
    runpy.run_module("lorafold", run_name="__main__")
except SystemExit as e:
    print("EXIT", e.code)
"""


def probe(code: str) -> tuple[list[str], subprocess.CompletedProcess[str]]:
    """What of HEAVY a fresh interpreter has loaded after running `code`."""
    done = subprocess.run([sys.executable, "-c", code + REPORT.format(heavy=set(HEAVY))],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED="))
    loaded: list[str] = json.loads(line.removeprefix("LOADED="))
    return loaded, done


@pytest.mark.parametrize("module", ["lorafold.client", "lorafold.cli.client_cmd",
                                    "lorafold.merge.options"])
def test_importing_the_client_loads_nothing_heavy(module: str) -> None:
    assert probe(f"import {module}")[0] == []


@pytest.mark.parametrize("argv", [
    ["--help"], ["client", "--help"], ["client", "merge", "--help"],
    ["merge", "--help"], ["plan", "--help"], ["inspect", "--help"], ["demo", "--help"],
    ["unlearn", "data", "--help"],
], ids=" ".join)
def test_help_loads_nothing_heavy(argv: list[str]) -> None:
    loaded, done = probe(RUN_CLI.format(argv=argv))
    assert "EXIT 0" in done.stdout and "usage: lorafold" in done.stdout, done.stderr
    assert loaded == []


def test_a_client_command_fails_fast_without_loading_anything_heavy() -> None:
    """`lorafold client list` to a port where nothing listens: one clear line, exit 2."""
    loaded, done = probe(RUN_CLI.format(
        argv=["client", "--url", "http://127.0.0.1:9", "--api-key", "k", "list"]))
    assert "EXIT 2" in done.stdout, done.stderr
    assert done.stderr.startswith("error: unreachable: cannot reach http://127.0.0.1:9")
    assert loaded == []
