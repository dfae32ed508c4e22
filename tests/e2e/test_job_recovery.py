"""Jobs that are cancelled or lose their worker, on the S3 deployment (two workers).

The merges here are slow because of their inputs (768×768 modules merged with `mtc`,
whose dense SVD per module takes about a second on a CPU), never because of test-only code.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any

import httpx
import psutil
import pytest

from lorafold.synthetic import write_random_adapter
from tests.e2e.stack import Stack, upload_dir, wait_job

SLOW_SHAPES = {f"model.layers.{i}.mlp.up_proj": (768, 768) for i in range(4)}
RUNNER = re.compile(r"attempt (\d+) started on worker \S+ \(pid (\d+)\)")


@pytest.fixture(scope="module")
def slow_inputs(s3_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    root = tmp_path_factory.mktemp("slow")
    ids = []
    with s3_stack.client() as client:
        for i in range(2):
            directory = write_random_adapter(root / f"slow{i}", SLOW_SHAPES, rank=8, seed=i)
            response = upload_dir(client, directory, f"slow{i}")
            assert response.status_code == 201, response.text
            ids.append(response.json()["id"])
    return ids


def start_slow_merge(client: httpx.Client, ids: list[str]) -> str:
    response = client.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                               "method": "mtc", "rank": 8})
    assert response.status_code == 202, response.text
    job_id: str = response.json()["id"]
    return job_id


def wait_for_stage(client: httpx.Client, job_id: str, stage: str,
                   timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] == "running" and job["progress"]["stage"] == stage:
            return job
        assert job["status"] in ("queued", "running"), job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} never reached stage {stage}")


def runner_pid(client: httpx.Client, job_id: str, attempt: int) -> int:
    for event in client.get(f"/v1/jobs/{job_id}/events").json()["data"]:
        match = RUNNER.search(event.get("message", ""))
        if match and int(match.group(1)) == attempt:
            return int(match.group(2))
    raise AssertionError(f"no runner recorded for attempt {attempt} of {job_id}")


class ListingWatcher:
    """Lists the tenant's adapters continuously while a job runs. Whenever the job's output
    is listed it checks, right then, that the job is publishing or done and that the
    whole adapter can be downloaded: a listed adapter is never a partial one."""

    def __init__(self, stack: Stack, job_id: str) -> None:
        self.client = stack.client(follow_redirects=True)
        self.job_id = job_id
        self.output = "ad_" + job_id.removeprefix("job_")
        self.listings = 0
        self.sightings: list[tuple[str, bool]] = []  # (job stage, download complete)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            response = self.client.get("/v1/adapters")
            if response.status_code != 200:
                continue
            self.listings += 1
            listed = {a["id"]: a for a in response.json()["data"]}
            if self.output in listed:
                job = self.client.get(f"/v1/jobs/{self.job_id}").json()
                archive = self.client.get(f"/v1/adapters/{self.output}/download")
                complete = (archive.status_code == 200 and len(archive.content)
                            == listed[self.output]["archive_size_bytes"])
                self.sightings.append((job["progress"]["stage"], complete))

    def __enter__(self) -> ListingWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.client.close()


def test_cancel_running_merge(s3_stack: Stack, slow_inputs: list[str]) -> None:
    with s3_stack.client() as client:
        job_id = start_slow_merge(client, slow_inputs)
        wait_for_stage(client, job_id, "merge")
        response = client.post(f"/v1/jobs/{job_id}/cancel")
        assert response.status_code == 202, response.text
        assert response.json()["cancel_requested"] is True
        job = wait_job(client, job_id, timeout=60)
        assert job["status"] == "cancelled", job
        assert job["result"] is None
        output = "ad_" + job_id.removeprefix("job_")
        assert client.get(f"/v1/adapters/{output}").status_code == 404
        again = client.post(f"/v1/jobs/{job_id}/cancel")
        assert again.status_code == 202 and again.json()["status"] == "cancelled"


def _kill_tree(stack: Stack, pid: int, *, horse_only: bool) -> None:
    """SIGKILL a worker process and its work horse (or the horse alone), by PID."""
    worker = next(w for w in stack.workers if w.process is not None and w.pid == pid)
    horses = psutil.Process(pid).children(recursive=True)
    assert horses, "the worker has no work horse running the job"
    if not horse_only:
        worker.kill()
    for horse in horses:
        horse.kill()


@pytest.mark.parametrize("horse_only", [False, True], ids=["worker", "horse"])
def test_killed_worker_job_is_retried(s3_stack: Stack, slow_inputs: list[str],
                                      horse_only: bool) -> None:
    """SIGKILL mid-merge: the whole worker (and its horse), or the horse alone (as the OOM
    killer would). Another attempt runs the job to success; nothing partial is listed."""
    with s3_stack.client() as client:
        job_id = start_slow_merge(client, slow_inputs)
        output = "ad_" + job_id.removeprefix("job_")
        with ListingWatcher(s3_stack, job_id) as watcher:
            wait_for_stage(client, job_id, "merge")
            first = runner_pid(client, job_id, 1)
            _kill_tree(s3_stack, first, horse_only=horse_only)
            if not horse_only:
                s3_stack.add_worker(f"replacement-{job_id[-6:]}")  # two for later tests
            job = wait_job(client, job_id, timeout=150)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        if not horse_only:
            assert runner_pid(client, job_id, 2) != first
        messages = [e.get("message", "") for e in
                    client.get(f"/v1/jobs/{job_id}/events").json()["data"]]
        assert any("retrying" in m for m in messages), messages
        adapters = client.get("/v1/adapters").json()["data"]
        assert [a["job_id"] for a in adapters].count(job_id) == 1
        assert client.get(f"/v1/adapters/{output}").json()["parents"] == slow_inputs
    assert watcher.listings >= 3  # it really watched (how often depends on machine load)
    assert all(stage in ("publish", "done") and complete
               for stage, complete in watcher.sightings), watcher.sightings


@pytest.fixture(autouse=True)
def _workers_ready(s3_stack: Stack) -> None:
    s3_stack.wait_for_workers()
