"""Plain-read tensor loading: same tensors as safetensors, sha256 from the same bytes, no
memory map left behind, and the one-pass finiteness check."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafold.adapters import open_adapter
from lorafold.adapters.safetensors_header import read_header
from lorafold.adapters.tensor_file import TensorFile, all_finite
from lorafold.synthetic import write_random_adapter

SHAPES = {f"model.layers.{i}.mlp.down_proj": (24, 40) for i in range(3)}


def weights(directory: Path) -> Path:
    return directory / "adapter_model.safetensors"


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reads_what_safetensors_reads(tmp_path: Path, dtype: torch.dtype) -> None:
    path = tmp_path / "t.safetensors"
    tensors = {"a": torch.randn(3, 5).to(dtype), "b": torch.randn(7).to(dtype),
               "c": torch.randn(2, 2, 1, 1).to(dtype)}
    save_file(tensors, str(path))
    header = read_header(path)
    file = TensorFile(path, header.data_start)
    try:
        for name, expected in load_file(str(path)).items():
            got = file.read(header.tensors[name])
            assert got.dtype == expected.dtype and torch.equal(got, expected)
    finally:
        file.close()


@pytest.mark.parametrize("order", ["file", "reversed", "none"])
def test_sha256_is_the_files_whatever_was_read(tmp_path: Path, order: str) -> None:
    directory = write_random_adapter(tmp_path / "a", SHAPES, rank=4)
    with open_adapter(directory) as adapter:
        names = {"file": list(adapter.modules), "reversed": list(adapter.modules)[::-1],
                 "none": []}[order]
        for name in names:
            adapter.load(name)
        assert adapter.sha256 == digest(weights(directory))


def test_sha256_after_close(tmp_path: Path) -> None:
    directory = write_random_adapter(tmp_path / "a", SHAPES, rank=4)
    with open_adapter(directory) as adapter:
        adapter.load(next(iter(adapter.modules)))
    assert adapter.sha256 == digest(weights(directory))


def test_no_memory_map_of_the_weights_stays_open(tmp_path: Path) -> None:
    """A map would keep every page read so far in the process's resident set."""
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("needs Linux /proc")
    directory = write_random_adapter(tmp_path / "a", SHAPES, rank=4)
    with open_adapter(directory) as adapter:
        for name in adapter.modules:
            adapter.load(name)
        assert str(weights(directory).resolve()) not in maps.read_text()


def test_all_finite() -> None:
    assert all_finite(torch.randn(50, 50))
    assert all_finite(torch.full((4, 4), 3e38))              # the sum overflows; values don't
    assert all_finite(torch.full((300,), 60000.0, dtype=torch.float16))
    assert all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensor = torch.randn(30, 30)
        tensor[7, 3] = bad
        assert not all_finite(tensor)
        assert not all_finite(tensor.to(torch.bfloat16))
