"""Read tensors out of a safetensors file with plain reads, hashing the file on the way.

A memory map (`safe_open`) keeps every page it has touched in the process's resident set
until the map is closed, so a merge that holds its inputs open for the whole run ends up
"using" the size of all its inputs. Copying each tensor's bytes out of the file instead
leaves them in the page cache, where the kernel may drop them, and the process holds one
module's inputs at a time.

The file's sha256 (needed for lineage) comes from the same bytes: a merge reads modules in
sorted order, which is the order safetensors stores them in, so each read usually starts
where the digest stopped. Whatever was skipped is read again when the digest is asked for.
A caller that already verified the file's sha256 (the service checks every blob it
downloads) passes it in, and nothing is hashed again.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from lorafold.adapters.safetensors_header import TensorInfo

CHUNK = 4 * 1024 * 1024
_TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "F64": torch.float64}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (F32, F16, BF16, F64)."""
    return _TORCH_DTYPES[name]


def all_finite(tensor: torch.Tensor) -> bool:
    """True when no entry is NaN or ±Inf.

    One summing pass decides the common case (a NaN or Inf makes the sum non-finite); only
    a non-finite sum, which finite values can also give by overflowing, pays for the exact
    element-wise test.
    """
    if math.isfinite(float(tensor.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(tensor).all())


class TensorFile:
    """An open safetensors file: `read` copies one tensor out, `sha256` digests the file."""

    def __init__(self, path: Path, data_start: int, *, sha256: str | None = None) -> None:
        self.path = path
        self._file = path.open("rb", buffering=0)
        self._digest = hashlib.sha256()
        self._hashed = 0                 # bytes [0, _hashed) are in the digest
        self._hex: str | None = sha256   # known: verified by whoever fetched the file
        if self._hex is None:
            self._digest_up_to(data_start)   # the header

    def read(self, info: TensorInfo) -> torch.Tensor:
        """A fresh tensor holding `info`'s bytes (little-endian, as safetensors stores them)."""
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        view = buffer.numpy().data
        self._read_into(view, info.offset)
        if info.offset == self._hashed and self._hex is None:
            self._digest.update(view)
            self._hashed += info.nbytes
        return buffer.view(torch_dtype(info.dtype)).reshape(info.shape)

    def sha256(self) -> str:
        """Hex sha256 of the whole file; reads only the bytes no `read` has covered."""
        if self._hex is None:
            self._digest_up_to(None)
            self._hex = self._digest.hexdigest()
        return self._hex

    def close(self) -> None:
        self._file.close()

    def _read_into(self, view: memoryview, offset: int) -> None:
        self._file.seek(offset)
        done = 0
        while done < len(view):
            got = self._file.readinto(view[done:])
            if not got:
                raise OSError(f"{self.path.name}: file ended at byte {offset + done}")
            done += got

    def _digest_up_to(self, end: int | None) -> None:
        """Extend the digest from where it stopped to `end` (None: the end of the file).

        Uses a handle of its own, so the digest can be finished after `close`.
        """
        with self.path.open("rb") as f:
            f.seek(self._hashed)
            while end is None or self._hashed < end:
                block = f.read(CHUNK if end is None else min(CHUNK, end - self._hashed))
                if not block:
                    break
                self._digest.update(block)
                self._hashed += len(block)
