"""`lorafold up --s3` supervises every child (issue 10): Redis, SeaweedFS and the API,
killed with SIGKILL one after the other, are restarted on their ports with their data,
the console says so, and the stack serves what it stored before."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from lorafold.cli.service_cmd import local_api_key
from lorafold.servers.process import free_port
from lorafold.synthetic import write_random_adapter
from tests.e2e.stack import upload_dir
from tests.up_process import UpProcess, start_up

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 16)}


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpProcess]:
    stack = start_up(tmp_path_factory.mktemp("up-s3"), "--s3", "--port", str(free_port()))
    try:
        yield stack
    finally:
        stack.stop()


def child(up: UpProcess, name: str) -> psutil.Process:
    """The live child process of `up` whose command line names `name`."""
    for process in psutil.Process(up.pid).children(recursive=True):
        try:
            if name in " ".join(process.cmdline()) and process.status() != "zombie":
                return process
        except psutil.NoSuchProcess:
            continue
    raise LookupError(f"no child {name!r} of {up.pid}")


def kill_and_wait_for_restart(up: UpProcess, label: str, cmdline: str,
                              timeout: float = 90.0) -> None:
    victim = child(up, cmdline)
    victim.kill()
    # Two lines, searched apart: other children (a worker losing Redis) may log between.
    said = re.compile(rf"^{re.escape(label)} \(pid {victim.pid}\) exited with code -9; "
                      rf"restarting in \d+s \(restart 1 of at most \d+\)\n(?P<after>.*)",
                      re.MULTILINE | re.DOTALL)
    restarted = re.compile(rf"^{re.escape(label)} restarted \(pid (\d+)\)", re.MULTILINE)
    deadline = time.monotonic() + timeout
    while not ((exited := said.search(up.output()))
               and (found := restarted.search(exited.group("after")))):
        assert up.process.alive(), up.output()[-3000:]
        assert time.monotonic() < deadline, up.output()[-3000:]
        time.sleep(0.2)
    assert psutil.pid_exists(int(found.group(1)))


def ready(client: httpx.Client, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "the stack never became ready again"
        time.sleep(0.3)


def test_only_the_api_is_given_the_api_keys(up: UpProcess) -> None:
    assert "LORAFOLD_API_KEYS_FILE" in child(up, "uvicorn").environ()
    assert "LORAFOLD_API_KEYS_FILE" not in child(up, "workers.worker").environ()


def test_up_restarts_a_killed_redis_seaweedfs_and_api(up: UpProcess, tmp_path: Path) -> None:
    key = local_api_key(up.data_dir)
    with httpx.Client(base_url=up.url, headers={"Authorization": f"Bearer {key}"},
                      timeout=30) as client:
        stored = upload_dir(client, write_random_adapter(tmp_path / "a", SHAPES, rank=2,
                                                         seed=1), "before")
        assert stored.status_code == 201, stored.text
        adapter = stored.json()["id"]
        for label, cmdline in (("redis", "redis-server"), ("SeaweedFS", "weed"),
                               ("API", "uvicorn")):
            kill_and_wait_for_restart(up, label, cmdline)
            ready(client)
            assert client.get(f"/v1/adapters/{adapter}").json()["name"] == "before"
            download = client.get(f"/v1/adapters/{adapter}/download", follow_redirects=True)
            assert download.status_code == 200 and download.content
        jobs = client.post("/v1/merges", json={"adapters": [{"id": adapter}], "rank": 2})
        assert jobs.status_code == 202, jobs.text  # Redis took the job, after all that
