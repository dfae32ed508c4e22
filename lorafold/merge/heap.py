"""Keep freed buffers in the process from one module to the next.

A CPU merge allocates and frees the same few buffer sizes for every module: the read
buffers, the float32 stacks B̂ and Â, the products. glibc hands a freed chunk above its
mmap threshold straight back to the kernel and trims a free heap top above its trim
threshold, so the next module faults the same memory in again, one zeroed 4 KiB page at a
time: a 70B-shaped merge (bench/merge_70b.py, 2 cores) took 0.78–0.87 M page faults and
2.3–2.7 s of system time that way. With the thresholds raised once (`mallopt`) freed chunks
are reused: 63 K faults, 1.1–1.3 s, and the merge took 12.4–13.6 s against 14.1–16.3 (four
alternating runs each). The price is that the process keeps up to `TRIM_THRESHOLD` of free
heap after a merge (never more than its peak). Elsewhere than glibc this does nothing.
"""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Chunks below this come from the heap, so they can be reused: a 70B module's
# largest buffer, 28672×128 float32, is 14.7 MB. Larger buffers are mapped as before.
MMAP_THRESHOLD = 32 * 1024 * 1024
TRIM_THRESHOLD = 256 * 1024 * 1024


@functools.cache
def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process (once); True where done."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
