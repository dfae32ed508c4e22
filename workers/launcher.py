"""Start N worker processes: one per visible GPU (pinned with CUDA_VISIBLE_DEVICES), or
`settings.workers` CPU workers when there is none; supervise and stop them by PID.

This parent never imports torch: GPUs are counted from CUDA_VISIBLE_DEVICES or
`nvidia-smi`, so no CUDA context exists here to be inherited (and crash) in a child.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from lorafold.servers.process import ManagedProcess
from lorafold.settings import Settings

logger = logging.getLogger(__name__)

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
WARM_STOP_S = 5.0
COLD_STOP_S = 10.0


@dataclass(frozen=True)
class WorkerSpec:
    """One worker process to start: its name and the environment it gets."""

    name: str
    env: Mapping[str, str] = field(default_factory=dict)


def nvidia_smi_gpus(binary: str = "nvidia-smi") -> list[str]:
    """GPU indices as nvidia-smi lists them; [] when there is no driver or no GPU."""
    try:
        out = subprocess.run([binary, "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=15, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip().isdigit()]


def visible_gpus(settings: Settings) -> list[str]:
    """The GPUs workers may use: explicit setting, else the CUDA mask, else nvidia-smi."""
    if settings.gpus == "none":
        return []
    if settings.gpus != "auto":
        return settings.gpus.split(",")
    if settings.cuda_visible_devices is not None:
        return [d.strip() for d in settings.cuda_visible_devices.split(",")
                if d.strip() and d.strip() != "-1"]
    return nvidia_smi_gpus()


def plan_workers(settings: Settings, gpus: Sequence[str] | None = None) -> list[WorkerSpec]:
    """One pinned worker per GPU; else `settings.workers` CPU workers sharing the cores."""
    gpus = visible_gpus(settings) if gpus is None else list(gpus)
    if gpus:
        return [WorkerSpec(name=f"gpu{gpu}", env={
            "CUDA_VISIBLE_DEVICES": gpu, "LORAFOLD_WORKER_DEVICE": "cuda"}) for gpu in gpus]
    threads = settings.worker_threads or max(1, (os.cpu_count() or 1) // settings.workers)
    return [WorkerSpec(name=f"cpu{i}", env={
        "CUDA_VISIBLE_DEVICES": "", "LORAFOLD_WORKER_DEVICE": "cpu",
        "LORAFOLD_WORKER_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)})
        for i in range(settings.workers)]


def start_worker(spec: WorkerSpec, *, env: Mapping[str, str] | None = None,
                 log_dir: Path | None = None) -> ManagedProcess:
    argv = [sys.executable, "-m", "workers.worker", "--name", spec.name]
    log_path = log_dir / f"worker-{spec.name}.log" if log_dir is not None else None
    return ManagedProcess(name=f"worker {spec.name}", argv=argv,
                          env={**(env or {}), **spec.env}, log_path=log_path).start()


def _running(process: ManagedProcess) -> bool:
    return process.process is not None and process.process.poll() is None


def _signal_all(processes: Sequence[ManagedProcess], sig: signal.Signals) -> None:
    for process in processes:
        if process.process is not None:
            with contextlib.suppress(ProcessLookupError):
                process.process.send_signal(sig)


def _wait_all(processes: Sequence[ManagedProcess], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        assert process.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.process.wait(timeout=max(0.0, deadline - time.monotonic()))


def stop_workers(processes: Sequence[ManagedProcess], *, warm_s: float = WARM_STOP_S,
                 cold_s: float = COLD_STOP_S) -> None:
    """SIGTERM (RQ's warm shutdown: finish the current job), then SIGTERM again (cold
    shutdown: the worker kills its job's horse; the job is retried later), then SIGKILL.
    By PID only, all workers in parallel."""
    alive = [p for p in processes if _running(p)]
    _signal_all(alive, signal.SIGTERM)
    _wait_all(alive, max(warm_s, 1.1))  # RQ ignores a second signal within 1 s
    alive = [p for p in alive if _running(p)]
    _signal_all(alive, signal.SIGTERM)
    _wait_all(alive, cold_s)
    for process in alive:
        if _running(process):
            logger.warning("%s (pid %d) did not stop; killing it", process.name, process.pid)
            process.kill()


class WorkerPool:
    """The launcher's children: started from specs, restarted if they die, stopped by PID."""

    def __init__(self, specs: Sequence[WorkerSpec], *, env: Mapping[str, str] | None = None,
                 log_dir: Path | None = None) -> None:
        self.specs = list(specs)
        self.env = dict(env or {})
        self.log_dir = log_dir
        self.processes: list[ManagedProcess] = []
        self._restarts = [0] * len(self.specs)

    def start(self) -> WorkerPool:
        self.processes = [start_worker(s, env=self.env, log_dir=self.log_dir)
                          for s in self.specs]
        return self

    def check(self) -> None:
        """Restart any worker that exited, with a growing backoff."""
        for i, process in enumerate(self.processes):
            popen = process.process
            if popen is None or popen.poll() is None:
                continue
            delay = RESTART_BACKOFF_S[min(self._restarts[i], len(RESTART_BACKOFF_S) - 1)]
            logger.warning("%s (pid %d) exited with %s; restarting in %.0fs", process.name,
                           process.pid, popen.returncode, delay)
            time.sleep(delay)
            self._restarts[i] += 1
            self.processes[i] = start_worker(self.specs[i], env=self.env, log_dir=self.log_dir)

    def stop(self) -> None:
        stop_workers(self.processes)


def run_pool(settings: Settings, *, log_dir: Path | None = None,
             env: Mapping[str, str] | None = None) -> int:
    """Start the workers, supervise until SIGINT/SIGTERM, then stop them."""
    specs = plan_workers(settings)
    pool = WorkerPool(specs, env=env, log_dir=log_dir).start()
    logger.info("started %d workers: %s", len(specs),
                ", ".join(f"{p.name} (pid {p.pid})" for p in pool.processes))
    stopping = False

    def request_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping:
            time.sleep(0.5)
            pool.check()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        pool.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = Settings()
    logging.basicConfig(level=settings.log_level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_pool(settings)


if __name__ == "__main__":
    raise SystemExit(main())
