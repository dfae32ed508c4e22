"""The Storage contract, written once and run against every backend (filesystem, S3)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

import pytest

from lorafold.errors import InvalidRequest, NotFound
from lorafold.storage import Storage


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def test_round_trip_bytes(storage: Storage) -> None:
    data = payload(3000)
    result = storage.put_bytes("dir/obj.bin", data)
    assert (result.size, result.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert storage.get_bytes("dir/obj.bin") == data


def test_put_stream_hashes_while_streaming(storage: Storage) -> None:
    data = payload(100_000, seed=1)
    chunks = [b"", *chunked(data, 777), b""]
    result = storage.put_stream("obj", iter(chunks))
    assert result.size == len(data)
    assert result.sha256 == hashlib.sha256(data).hexdigest()
    read = list(storage.open_stream("obj", chunk_size=4096))
    assert all(0 < len(c) <= 4096 for c in read)
    assert b"".join(read) == data


def test_empty_object(storage: Storage) -> None:
    result = storage.put_stream("empty", iter([]))
    assert (result.size, result.sha256) == (0, hashlib.sha256(b"").hexdigest())
    assert storage.exists("empty")
    assert storage.get_bytes("empty") == b""


def test_overwrite_replaces(storage: Storage) -> None:
    storage.put_bytes("k", b"old")
    storage.put_bytes("k", b"new!")
    assert storage.get_bytes("k") == b"new!"


def test_missing_key_is_not_found(storage: Storage) -> None:
    calls = [lambda: storage.get_bytes("no/such"),
             lambda: storage.open_stream("no/such"),  # raised on open, not on first read
             lambda: storage.copy("no/such", "dst"),
             lambda: storage.move("no/such", "dst")]
    for call in calls:
        with pytest.raises(NotFound) as info:
            call()
        assert info.value.code == "object_not_found"
    assert not storage.exists("dst")


def test_exists_and_idempotent_delete(storage: Storage) -> None:
    assert not storage.exists("a/b")
    storage.put_bytes("a/b", b"1")
    assert storage.exists("a/b")
    storage.delete("a/b")
    assert not storage.exists("a/b")
    storage.delete("a/b")  # deleting a missing key is fine


def test_list_keys_by_prefix(storage: Storage) -> None:
    keys = ["a/b/1", "a/b/2", "a/bc/3", "a/c", "b/x"]
    for key in reversed(keys):
        storage.put_bytes(key, key.encode())
    assert list(storage.list_keys("")) == keys
    assert list(storage.list_keys("a/b/")) == ["a/b/1", "a/b/2"]
    assert list(storage.list_keys("a/b")) == ["a/b/1", "a/b/2", "a/bc/3"]
    assert list(storage.list_keys("a/")) == ["a/b/1", "a/b/2", "a/bc/3", "a/c"]
    assert list(storage.list_keys("zzz/")) == []


def test_copy_and_move(storage: Storage) -> None:
    storage.put_bytes("src", b"payload")
    storage.copy("src", "copies/one")
    assert storage.get_bytes("copies/one") == b"payload"
    storage.move("src", "moved/two")
    assert not storage.exists("src")
    assert storage.get_bytes("moved/two") == b"payload"


def test_failed_stream_writes_nothing(storage: Storage) -> None:
    storage.put_bytes("kept", b"old")

    def broken() -> Iterator[bytes]:
        yield b"partial data"
        raise RuntimeError("source broke")

    for key in ("new", "kept"):
        with pytest.raises(RuntimeError, match="source broke"):  # the caller's own error
            storage.put_stream(key, broken())
    assert not storage.exists("new")
    assert storage.get_bytes("kept") == b"old"
    assert list(storage.list_keys("")) == ["kept"]


@pytest.mark.parametrize("key", ["", "/abs", "a//b", "../up", "a/./b", ".hidden", "a/"])
def test_malformed_keys_are_refused(storage: Storage, key: str) -> None:
    with pytest.raises(InvalidRequest):
        storage.put_bytes(key, b"x")
    with pytest.raises(InvalidRequest):
        storage.get_bytes(key)


def test_ping(storage: Storage) -> None:
    storage.ping()
