"""What machine a benchmark ran on, recorded beside its results (shared by the scripts)."""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Sequence
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
