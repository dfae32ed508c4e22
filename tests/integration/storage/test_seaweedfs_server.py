"""The SeaweedFS launcher: binary lookup, side-by-side instances, stop by PID."""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import tempfile
from pathlib import Path

import pytest

from lorafold.errors import StorageError
from lorafold.servers.seaweedfs import GRPC_OFFSET, SeaweedFS, start_seaweedfs, weed_binary
from lorafold.storage.s3 import S3Storage


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def test_weed_binary_comes_from_the_environment() -> None:
    path = weed_binary()
    assert os.access(path, os.X_OK)
    assert Path(sys.prefix).resolve() in path.parents


def test_second_instance_runs_beside_the_first(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    other = start_seaweedfs(tmp_path / "data")  # no credentials: accepts any
    try:
        mine = set(seaweedfs.ports.values())
        assert not mine & set(other.ports.values())
        assert other.log_dir == (tmp_path / "data" / "logs").resolve()
        options = {**other.storage_options(), "access_key": "any", "secret_key": "thing"}
        storage = S3Storage("side-by-side", **options)
        storage.put_bytes("k", b"v")
        assert storage.get_bytes("k") == b"v"
        for port in other.ports.values():
            assert listening(port) and listening(port + GRPC_OFFSET)
    finally:
        other.stop()
    assert not other.process.alive()
    assert not any(listening(p) for p in other.ports.values())
    leftovers = [path for p in other.ports.values() for n in (p, p + GRPC_OFFSET)
                 for path in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{n}.sock")]
    assert leftovers == []
    assert seaweedfs.process.alive()


def test_pinned_port_in_use_is_refused(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        while True:  # a busy port whose gRPC twin (port + 10000) is a valid port number
            busy = stack.enter_context(socket.socket())
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            if port + GRPC_OFFSET <= 65535:
                break
        with pytest.raises(StorageError) as info:
            start_seaweedfs(tmp_path / "data", s3_port=port)
    assert info.value.code == "seaweedfs_start_failed"


def test_half_credentials_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        start_seaweedfs(tmp_path / "data", access_key="only-half")


def test_start_failure_reports_the_server_log(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mini.options").write_text("volume.max=not-a-number\n")  # weed exits at once
    with pytest.raises(StorageError) as info:
        start_seaweedfs(data, timeout=20)
    assert info.value.code == "seaweedfs_start_failed"
    assert "not-a-number" in str(info.value)  # the fatal line from weed's own log
    assert "exited with code" in str(info.value)
