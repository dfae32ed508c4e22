"""`lorafold up` as the user runs it: a child process in a directory of the test's, read
through its output, stopped by PID with SIGTERM (it then stops what it started)."""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lorafold.servers.process import ManagedProcess
from lorafold.settings import LOCAL_DATA_DIR

UP_LINE = re.compile(r"lorafold is up at (http://\S+)")


def lorafold_argv() -> list[str]:
    """The `lorafold` console script of this environment (what the README runs)."""
    script = Path(sys.executable).parent / "lorafold"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lorafold"]


def with_default_port(port: int) -> list[str]:
    """`lorafold` with its default API port (8000) replaced: a test never touches 8000."""
    code = ("import sys; from lorafold.cli import main, service_cmd; "
            "service_cmd.DEFAULT_PORT = int(sys.argv[1]); sys.exit(main(sys.argv[2:]))")
    return [sys.executable, "-c", code, str(port)]


@dataclass
class UpProcess:
    cwd: Path
    process: ManagedProcess
    url: str = ""

    @property
    def data_dir(self) -> Path:
        return self.cwd / LOCAL_DATA_DIR

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        log = self.process.log_path
        return log.read_text(errors="replace") if log is not None and log.exists() else ""

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM it (it stops its children by PID) and return its exit code."""
        self.process.stop(timeout=timeout)
        return self.process.process.returncode if self.process.process else None


def start_up(cwd: Path, *args: str, argv: list[str] | None = None,
             timeout: float = 120.0) -> UpProcess:
    """Start `lorafold up ARGS` in `cwd` and return once it says it is up (its URL)."""
    cwd.mkdir(parents=True, exist_ok=True)
    process = ManagedProcess(name="lorafold up", argv=[*(argv or lorafold_argv()), "up", *args],
                             cwd=cwd, log_path=cwd / "up.log").start()
    up = UpProcess(cwd=cwd, process=process)
    deadline = time.monotonic() + timeout
    try:
        while not (found := UP_LINE.search(up.output())):
            if not process.alive():
                raise RuntimeError(f"lorafold up exited: {up.output()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"lorafold up not up after {timeout:.0f}s: "
                                   f"{up.output()[-3000:]}")
            time.sleep(0.1)
    except BaseException:
        up.stop()
        raise
    up.url = found.group(1)
    return up
