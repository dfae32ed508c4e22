"""A command run imports only its own module: `lorafold merge` loads no HTTP client, no
service settings and no queue; the other commands still show in `--help`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from lorafold.cli import COMMANDS, build_parser
from lorafold.synthetic import write_random_adapter

SERVICE_SIDE = ("httpx", "rich", "pydantic_settings", "workers", "redis", "rq", "boto3",
                "lorafold.client", "lorafold.settings", "lorafold.service")


def help_lines(parser: argparse.ArgumentParser) -> dict[str, str | None]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {action.dest: action.help for action in sub._choices_actions}


def test_the_listed_help_lines_are_the_commands_own() -> None:
    full = help_lines(build_parser())
    assert full == {name: line for name, (_, line) in COMMANDS.items()}
    assert help_lines(build_parser(load=[])) == full          # listed without importing


def test_a_merge_run_loads_only_what_merging_needs(tmp_path: Path) -> None:
    shapes = {"model.layers.0.self_attn.q_proj": (8, 6)}
    inputs = [str(write_random_adapter(tmp_path / f"a{i}", shapes, rank=2, seed=i))
              for i in range(2)]
    code = f"""
import json, runpy, sys
sys.argv = ["lorafold", "merge", *{inputs!r}, "--rank", "2", "--out", {str(tmp_path / "m")!r},
            "--quiet"]
try:
    runpy.run_module("lorafold", run_name="__main__")
except SystemExit as e:
    print("EXIT", e.code)
names = set(sys.modules)
print("LOADED=" + json.dumps(sorted(n for n in {SERVICE_SIDE!r}
                                    if n in names or any(m.startswith(n + ".") for m in names))))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=False)
    assert "EXIT 0" in done.stdout, done.stderr
    line = next(x for x in done.stdout.splitlines() if x.startswith("LOADED="))
    assert json.loads(line.removeprefix("LOADED=")) == []
    assert (tmp_path / "m" / "adapter_model.safetensors").exists()
