"""Streamed .tar.gz / .zip writers: exact members at the root, chunk-sized output, refused
sizes that lie."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections.abc import Iterator

import pytest

from lorafold.adapters.archive_stream import Member, stream_archive

CHUNK = 64 * 1024
FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": os.urandom(700_001),
         "empty.txt": b""}


def chunks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), CHUNK):
        yield data[start:start + CHUNK]


def members(sizes: dict[str, int] | None = None) -> list[Member]:
    return [Member(name, (sizes or {}).get(name, len(data)), chunks(data))
            for name, data in FILES.items()]


def read_back(fmt: str, payload: bytes) -> dict[str, bytes]:
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            assert archive.testzip() is None
            return {i.filename: archive.read(i) for i in archive.infolist()}
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:gz") as tar:
        return {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                for m in tar.getmembers()}


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_round_trip_is_exact(fmt: str) -> None:
    assert read_back(fmt, b"".join(stream_archive(fmt, members()))) == FILES


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_output_comes_in_pieces_as_the_input_streams(fmt: str) -> None:
    """No piece is much larger than an input chunk: nothing accumulates the whole file."""
    pieces = list(stream_archive(fmt, members()))
    assert len(pieces) > 5
    assert max(len(p) for p in pieces) <= 2 * CHUNK


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_a_stream_of_another_size_than_announced_is_refused(fmt: str, delta: int) -> None:
    size = len(FILES["adapter_model.safetensors"]) + delta
    with pytest.raises(OSError, match="announced"):
        b"".join(stream_archive(fmt, members({"adapter_model.safetensors": size})))


def test_same_files_same_bytes() -> None:
    for fmt in ("tar.gz", "zip"):
        first = b"".join(stream_archive(fmt, members()))
        assert first == b"".join(stream_archive(fmt, members()))
