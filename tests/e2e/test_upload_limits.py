"""Uploads stream: a 200 MB body past the limit answers 413 while the API's memory stays
flat, and a large accepted upload does not grow it either."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil

from lorafold.settings import MIB
from lorafold.synthetic import write_random_adapter
from tests.e2e.stack import KEYS, UPLOAD_LIMIT, Stack, assert_problem

MAX_RSS_GROWTH = 50 * MIB


class PeakRss:
    """Samples a process's RSS every few milliseconds while in use."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.baseline = self._process.memory_info().rss
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def multipart_stream(total: int, boundary: str = "lorafoldtestboundary") -> Iterator[bytes]:
    """A multipart body with one `total`-byte file, generated chunk by chunk."""
    yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
           f"filename=\"adapter_model.safetensors\"\r\n\r\n").encode()
    chunk = bytes(MIB)
    for _ in range(total // MIB):
        yield chunk
    yield f"\r\n--{boundary}--\r\n".encode()


def test_oversize_upload_is_refused_with_flat_memory(fs_stack: Stack) -> None:
    total = 200 * MIB
    assert total > UPLOAD_LIMIT
    stored_before = sorted(fs_stack.storage_root.rglob("*")) if fs_stack.storage_root else []
    with fs_stack.client() as client, PeakRss(fs_stack.api.pid) as rss:
        response = client.post(
            "/v1/adapters", content=multipart_stream(total),  # chunked: no Content-Length
            headers={"Content-Type": "multipart/form-data; boundary=lorafoldtestboundary"})
    body = assert_problem(response, 413, "payload_too_large")
    assert str(UPLOAD_LIMIT) in body["detail"]
    assert rss.growth < MAX_RSS_GROWTH, f"API RSS grew by {rss.growth / MIB:.1f} MiB"
    stored_after = sorted(fs_stack.storage_root.rglob("*")) if fs_stack.storage_root else []
    assert stored_after == stored_before
    assert not list((fs_stack.root / "spool").glob("upload-*"))


def test_declared_oversize_is_refused_before_reading(fs_stack: Stack) -> None:
    """A Content-Length far past the limit is answered at once, body unread."""
    host, port = fs_stack.url.removeprefix("http://").split(":")
    request = (f"POST /v1/adapters HTTP/1.1\r\nHost: {host}\r\n"
               f"Authorization: Bearer {KEYS['tenant-a']}\r\n"
               "Content-Type: multipart/form-data; boundary=x\r\n"
               f"Content-Length: {10 * 1024 * MIB}\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request.encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            reply += data
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"application/problem+json" in head
    assert json.loads(payload)["code"] == "payload_too_large"


def test_large_upload_streams_with_flat_memory(fs_stack: Stack, tmp_path: Path) -> None:
    shapes = {f"model.layers.{i}.self_attn.q_proj": (2048, 2048) for i in range(24)}
    directory = write_random_adapter(tmp_path / "big", shapes, rank=128, seed=3)
    size = (directory / "adapter_model.safetensors").stat().st_size
    assert 40 * MIB < size < UPLOAD_LIMIT
    with fs_stack.client() as client, PeakRss(fs_stack.api.pid) as rss, \
            (directory / "adapter_model.safetensors").open("rb") as weights, \
            (directory / "adapter_config.json").open("rb") as config:
        response = client.post("/v1/adapters", data={"name": "big"}, files=[
            ("files", ("adapter_config.json", config)),
            ("files", ("adapter_model.safetensors", weights))])
    assert response.status_code == 201, response.text
    assert response.json()["size_bytes"] == size
    assert rss.growth < MAX_RSS_GROWTH, f"API RSS grew by {rss.growth / MIB:.1f} MiB"
