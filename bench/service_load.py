"""Service load benchmark: status requests/s and latency, upload throughput and API memory,
submit-to-succeeded latency of a tiny merge. Writes bench/results/service.json.

It starts its own stack on loopback (Redis, the API under uvicorn with uvloop/httptools,
one worker; filesystem storage, or SeaweedFS S3 with --s3) and stops it by PID.

    .venv/bin/python bench/service_load.py                 # defaults: 32 clients, 10 s
    .venv/bin/python bench/service_load.py --clients 64 --duration 20 --upload-mb 200

Status load: N concurrent keep-alive connections loop on GET /v1/jobs/{id} for a fixed
time, from one asyncio process. Two clients are measured: httpx.AsyncClient, and a
minimal raw HTTP/1.1 client (asyncio streams) whose own cost is small enough that the
number reflects the server rather than the load generator; both share the machine's
cores with the server, as they would in CI. The targets are judged on the raw client at
the highest N. The machine's load average is recorded: other processes skew everything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from lorafold.servers.process import ManagedProcess, free_port, wait_for_port
from lorafold.servers.redis import start_redis
from lorafold.synthetic import write_random_adapter
from workers.launcher import WorkerSpec, start_worker, stop_workers

MIB = 1024 * 1024
KEY = "bench-key-0123456789abcdefghij"
MAX_CLIENTS = 512
MAX_DURATION_S = 120.0
TARGETS = {"status_rps": 1000.0, "status_p99_ms": 50.0, "upload_mb_per_s": 100.0,
           "upload_rss_growth_mb": 100.0, "tiny_merge_s": 2.0}


class Stack:
    """Redis + API + one worker (+ SeaweedFS), all ours, stopped by PID."""

    def __init__(self, root: Path, *, s3: bool) -> None:
        self.root = root
        self.redis = start_redis(root / "redis")
        self.s3 = None
        env = {"LORAFOLD_REDIS_URL": self.redis.url,
               "LORAFOLD_API_KEYS": json.dumps({KEY: "bench"}),
               "LORAFOLD_SPOOL_DIR": str(root / "spool"), "LORAFOLD_LOG_LEVEL": "WARNING",
               "LORAFOLD_MAX_UPLOAD_BYTES": str(4 * 1024 * MIB)}
        if s3:
            from lorafold.servers.seaweedfs import start_seaweedfs

            self.s3 = start_seaweedfs(root / "s3", access_key="benchaccess",
                                      secret_key="bench-secret-0123456789")
            env.update({"LORAFOLD_STORAGE_URL": "s3://bench",
                        "LORAFOLD_S3_ENDPOINT_URL": self.s3.endpoint_url,
                        "LORAFOLD_S3_ACCESS_KEY": "benchaccess",
                        "LORAFOLD_S3_SECRET_KEY": "bench-secret-0123456789"})
        else:
            env["LORAFOLD_STORAGE_URL"] = str(root / "storage")
        self.env = env
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = ManagedProcess(
            name="api", env=env, log_path=root / "api.log",
            argv=[sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory",
                  "--host", "127.0.0.1", "--port", str(self.port), "--loop", "uvloop",
                  "--http", "httptools", "--no-access-log", "--log-level", "warning"]).start()
        self.worker = start_worker(WorkerSpec(name="bench", env={
            "CUDA_VISIBLE_DEVICES": "", "LORAFOLD_WORKER_DEVICE": "cpu"}), env=env,
            log_dir=root)
        wait_for_port(self.port, timeout=120, process=self.api.process)
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise TimeoutError("API not ready")

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {KEY}"},
                            timeout=600)

    def stop(self) -> None:
        stop_workers([self.worker], warm_s=2, cold_s=5)
        self.api.stop()
        if self.s3 is not None:
            self.s3.stop()
        self.redis.stop()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


# -- status load ---------------------------------------------------------------------------

async def _httpx_loop(client: httpx.AsyncClient, path: str, stop_at: float,
                      latencies: list[float], errors: list[int]) -> None:
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        response = await client.get(path)
        latencies.append(time.perf_counter() - started)
        if response.status_code != 200:
            errors.append(response.status_code)


async def _raw_loop(port: int, path: str, stop_at: float, latencies: list[float],
                    errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
               f"Authorization: Bearer {KEY}\r\n\r\n").encode()
    try:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(int(head[9:12]))
    finally:
        writer.close()


async def status_load(stack: Stack, path: str, clients: int, duration: float,
                      kind: str) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[int] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=stack.url, limits=limits, timeout=30,
                                 headers={"Authorization": f"Bearer {KEY}"}) as client:
        warm_until = time.perf_counter() + 1.0  # open the connections, warm the server
        if kind == "httpx":
            await asyncio.gather(*(_httpx_loop(client, path, warm_until, [], [])
                                   for _ in range(clients)))
        else:
            await asyncio.gather(*(_raw_loop(stack.port, path, warm_until, [], [])
                                   for _ in range(clients)))
        started = time.perf_counter()
        stop_at = started + duration
        if kind == "httpx":
            await asyncio.gather(*(_httpx_loop(client, path, stop_at, latencies, errors)
                                   for _ in range(clients)))
        else:
            await asyncio.gather(*(_raw_loop(stack.port, path, stop_at, latencies, errors)
                                   for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return {"client": kind, "clients": clients, "duration_s": round(elapsed, 2),
            "requests": len(latencies), "errors": len(errors),
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * percentile(latencies, 50), 2),
            "p99_ms": round(1000 * percentile(latencies, 99), 2)}


# -- upload ------------------------------------------------------------------------------

class RssSampler:
    """Peak RSS of the API process (and, apart, of its validator children)."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self.children_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.process.memory_info().rss)
            total = 0
            for child in self.process.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    continue
            self.children_peak = max(self.children_peak, total)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def make_adapter(root: Path, size_mb: int) -> Path:
    module_mb = 4  # 4096×4096 at rank 128 in float32: 2 × 128 × 4096 × 4 bytes
    shapes = {f"model.layers.{i}.self_attn.q_proj": (4096, 4096)
              for i in range(max(1, size_mb // module_mb))}
    return write_random_adapter(root / f"upload-{size_mb}mb", shapes, rank=128, seed=1)


def upload(stack: Stack, directory: Path) -> dict[str, Any]:
    weights = directory / "adapter_model.safetensors"
    size = weights.stat().st_size + (directory / "adapter_config.json").stat().st_size
    with stack.client() as client, RssSampler(stack.api.pid) as rss, \
            weights.open("rb") as w, (directory / "adapter_config.json").open("rb") as c:
        started = time.perf_counter()
        response = client.post("/v1/adapters", data={"name": "bench-upload"}, files=[
            ("files", ("adapter_config.json", c)), ("files", ("adapter_model.safetensors", w))])
        elapsed = time.perf_counter() - started
    if response.status_code != 201:
        raise RuntimeError(f"upload failed: {response.status_code} {response.text}")
    return {"size_mb": round(size / MIB, 1), "seconds": round(elapsed, 3),
            "mb_per_s": round(size / MIB / elapsed, 1),
            "api_rss_baseline_mb": round(rss.baseline / MIB, 1),
            "api_rss_peak_mb": round(rss.peak / MIB, 1),
            "api_rss_growth_mb": round((rss.peak - rss.baseline) / MIB, 1),
            "validator_processes_rss_peak_mb": round(rss.children_peak / MIB, 1)}


# -- tiny merge ----------------------------------------------------------------------------

def tiny_inputs(stack: Stack, root: Path) -> list[str]:
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64),
              "model.layers.0.self_attn.v_proj": (64, 64)}
    ids = []
    with stack.client() as client:
        for i in range(2):
            d = write_random_adapter(root / f"tiny{i}", shapes, rank=4, seed=i)
            files = [("files", (p.name, p.read_bytes())) for p in sorted(d.iterdir())]
            response = client.post("/v1/adapters", files=files, data={"name": f"tiny{i}"})
            response.raise_for_status()
            ids.append(response.json()["id"])
    return ids


def tiny_merges(stack: Stack, ids: list[str], runs: int) -> tuple[dict[str, Any], str]:
    latencies = []
    job_id = ""
    with stack.client() as client:
        for _ in range(runs):
            started = time.perf_counter()
            job = client.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                                  "method": "ctm", "rank": 4}).json()
            job_id = job["id"]
            while job["status"] not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.01)
                job = client.get(f"/v1/jobs/{job_id}").json()
            if job["status"] != "succeeded":
                raise RuntimeError(f"tiny merge {job_id} ended {job['status']}: {job['error']}")
            latencies.append(time.perf_counter() - started)
    return {"runs": runs, "p50_s": round(statistics.median(latencies), 3),
            "max_s": round(max(latencies), 3), "min_s": round(min(latencies), 3)}, job_id


