"""What machine a benchmark ran on and how it was run, recorded beside its results (shared
by the scripts)."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch


def machine_info(threads: int, libraries: Sequence[str] = ("transformers", "peft")
                 ) -> dict[str, Any]:
    """CPU model, cores, memory, torch thread count and the versions of `libraries`."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), model)
    info: dict[str, Any] = {"cpu_model": model, "cores": os.cpu_count(),
                            "torch_threads": threads, "torch": torch.__version__,
                            "python": platform.python_version(),
                            "platform": platform.platform()}
    with contextlib.suppress(OSError, ValueError, IndexError), \
            open("/proc/meminfo", encoding="utf-8") as f:
        info["mem_gb"] = round(int(f.readline().split()[1]) / 1e6, 1)
    for name in libraries:
        with contextlib.suppress(ImportError):
            info[name] = __import__(name).__version__
    return info


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run (`argv` as `main` got it; None: sys.argv)."""
    return shlex.join([sys.executable, *(sys.argv if argv is None else [script, *argv])])


def write_json(result: Any, out: Path) -> None:
    """A benchmark's result as indented JSON, its folder made if need be."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
