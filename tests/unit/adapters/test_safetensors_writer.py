"""The streaming safetensors writer: files that safetensors itself reads back, whatever
the header's reserve, and the adapter writer's all-or-nothing publishing."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

from lorafold.adapters import open_adapter, tensor_file
from lorafold.adapters.safetensors_writer import SafetensorsWriter
from lorafold.adapters.writer import AdapterWriter, MergedModule
from lorafold.errors import NumericalError
from lorafold.synthetic import write_random_adapter
from tests.unit.adapters.test_tensor_file import weights


def tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"b.weight": torch.randn(5, 3, generator=gen).to(torch.bfloat16),
            "a.weight": torch.randn(3, 7, generator=gen).to(torch.bfloat16),
            "c": torch.randn(2, 2, 1, 1, generator=gen).to(torch.bfloat16)}


@pytest.mark.parametrize("reserve", [4096, 10], ids=["fits", "too-small"])
def test_written_files_read_back_in_safetensors(tmp_path: Path, reserve: int) -> None:
    path = tmp_path / "w.safetensors"
    expected = tensors()
    with SafetensorsWriter(path, reserve=reserve) as writer:
        for key, tensor in expected.items():
            writer.add(key, tensor)
        writer.finish({"format": "pt", "note": "x" * 300})
    assert not path.with_name(path.name + ".data").exists()
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x" * 300}
        assert sorted(f.keys()) == sorted(expected)
        for key, tensor in expected.items():
            assert torch.equal(f.get_tensor(key), tensor)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_len % 8 == 0
    assert (header_len >= 4096) == (reserve == 4096)      # the reserve was used when it fit


def spec_module(directory: Path) -> MergedModule:
    with open_adapter(write_random_adapter(directory, {"model.l.0.q": (6, 4)}, rank=2)) as a:
        spec = next(iter(a.modules.values()))
    return MergedModule(spec, torch.randn(6, 2), torch.randn(2, 4))


def test_an_adapter_writer_left_without_finish_leaves_nothing(tmp_path: Path) -> None:
    module = spec_module(tmp_path / "in")
    out = tmp_path / "out"
    with pytest.raises(NumericalError), AdapterWriter(out, rank=2, dtype=torch.float32,
                                                      reserve=1024) as writer:
        writer.add(module)
        writer.add(MergedModule(module.spec, module.B * float("nan"), module.A))
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["in"]


def test_an_adapter_writer_publishes_an_adapter_that_loads(tmp_path: Path) -> None:
    module = spec_module(tmp_path / "in")
    out = tmp_path / "out"
    config = {"r": 3, "lora_alpha": 3, "peft_type": "LORA", "target_modules": ["q"]}
    with AdapterWriter(out, rank=3, dtype=torch.float16, reserve=0) as writer:
        writer.add(module)
        path = writer.finish(config=config, lineage={"kind": "merge"}, report={"x": 1})
    with open_adapter(path) as adapter:
        loaded = adapter.load(module.spec.name)
        assert loaded.B.dtype == torch.float16 and loaded.B.shape == (6, 3)
        assert torch.allclose((loaded.B.float() @ loaded.A.float()),
                              module.B @ module.A, atol=1e-2)
        assert json.loads(adapter.metadata["lorafold.lineage"]) == {"kind": "merge"}
    assert json.loads((path / "lorafold.json").read_text()) == {"kind": "merge",
                                                                 "report": {"x": 1}}


def test_a_known_sha256_is_used_and_the_file_is_not_hashed(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           ) -> None:
    directory = write_random_adapter(tmp_path / "a", {"model.l.0.q": (6, 4)}, rank=2)
    true = hashlib.sha256(weights(directory).read_bytes()).hexdigest()
    hashed: list[int] = []
    real_sha256 = hashlib.sha256

    class Counting:
        def __init__(self) -> None:
            self._inner = real_sha256()

        def update(self, data: bytes | memoryview) -> None:
            hashed.append(len(data))
            self._inner.update(data)

        def hexdigest(self) -> str:
            return self._inner.hexdigest()

    monkeypatch.setattr(tensor_file, "hashlib", SimpleNamespace(sha256=Counting))
    with open_adapter(directory, sha256=true) as known:
        known.validate()
        assert known.sha256 == true and hashed == []
    with open_adapter(directory) as unknown:    # without one: hashed on the way
        unknown.validate()
        assert unknown.sha256 == true and sum(hashed) == weights(directory).stat().st_size
