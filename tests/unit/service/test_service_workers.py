"""Worker planning (GPU pinning without touching CUDA) and the abandoned-job deadline."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from lorafold.settings import Settings
from workers.launcher import nvidia_smi_gpus, plan_workers, visible_gpus
from workers.worker import LorafoldWorker


def test_one_pinned_worker_per_gpu() -> None:
    specs = plan_workers(Settings(gpus="0,1"))
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in specs] == ["0", "1"]
    assert all(s.env["LORAFOLD_WORKER_DEVICE"] == "cuda" for s in specs)
    assert len({s.name for s in specs}) == 2


def test_cuda_mask_is_respected() -> None:
    settings = Settings(CUDA_VISIBLE_DEVICES="2,3")
    assert visible_gpus(settings) == ["2", "3"]
    assert visible_gpus(Settings(CUDA_VISIBLE_DEVICES="")) == []
    assert visible_gpus(Settings(CUDA_VISIBLE_DEVICES="-1")) == []


def test_cpu_workers_share_the_cores() -> None:
    specs = plan_workers(Settings(gpus="none", workers=2))
    assert len(specs) == 2
    for spec in specs:
        assert spec.env["CUDA_VISIBLE_DEVICES"] == ""
        assert spec.env["LORAFOLD_WORKER_DEVICE"] == "cpu"
        assert int(spec.env["OMP_NUM_THREADS"]) == max(1, (os.cpu_count() or 1) // 2)


def test_nvidia_smi_is_parsed(tmp_path: Path) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    assert nvidia_smi_gpus(str(fake)) == ["0", "1"]
    assert nvidia_smi_gpus(str(tmp_path / "missing")) == []


def test_launcher_never_imports_torch() -> None:
    """The launcher starts workers with fork+exec, and never loads torch (let alone CUDA)."""
    code = ("import sys, workers.launcher; "
            "workers.launcher.plan_workers(workers.launcher.Settings()); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"


def test_abandoned_deadline_comes_from_settings() -> None:
    """RQ renews a running job's registry entry every monitoring interval and lets it
    expire 60 s later; ours expires `abandoned_after_s` later instead."""
    worker = SimpleNamespace(job_monitoring_interval=5, abandoned_after_s=20)
    ttl = LorafoldWorker.get_heartbeat_ttl
    assert ttl(worker, SimpleNamespace(timeout=3600)) == 5 + 20  # type: ignore[arg-type]
    assert ttl(worker, SimpleNamespace(timeout=3600),  # type: ignore[arg-type]
               working_time=3598.0) == 2 + 20
    assert ttl(worker, SimpleNamespace(timeout=None)) == 25  # type: ignore[arg-type]
