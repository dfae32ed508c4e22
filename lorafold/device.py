"""Pick the compute device. Kept apart so nothing touches CUDA at import time.

Callers resolve the device inside the process that computes (a worker's job process),
never in a parent that forks afterwards: an initialised CUDA context does not survive fork.
"""

from __future__ import annotations

import torch

from lorafold.errors import InvalidRequest


def resolve_device(name: str | None = None) -> torch.device:
    """`None`/'auto': cuda when available, else cpu. An explicit unavailable device is refused."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise InvalidRequest(f"unknown device {name!r}", code="invalid_device") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidRequest("device cuda requested but no GPU is available",
                                 code="device_unavailable")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidRequest(f"device {name} does not exist", code="device_unavailable")
    elif device.type != "cpu":
        raise InvalidRequest(f"device {name!r} is not supported (cpu, cuda)",
                             code="invalid_device")
    return device


def release_device_memory(device: torch.device) -> None:
    """Give cached GPU memory back after a job so the next one starts clean."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
