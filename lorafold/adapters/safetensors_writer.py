"""Write a safetensors file tensor by tensor, so a merge never holds its whole output.

The format puts a JSON header (every tensor's dtype, shape and byte range, plus string
metadata) before the data, yet a merge learns its tensors one module at a time and its
metadata (the lineage) last. So the writer leaves `reserve` bytes for the header, appends
each tensor's bytes behind it as it comes, and fills the header in at the end, padded with
spaces (which the format allows). A header that outgrew its reserve is not an error: the
data is then copied once behind a header of the right size.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from types import TracebackType

import torch

HEADER_ALIGN = 8                  # data starts 8-byte aligned, as safetensors' own writer does
_DTYPE_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.float64: "F64"}


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (F32, F16, BF16, F64)."""
    return _DTYPE_NAMES[dtype]


def entry_bytes(key: str, dtype: torch.dtype, shape: tuple[int, ...], max_offset: int) -> int:
    """An upper bound on the header bytes one tensor's entry takes."""
    entry = {key: {"dtype": dtype_name(dtype), "shape": list(shape),
                   "data_offsets": [max_offset, max_offset]}}
    return len(json.dumps(entry, separators=(",", ":")).encode())


def _aligned(size: int) -> int:
    return -(-size // HEADER_ALIGN) * HEADER_ALIGN


class SafetensorsWriter:
    """Append tensors to `path`; `finish(metadata)` writes the header. Use as a context
    manager: leaving it on an exception closes the file (the caller removes it)."""

    def __init__(self, path: Path, *, reserve: int) -> None:
        self.path = path
        self._reserve = _aligned(max(reserve, 2))
        self._file = path.open("wb", buffering=0)
        self._file.seek(8 + self._reserve)
        self._entries: dict[str, dict[str, object]] = {}
        self._end = 0                                   # bytes of data written so far

    def add(self, key: str, tensor: torch.Tensor) -> None:
        """Append one CPU tensor's bytes (written in the calling thread)."""
        if key in self._entries:
            raise ValueError(f"{key}: written twice")
        tensor = tensor.detach().contiguous()
        if tensor.device.type != "cpu":
            raise ValueError(f"{key}: tensor is on {tensor.device}, not the cpu")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            view = tensor.reshape(-1).view(torch.uint8).numpy().data
            done = 0
            while done < nbytes:
                done += self._file.write(view[done:])
        self._entries[key] = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape),
                              "data_offsets": [self._end, self._end + nbytes]}
        self._end += nbytes

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header (keys sorted, metadata first) and close the file."""
        header = {"__metadata__": metadata, **dict(sorted(self._entries.items()))}
        raw = json.dumps(header, separators=(",", ":")).encode()
        if len(raw) <= self._reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._reserve))
            self._file.write(raw + b" " * (self._reserve - len(raw)))
            self._file.close()
            return
        self._file.close()
        self._rewrite(raw)

    def _rewrite(self, raw: bytes) -> None:
        """The header outgrew its reserve: copy the data behind one of the right size."""
        size = _aligned(len(raw))
        moved = self.path.with_name(self.path.name + ".data")
        os.replace(self.path, moved)
        try:
            with moved.open("rb") as src, self.path.open("wb") as dst:
                dst.write(struct.pack("<Q", size) + raw + b" " * (size - len(raw)))
                src.seek(8 + self._reserve)
                shutil.copyfileobj(src, dst, 16 * 1024 * 1024)
        finally:
            moved.unlink(missing_ok=True)

    @property
    def data_bytes(self) -> int:
        return self._end

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> SafetensorsWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