# -- main ----------------------------------------------------------------------------------

def verdicts(results: dict[str, Any]) -> dict[str, Any]:
    """Targets judged on the raw client at the highest concurrency measured."""
    raw = [r for r in results["status"] if r["client"] == "raw"]
    status = max(raw, key=lambda r: r["clients"])
    upload_result = results["upload"]
    merge = results["tiny_merge"]
    checks = {
        "status_rps": (status["requests_per_s"], status["requests_per_s"] >= TARGETS["status_rps"]),
        "status_p99_ms": (status["p99_ms"], status["p99_ms"] < TARGETS["status_p99_ms"]),
        "upload_mb_per_s": (upload_result["mb_per_s"],
                            upload_result["mb_per_s"] >= TARGETS["upload_mb_per_s"]),
        "upload_rss_growth_mb": (upload_result["api_rss_growth_mb"],
                                 upload_result["api_rss_growth_mb"]
                                 < TARGETS["upload_rss_growth_mb"]),
        "tiny_merge_s": (merge["max_s"], merge["max_s"] < TARGETS["tiny_merge_s"]),
    }
    return {name: {"target": TARGETS[name], "measured": value, "met": met}
            for name, (value, met) in checks.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    load_before = [round(x, 2) for x in os.getloadavg()]
    root = Path(tempfile.mkdtemp(prefix="lorafold-bench-"))
    stack = Stack(root, s3=args.s3)
    try:
        ids = tiny_inputs(stack, root)
        merge, job_id = tiny_merges(stack, ids, args.merges)
        path = f"/v1/jobs/{job_id}"
        status = [asyncio.run(status_load(stack, path, clients, args.duration, kind))
                  for kind in ("raw", "httpx") for clients in args.clients]
        directory = make_adapter(root, args.upload_mb)
        upload_result = upload(stack, directory)
    finally:
        stack.stop()
        shutil.rmtree(root, ignore_errors=True)
    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(),
                    "load_average_before": load_before,
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "config": {"storage": "s3 (SeaweedFS)" if args.s3 else "filesystem",
                   "server": "uvicorn, 1 process, uvloop + httptools, no access log",
                   "workers": 1, "clients": args.clients, "duration_s": args.duration},
        "status": status, "upload": upload_result, "tiny_merge": merge,
    }
    results["targets"] = verdicts(results)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=lambda text: [int(n) for n in text.split(",")],
                        default=[8, 32], help="concurrent clients, e.g. 8,32")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per client kind")
    parser.add_argument("--upload-mb", type=int, default=200)
    parser.add_argument("--merges", type=int, default=10)
    parser.add_argument("--s3", action="store_true", help="SeaweedFS S3 instead of a directory")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "service.json")
    args = parser.parse_args(argv)
    if not all(1 <= n <= MAX_CLIENTS for n in args.clients) \
            or not 0 < args.duration <= MAX_DURATION_S:
        parser.error(f"clients must be 1..{MAX_CLIENTS}, duration 0..{MAX_DURATION_S:.0f}s")
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(args.out.read_text()) if args.out.exists() else {}
    key = "s3" if args.s3 else "filesystem"
    existing = existing if isinstance(existing, dict) and "runs" in existing else {"runs": {}}
    existing["runs"][key] = results
    args.out.write_text(json.dumps(existing, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
