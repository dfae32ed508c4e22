"""Work directories of attempts: locked while in use, swept once their process is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorafold.service.workdirs import LOCK_SUFFIX, attempt_dir, sweep_work_dirs, work_root

HOLD = """
import sys, time
from pathlib import Path
from lorafold.service.workdirs import attempt_dir
with attempt_dir(Path(sys.argv[1]), sys.argv[2]) as path:
    (path / "inputs.bin").write_bytes(b"x" * 1024)
    print(path, flush=True)
    time.sleep(600)
"""


def hold_in_child(spool: Path, job_id: str) -> tuple[subprocess.Popen[str], Path]:
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(spool), job_id],
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    return child, Path(child.stdout.readline().strip())


def test_a_live_attempts_dir_survives_and_a_killed_ones_is_swept(tmp_path: Path) -> None:
    live, live_dir = hold_in_child(tmp_path, "job_live")
    dead, dead_dir = hold_in_child(tmp_path, "job_dead")
    try:
        os.kill(dead.pid, signal.SIGKILL)  # a horse killed mid-job: its dir stays behind
        dead.wait(timeout=30)
        assert (dead_dir / "inputs.bin").exists()
        with attempt_dir(tmp_path, "job_mine") as mine:  # this process's own attempt
            removed = sweep_work_dirs(tmp_path)
            assert removed == [dead_dir]
            assert mine.is_dir() and live_dir.is_dir()
            assert not dead_dir.with_name(dead_dir.name + LOCK_SUFFIX).exists()
        assert not mine.exists()  # an attempt that ends removes its own
    finally:
        for child in (live, dead):
            child.kill()
            child.wait(timeout=30)
            assert child.stdout is not None
            child.stdout.close()
    assert sweep_work_dirs(tmp_path) == [live_dir]
    assert list(work_root(tmp_path).iterdir()) == []


def test_sweeping_an_empty_spool_is_harmless(tmp_path: Path) -> None:
    assert sweep_work_dirs(tmp_path) == []
    started = time.perf_counter()
    with attempt_dir(tmp_path, "job_a") as path:
        assert path.parent == work_root(tmp_path) and path.name.startswith("job_a-")
    assert time.perf_counter() - started < 5
