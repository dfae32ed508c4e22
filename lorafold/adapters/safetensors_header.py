"""Check a safetensors file's header before anything else touches the file.

The format is: 8 bytes little-endian header length N, N bytes of JSON
``{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}``, then the data.
Reading the header ourselves lets us refuse oversized headers before allocating them and
name the tensor whose bytes run past the end of a truncated file.
"""

from __future__ import annotations

import itertools
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from lorafold.errors import InvalidAdapter

DEFAULT_HEADER_LIMIT = 16 * 1024 * 1024
DTYPE_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    offset: int             # where its bytes start, from the beginning of the file


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_start: int


def _malformed(path: Path, detail: str) -> InvalidAdapter:
    return InvalidAdapter(f"{path.name}: malformed safetensors file: {detail}",
                          code="malformed_safetensors")


def header_size(prefix: bytes, *, limit: int = DEFAULT_HEADER_LIMIT) -> int:
    """How many leading bytes of a safetensors file hold its header, from its first 8 bytes
    (8 + the header's length, capped at 8 + `limit`: a bigger header is refused anyway)."""
    if len(prefix) < 8:
        return len(prefix)
    (header_len,) = struct.unpack("<Q", prefix[:8])
    return 8 + min(header_len, limit)


def read_header(path: Path, *, limit: int = DEFAULT_HEADER_LIMIT) -> SafetensorsHeader:
    """Parse and check the header; raises InvalidAdapter with a precise code."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidAdapter(f"{path.name}: file is {size} bytes, too short to be "
                                 "safetensors", code="truncated_safetensors")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > limit:
            raise InvalidAdapter(f"{path.name}: header is {header_len} bytes, over the "
                                 f"limit of {limit}", code="header_too_large")
        if 8 + header_len > size:
            raise InvalidAdapter(f"{path.name}: header claims {header_len} bytes but the file "
                                 f"has {size}", code="truncated_safetensors")
        raw = f.read(header_len)
    try:
        parsed = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _malformed(path, f"header is not JSON ({e})") from e
    if not isinstance(parsed, dict):
        raise _malformed(path, "header is not a JSON object")
    metadata = parsed.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _malformed(path, "__metadata__ is not an object")
    data_start = 8 + header_len
    data_len = size - data_start
    tensors: dict[str, TensorInfo] = {}
    spans: list[tuple[int, int, str]] = []
    for name, entry in parsed.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise _malformed(path, f"entry {name!r} lacks dtype/shape/data_offsets") from e
        if dtype not in DTYPE_SIZES:
            raise InvalidAdapter(f"{path.name}: tensor {name!r} has dtype {dtype}; supported: "
                                 f"{', '.join(DTYPE_SIZES)}", code="unsupported_dtype")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if begin < 0 or end - begin != nbytes or any(d < 0 for d in shape):
            raise _malformed(path, f"tensor {name!r}: offsets {begin}..{end} do not match "
                                   f"shape {list(shape)} of {dtype}")
        if end > data_len:
            raise InvalidAdapter(f"{path.name}: tensor {name!r} ends at byte {end} of the data "
                                 f"section but the file holds only {data_len}; the file is "
                                 "truncated", code="truncated_safetensors")
        tensors[name] = TensorInfo(name, dtype, shape, nbytes, data_start + begin)
        spans.append((begin, end, name))
    spans.sort()
    for (_, prev_end, prev), (begin, _, name) in itertools.pairwise(spans):
        if begin < prev_end:
            raise _malformed(path, f"tensors {prev!r} and {name!r} overlap")
    return SafetensorsHeader(tensors, {str(k): str(v) for k, v in metadata.items()}, data_start)
