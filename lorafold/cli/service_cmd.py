"""`lorafold up` (the whole local stack) and `lorafold worker` (job workers only).

`lorafold up` starts, as its own children: a Redis server (AOF on, noeviction), SeaweedFS
as an S3 server when `--s3` is given (else filesystem storage), the API (uvicorn in a
child process) and the workers; it prints the URL and the API key and stops every child
it started, by PID, on Ctrl-C or SIGTERM. It supervises them: a child that dies is
restarted (Redis on the same port and AOF, SeaweedFS on the same S3 port and data, the
API on the same port; workers by their pool), with a growing backoff and a bound on
restarts (`lorafold.servers.supervisor`), and says so on the console.

One stack per data dir: `up` holds an exclusive lock on `<data-dir>/up.lock` while it runs,
so a second `up` there refuses (naming the first one's PID and URL) instead of starting a
second Redis on the same AOF file. The URL it serves on is recorded in
`<data-dir>/stack.json` (removed on a clean stop); `lorafold client` run in the same
directory finds it there, which matters when port 8000 is taken and `up` serves elsewhere.

Auth: on first start it creates a random API key for tenant `default` and stores it in
`<data-dir>/api_keys.json` (mode 600); later starts reuse it. Add keys (and tenants) to
that file; only the API is given it (workers authenticate nothing). The S3 credentials
of `--s3` are kept beside it the same way.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from lorafold.errors import LorafoldError
from lorafold.servers.process import ManagedProcess, free_port, port_is_free, wait_for_port
from lorafold.servers.redis import RedisServer, start_redis
from lorafold.servers.supervisor import ProcessServer, Supervisor
from lorafold.settings import LOCAL_DATA_DIR, STACK_FILE, Settings, local_stack_url
from workers.launcher import WorkerPool, plan_workers, run_pool

logger = logging.getLogger(__name__)

DEFAULT_TENANT = "default"
DEFAULT_PORT = 8000
S3_BUCKET = "lorafold"
LOCK_FILE = "up.lock"


def write_private_json(path: Path, payload: dict[str, Any]) -> None:
    """Create `path` readable by its owner only (never world-readable, even briefly)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)


