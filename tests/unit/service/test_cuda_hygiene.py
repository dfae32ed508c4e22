"""CUDA hygiene, checked on any machine: a worker's parent (the process RQ forks job
processes from) never asks CUDA anything — a CUDA driver initialised before a fork breaks
the children — and a merge lets go of each module's tensors before the next but one.

The first test runs in a fresh interpreter whose torch.cuda entry points record calls, so
it holds on a CPU-only torch too (where they would return at once, unnoticed)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import weakref
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from lorafold.merge import MergeRequest, merge_adapters
from lorafold.merge import methods as merge_methods
from lorafold.merge.methods import MethodInput, MethodOutput
from lorafold.synthetic import llama_module_shapes, write_random_adapter

PROBE = """
import json, sys
import torch, torch.cuda
calls = []
def recording(name, real):
    def call(*args, **kwargs):
        calls.append(name)
        return real(*args, **kwargs)
    return call
for name in ("is_available", "device_count", "init", "_lazy_init", "current_device",
             "get_device_name", "mem_get_info", "empty_cache", "synchronize"):
    setattr(torch.cuda, name, recording(name, getattr(torch.cuda, name)))

import lorafold.merge, lorafold.service.merge_job, lorafold.service.unlearn_job  # noqa
import workers.tasks, workers.worker
workers.worker.preload()
from lorafold.settings import Settings
from lorafold.service.context import ServiceContext
ctx = ServiceContext(Settings(environment="test", redis_url="redis://127.0.0.1:9/0",
                              storage_url=sys.argv[1]))
ctx.prepare_for_fork()
print("CALLS=" + json.dumps(calls))
print("INITIALISED=" + json.dumps(torch.cuda.is_initialized()))
"""


def test_a_workers_parent_never_touches_cuda(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "storage")],
                          capture_output=True, text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)
    assert json.loads(lines["CALLS"]) == []
    assert json.loads(lines["INITIALISED"]) is False


def test_a_merge_drops_each_modules_tensors_after_it(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the device, a module's inputs and outputs are released as the merge moves
    on: only the two modules in the pipeline may still be alive (on a GPU, that is what
    keeps its memory at a module's worth; `release_device_memory` returns the cache)."""
    shapes = llama_module_shapes(2, hidden=24, intermediate=40)
    inputs = [write_random_adapter(tmp_path / f"a{i}", shapes, rank=3, seed=i)
              for i in range(3)]
    alive_per_module: list[int] = []
    refs: list[list[weakref.ref[torch.Tensor]]] = []
    real = merge_methods.METHODS["ctm"]

    def recording(inp: MethodInput) -> MethodOutput:
        gc.collect()
        alive_per_module.append(sum(any(r() is not None for r in module) for module in refs))
        out = real.fn(inp)
        refs.append([weakref.ref(t) for pair in inp.factors for t in pair]
                    + [weakref.ref(out.b), weakref.ref(out.a)])
        return out

    monkeypatch.setitem(merge_methods.METHODS, "ctm", replace(real, fn=recording))
    merge_adapters(inputs, tmp_path / "out", MergeRequest(method="ctm", rank=3), device="cpu",
                   read_ahead=1)    # with the reader and writer threads (a GPU merge's way)
    assert len(alive_per_module) == len(shapes)
    assert max(alive_per_module) <= 2, alive_per_module   # the previous module, at most
