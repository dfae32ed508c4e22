"""Start and stop local server processes we own (Redis, SeaweedFS, API, workers).

We only ever stop the processes we started, by PID (and their process group), never by
name. Servers bind to 127.0.0.1 on free ports.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` (default 127.0.0.1) that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a server could listen on host:port now. SO_REUSEADDR as uvicorn and Redis
    set it, so connections of a stopped server still in TIME_WAIT do not count as taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def wait_for_port(port: int, *, host: str = "127.0.0.1", timeout: float = 30.0,
                  process: subprocess.Popen[bytes] | None = None) -> None:
    """Block until something accepts connections on host:port, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with code {process.returncode} before "
                               f"listening on {host}:{port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout:.0f}s")


@dataclass
class ManagedProcess:
    """A child process in its own process group, stopped by PID on `stop()`."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: Path | None = None
    log_path: Path | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        env = dict(os.environ)
        if self.env:
            env.update(self.env)
        stdout: int | object = subprocess.DEVNULL
        log_file = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed after Popen dups it
            stdout = log_file
        try:
            self.process = subprocess.Popen(
                list(self.argv), env=env, cwd=self.cwd, stdout=stdout,  # type: ignore[arg-type]
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        logger.info("started %s (pid %d)", self.name, self.process.pid)
        return self

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM our process group, then SIGKILL whatever is left after `timeout`."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid  # start_new_session=True: the group id is the child's pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
            self.process.wait(timeout=timeout)
        logger.info("stopped %s (pid %d)", self.name, pgid)

    def kill(self) -> None:
        """SIGKILL the process alone (used to simulate a crash)."""
        if self.alive():
            assert self.process is not None
            self.process.kill()
            self.process.wait(timeout=10)