def local_api_key(data_dir: Path = LOCAL_DATA_DIR) -> str | None:
    """The first key of a local `lorafold up` (what `lorafold client` uses by default)."""
    try:
        keys = json.loads((data_dir / "api_keys.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return next(iter(keys), None) if isinstance(keys, dict) else None


def ensure_api_key(data_dir: Path) -> tuple[Path, str]:
    """The key file and its first key, creating both on first start."""
    path = data_dir / "api_keys.json"
    if not path.exists():
        write_private_json(path, {"lf_" + secrets.token_urlsafe(32): DEFAULT_TENANT})
    keys = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(keys, dict) or not keys:
        raise LorafoldError(f"{path} holds no API keys", code="invalid_api_keys_file")
    return path, next(iter(keys))


def ensure_s3_credentials(data_dir: Path) -> tuple[str, str]:
    path = data_dir / "s3_credentials.json"
    if not path.exists():
        write_private_json(path, {"access_key": "lf" + secrets.token_hex(8),
                                  "secret_key": secrets.token_urlsafe(32)})
    creds = json.loads(path.read_text(encoding="utf-8"))
    return str(creds["access_key"]), str(creds["secret_key"])


def _in_use_message(data_dir: Path) -> str:
    try:
        pid = (data_dir / LOCK_FILE).read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        pid = "unknown"
    url = local_stack_url(data_dir) or "still starting"
    return (f"another `lorafold up` (pid {pid}, {url}) is running on {data_dir}; use that "
            f"one, stop it first, or pass another --data-dir")


@contextlib.contextmanager
def hold_data_dir(data_dir: Path) -> Iterator[None]:
    """Hold `<data_dir>/up.lock` exclusively while a stack runs on `data_dir`, or raise
    LorafoldError(data_dir_in_use) naming the holder. The kernel releases the lock when
    this process exits, however it exits; the file itself stays (it holds our PID)."""
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LorafoldError(_in_use_message(data_dir), code="data_dir_in_use") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def write_stack_record(data_dir: Path, url: str) -> Path:
    """`<data_dir>/stack.json`: where this `up` serves (read by `local_stack_url`)."""
    path = data_dir / STACK_FILE
    partial = path.with_name(f".{STACK_FILE}.{os.getpid()}")
    partial.write_text(json.dumps({"url": url, "pid": os.getpid()}), encoding="utf-8")
    os.replace(partial, path)
    return path


def choose_port(requested: int | None, host: str) -> tuple[int, str | None]:
    """The API port, and the sentence to print when the default one is taken.

    An explicit `--port` that is taken is refused; the default (8000) falls back to a free
    port, said plainly.
    """
    if requested:
        if not port_is_free(requested, host):
            raise LorafoldError(f"port {requested} is taken on {host}; pass another --port, "
                                f"or none to use {DEFAULT_PORT} (or a free one)",
                                code="port_taken")
        return requested, None
    if port_is_free(DEFAULT_PORT, host):
        return DEFAULT_PORT, None
    port = free_port(host)
    return port, f"port {DEFAULT_PORT} is taken; serving on http://{host}:{port}"


@contextlib.contextmanager
def stop_signals() -> Iterator[list[bool]]:
    """Turn SIGINT/SIGTERM into a flag the supervising loop polls."""
    flag = [False]

    def handler(signum: int, frame: FrameType | None) -> None:
        flag[0] = True

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def api_argv(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
            "--host", host, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--timeout-graceful-shutdown", "10"]


def run_up(args: argparse.Namespace) -> int:
    data_dir: Path = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with hold_data_dir(data_dir):
        (data_dir / STACK_FILE).unlink(missing_ok=True)  # left by an `up` that was killed
        port, taken = choose_port(args.port, args.host)
        if taken:
            print(taken, flush=True)
        # From here on SIGINT/SIGTERM only set a flag: a signal during start-up stops the
        # stack once it is up, rather than killing us and orphaning what we started.
        with stop_signals() as stopping:
            _run_stack(args, data_dir, port, stopping)
    return 0


def _say(message: str) -> None:
    print(message, flush=True)


def _run_stack(args: argparse.Namespace, data_dir: Path, port: int,
               stopping: list[bool]) -> None:
    logs = data_dir / "logs"
    keys_file, api_key = ensure_api_key(data_dir)
    env: dict[str, str] = {"LORAFOLD_SPOOL_DIR": str(data_dir / "spool"),
                           "LORAFOLD_WORKERS": str(args.workers)}
    api_env = {**env, "LORAFOLD_API_KEYS_FILE": str(keys_file)}  # the API's alone
    supervisor = Supervisor(say=_say)
    pool: WorkerPool | None = None
    try:
        redis = start_redis(data_dir / "redis", log_path=logs / "redis.log")
        supervisor.add("redis", redis, lambda: _restart_redis(redis, logs))
        env["LORAFOLD_REDIS_URL"] = redis.url
        if args.s3:
            from lorafold.servers.seaweedfs import start_seaweedfs

            access, secret = ensure_s3_credentials(data_dir)

            def start_s3(s3_port: int | None = None) -> Any:
                return start_seaweedfs(data_dir / "s3", s3_port=s3_port, access_key=access,
                                       secret_key=secret, log_dir=logs / "seaweedfs")

            s3 = start_s3()
            supervisor.add("SeaweedFS", s3, lambda: start_s3(s3.ports["s3"]))
            env.update({"LORAFOLD_STORAGE_URL": f"s3://{S3_BUCKET}",
                        "LORAFOLD_S3_ENDPOINT_URL": s3.endpoint_url,
                        "LORAFOLD_S3_REGION": s3.region, "LORAFOLD_S3_ACCESS_KEY": access,
                        "LORAFOLD_S3_SECRET_KEY": secret})
        else:
            env["LORAFOLD_STORAGE_URL"] = str(data_dir / "storage")
        api_env.update(env)
        settings = Settings.from_env_overrides(env)  # what the workers will see
        api = _start_api(args.host, port, api_env, logs)
        supervisor.add("API", api, lambda: _start_api(args.host, port, api_env, logs))
        pool = WorkerPool(plan_workers(settings), env=env, log_dir=logs).start()
        url = f"http://{args.host}:{port}"
        write_stack_record(data_dir, url)
        print(f"lorafold is up at {url}  (docs: {url}/docs)")
        print(f"API key (tenant '{DEFAULT_TENANT}'): {api_key}")
        print(f"  export LORAFOLD_URL={url} LORAFOLD_API_KEY={api_key}")
        print(f"data: {data_dir}  logs: {logs}  workers: {len(pool.processes)}  "
              f"storage: {'S3 (SeaweedFS)' if args.s3 else 'filesystem'}")
        print("Ctrl-C stops everything.", flush=True)
        while not stopping[0]:
            time.sleep(0.5)
            supervisor.check()
            pool.check()
    finally:
        (data_dir / STACK_FILE).unlink(missing_ok=True)
        if pool is not None:
            with contextlib.suppress(Exception):
                pool.stop()
        supervisor.stop()
        print("stopped.", flush=True)


def _restart_redis(previous: RedisServer, logs: Path) -> RedisServer:
    """Redis again on its port (every client has that URL), replaying its AOF."""
    return start_redis(previous.data_dir, port=previous.port, log_path=logs / "redis.log")


def _start_api(host: str, port: int, env: dict[str, str], logs: Path) -> ProcessServer:
    api = ManagedProcess(name="api", argv=api_argv(host, port), env=env,
                         log_path=logs / "api.log").start()
    try:
        wait_for_port(port, host=host, timeout=120, process=api.process)
    except (RuntimeError, TimeoutError) as e:
        api.stop()
        raise LorafoldError(f"the API did not start on port {port}: {e}; see "
                            f"{logs / 'api.log'}", code="api_start_failed") from e
    return ProcessServer(api)


def run_worker(args: argparse.Namespace) -> int:
    overrides: dict[str, str] = {}
    if args.workers is not None:
        overrides["LORAFOLD_WORKERS"] = str(args.workers)
    if args.gpus is not None:
        overrides["LORAFOLD_GPUS"] = args.gpus
    settings = Settings.from_env_overrides(overrides)
    logging.getLogger().setLevel(settings.log_level)
    return run_pool(settings, env=overrides)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    up = sub.add_parser("up", help="run the service locally (Redis, S3, API, workers)",
                        description="Start Redis, optionally SeaweedFS (S3), the API and "
                                    "the workers as child processes; Ctrl-C stops them.")
    up.add_argument("--data-dir", type=Path, default=LOCAL_DATA_DIR,
                    help="state: Redis AOF, storage, API key, logs (default .lorafold); "
                         "one running `up` per data dir")
    up.add_argument("--port", type=int,
                    help=f"API port (default {DEFAULT_PORT}, or a free one if it is taken: "
                         "`up` says which, and `lorafold client` here finds it)")
    up.add_argument("--host", default="127.0.0.1", help="API address (default 127.0.0.1)")
    up.add_argument("--s3", action="store_true", help="store adapters in SeaweedFS (S3)")
    up.add_argument("--workers", type=int, default=1, help="CPU workers when no GPU")
    up.set_defaults(handler=run_up)

    worker = sub.add_parser("worker", help="run job workers (one per GPU, else --workers)",
                            description="Start RQ workers for the configured Redis; settings "
                                        "come from LORAFOLD_* variables.")
    worker.add_argument("--workers", type=int, help="CPU workers when no GPU is visible")
    worker.add_argument("--gpus", help="'auto', 'none' or GPU indices '0,1'")
    worker.set_defaults(handler=run_worker)
