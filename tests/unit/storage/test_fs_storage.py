"""FilesystemStorage behaviour specific to the filesystem backend.

The backend-independent contract (round trip, sha256, NotFound, listing by prefix, ...)
runs against this backend and S3 in tests/integration/storage/test_storage_contract.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafold.errors import InvalidRequest, NotFound, StorageError
from lorafold.storage import FilesystemStorage, resolve_storage


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def failing_after(n_chunks: int, chunk: bytes = b"x" * 1000) -> Iterator[bytes]:
    for _ in range(n_chunks):
        yield chunk
    raise RuntimeError("source broke mid-stream")


@pytest.fixture
def fs(tmp_path: Path) -> FilesystemStorage:
    return FilesystemStorage(tmp_path / "store")


def test_keys_map_to_files_below_root(fs: FilesystemStorage) -> None:
    fs.put_bytes("a/b/c.bin", b"data")
    assert (fs.root / "a" / "b" / "c.bin").read_bytes() == b"data"


def test_failed_stream_leaves_no_temp_file(fs: FilesystemStorage) -> None:
    with pytest.raises(RuntimeError, match="mid-stream"):
        fs.put_stream("dir/obj", failing_after(5))
    assert all_files(fs.root) == []


def test_failed_overwrite_keeps_old_object_and_no_temp(fs: FilesystemStorage) -> None:
    fs.put_bytes("dir/obj", b"old")
    with pytest.raises(RuntimeError):
        fs.put_stream("dir/obj", failing_after(3))
    assert fs.get_bytes("dir/obj") == b"old"
    assert all_files(fs.root) == ["dir/obj"]


def test_write_is_not_visible_until_complete(fs: FilesystemStorage) -> None:
    seen: list[bool] = []

    def chunks() -> Iterator[bytes]:
        yield b"first"
        seen.append(fs.exists("obj"))  # mid-stream: the target must not exist yet
        yield b"second"

    result = fs.put_stream("obj", chunks())
    assert seen == [False]
    assert result.sha256 == hashlib.sha256(b"firstsecond").hexdigest()


def test_leftover_temp_files_are_not_listed(fs: FilesystemStorage) -> None:
    fs.put_bytes("a/real", b"1")
    (fs.root / "a" / ".tmp-real.crashed").write_bytes(b"partial")  # a crash leftover
    assert list(fs.list_keys("")) == ["a/real"]
    assert list(fs.list_keys("a/")) == ["a/real"]


def test_io_failure_is_storage_error_with_cause(fs: FilesystemStorage) -> None:
    fs.put_bytes("file", b"1")
    with pytest.raises(StorageError) as info:
        fs.put_bytes("file/child", b"2")  # parent is a file, not a directory
    assert isinstance(info.value.__cause__, OSError)


def test_directory_is_not_an_object(fs: FilesystemStorage) -> None:
    fs.put_bytes("d/x", b"1")
    assert not fs.exists("d")
    with pytest.raises(NotFound):
        fs.get_bytes("d")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_stream_closed_early_releases_the_file(fs: FilesystemStorage) -> None:
    fs.put_bytes("big", b"z" * 10_000)
    before = open_fds()
    stream = fs.open_stream("big", chunk_size=100)
    assert next(stream) == b"z" * 100
    stream.close()
    assert open_fds() == before
    assert list(stream) == []


def test_unopened_stream_is_closed_on_garbage_collection(fs: FilesystemStorage) -> None:
    fs.put_bytes("obj", b"abc")
    before = open_fds()
    stream = fs.open_stream("obj")
    assert open_fds() == before + 1
    del stream  # never iterated: must not leak the descriptor (or warn)
    assert open_fds() == before


def test_no_presigned_urls(fs: FilesystemStorage) -> None:
    fs.put_bytes("obj", b"1")
    assert fs.presigned_url("obj", 60) is None


def test_ping_fails_when_root_is_gone(tmp_path: Path) -> None:
    fs = FilesystemStorage(tmp_path / "store")
    fs.ping()
    os.rmdir(fs.root)
    with pytest.raises(StorageError):
        fs.ping()


def test_resolve_file_url_and_bare_path(tmp_path: Path) -> None:
    by_url = resolve_storage(f"file://{tmp_path}/a", endpoint_url="ignored-for-files")
    by_path = resolve_storage(str(tmp_path / "b"))
    assert isinstance(by_url, FilesystemStorage) and by_url.root == tmp_path / "a"
    assert isinstance(by_path, FilesystemStorage) and by_path.root == tmp_path / "b"


@pytest.mark.parametrize("url", ["", "s3://", "ftp://host/x", "file://otherhost/x"])
def test_resolve_refuses_bad_urls(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_storage(url)
    assert info.value.code == "invalid_storage_url"
