"""A live lorafold stack for end-to-end tests: uvicorn + RQ worker processes, real Redis,
filesystem or SeaweedFS storage, all on free loopback ports and stopped by PID.

Job timing is shortened (1 s heartbeats, abandoned after 3 s, maintenance every second)
so that a killed worker's job is retried within seconds; nothing else is test-specific.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from redis import Redis
from rq import Worker

from lorafold.servers.process import ManagedProcess, free_port, wait_for_port
from lorafold.settings import MIB
from workers.launcher import WorkerSpec, start_worker, stop_workers

KEYS = {"tenant-a": "e2e-key-tenant-a-0123456789abcdef",
        "tenant-b": "e2e-key-tenant-b-0123456789abcdef"}
UPLOAD_LIMIT = 64 * MIB
DATASET_LIMIT = 64 * 1024
DRAIN_LIMIT = 256 * MIB
TERMINAL = ("succeeded", "failed", "cancelled")
IMPORT_BUCKET = "lorafold-e2e-imports"  # the S3 stack may import from it


@dataclass
class Stack:
    name: str
    url: str
    redis_url: str
    env: dict[str, str]
    root: Path
    api: ManagedProcess
    workers: list[ManagedProcess] = field(default_factory=list)
    storage_root: Path | None = None

    def client(self, tenant: str = "tenant-a", **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=120, **kwargs)

    def add_worker(self, name: str) -> ManagedProcess:
        spec = WorkerSpec(name=f"{self.name}-{name}",
                          env={"CUDA_VISIBLE_DEVICES": "", "LORAFOLD_WORKER_DEVICE": "cpu"})
        process = start_worker(spec, env=self.env, log_dir=self.root / "logs")
        self.workers.append(process)
        return process

    def wait_for_workers(self, timeout: float = 90.0) -> None:
        """Until every live worker process has registered with RQ."""
        redis = Redis.from_url(self.redis_url)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                live = sum(1 for w in self.workers if w.alive())
                if len(Worker.all(connection=redis)) >= live:
                    return
                for w in self.workers:
                    if w.process is not None and w.process.poll() is not None \
                            and w.process.returncode not in (0, -9):
                        raise RuntimeError(f"{w.name} exited: {self.log_tail(w)}")
                time.sleep(0.2)
            raise TimeoutError(f"workers of {self.name} did not register")
        finally:
            redis.close()

    def log_tail(self, process: ManagedProcess, size: int = 3000) -> str:
        if process.log_path is None or not process.log_path.exists():
            return "(no log)"
        return process.log_path.read_text(errors="replace")[-size:]

    def stop(self) -> None:
        stop_workers(self.workers, warm_s=2.0, cold_s=5.0)
        self.api.stop()


def start_stack(name: str, root: Path, *, redis_url: str, storage_env: dict[str, str],
                workers: int, storage_root: Path | None = None) -> Stack:
    root.mkdir(parents=True, exist_ok=True)
    env = {
        "LORAFOLD_ENVIRONMENT": "test",
        "LORAFOLD_REDIS_URL": redis_url,
        "LORAFOLD_API_KEYS": json.dumps({key: tenant for tenant, key in KEYS.items()}),
        "LORAFOLD_SPOOL_DIR": str(root / "spool"),
        "LORAFOLD_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "LORAFOLD_UPLOAD_DRAIN_BYTES": str(DRAIN_LIMIT),
        "LORAFOLD_JOB_MONITORING_INTERVAL_S": "1",
        "LORAFOLD_ABANDONED_AFTER_S": "3",
        "LORAFOLD_MAINTENANCE_INTERVAL_S": "1",
        "LORAFOLD_WORKER_TTL_S": "20",
        "LORAFOLD_LOG_LEVEL": "INFO",
        # imports reach no host beyond the loopback ones a test names (the fuzzer makes up
        # https URLs)
        "LORAFOLD_IMPORT_PUBLIC_HTTPS": "false",
        **storage_env,
    }
    port = free_port()
    api = ManagedProcess(
        name=f"api {name}", log_path=root / "logs" / "api.log", env=env,
        argv=[sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
              "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
              "--http", "httptools", "--no-access-log"]).start()
    stack = Stack(name=name, url=f"http://127.0.0.1:{port}", redis_url=redis_url, env=env,
                  root=root, api=api, storage_root=storage_root)
    try:
        for i in range(workers):
            stack.add_worker(f"w{i}")
        wait_for_port(port, timeout=90, process=api.process)
        stack.wait_for_workers()
    except BaseException:
        stack.stop()
        raise
    return stack


def wait_job(client: httpx.Client, job_id: str, *, timeout: float = 120.0,
             until: tuple[str, ...] = TERMINAL) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in until:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['status']}: {job}")
        time.sleep(0.1)


def upload_dir(client: httpx.Client, directory: Path, name: str,
               headers: dict[str, str] | None = None) -> httpx.Response:
    """POST the files of an adapter directory (every file in it, by its name)."""
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream"))
             for p in sorted(directory.iterdir()) if p.is_file()]
    return client.post("/v1/adapters", files=files, data={"name": name},
                       headers=headers or {})


def upload_archive(client: httpx.Client, archive: Path, name: str) -> httpx.Response:
    return client.post("/v1/adapters", data={"name": name},
                       files=[("archive", (archive.name, archive.read_bytes(),
                                           "application/octet-stream"))])


def upload_path(client: httpx.Client, path: Path, name: str) -> httpx.Response:
    return upload_dir(client, path, name) if path.is_dir() else upload_archive(client, path,
                                                                                name)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert {"type", "title", "detail"} <= body.keys()
    return body


def client_cli(stack: Stack, *args: str, tenant: str = "tenant-a",
               ) -> subprocess.CompletedProcess[str]:
    """`lorafold client ARGS` in a fresh process, told the stack's URL and a tenant's key
    through the environment only (nothing of the caller's)."""
    env = {"LORAFOLD_URL": stack.url, "LORAFOLD_API_KEY": KEYS[tenant],
           "PATH": "/usr/bin:/bin", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "lorafold", "client", *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
