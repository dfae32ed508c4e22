"""Serving-engine preflight: adapters that break each rule are flagged, good ones pass."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from lorafold.adapters import open_adapter
from lorafold.adapters.serving import layer_coverage, preflight, vllm_max_lora_rank
from lorafold.errors import InvalidRequest
from lorafold.synthetic import write_random_adapter

TWO_LAYERS = {f"model.layers.{i}.self_attn.{p}": (16, 16)
              for i in range(2) for p in ("q_proj", "v_proj")}


def verdict(directory: Path, target: str) -> dict[str, dict[str, object]]:
    with open_adapter(directory) as adapter:
        result = preflight(adapter, target)
    checks = {c["rule"]: c for c in result.to_dict()["checks"]}
    checks["_"] = {"ok": result.ok}
    return checks


def adapter(tmp_path: Path, name: str = "a", *, shapes: dict[str, tuple[int, int]] = TWO_LAYERS,
            rank: int = 8, **config: object) -> Path:
    return write_random_adapter(tmp_path / name, shapes, rank=rank, base_model="org/base",
                                config_overrides=config)


def test_a_plain_adapter_loads_everywhere(tmp_path: Path) -> None:
    good = adapter(tmp_path)
    for target in ("peft", "vllm", "lorax", "tgi"):
        checks = verdict(good, target)
        assert checks["_"]["ok"] is True, target
        assert all(c["ok"] for k, c in checks.items() if k != "_"), (target, checks)


def test_vllm_rank_limits(tmp_path: Path) -> None:
    assert [vllm_max_lora_rank(r) for r in (1, 8, 9, 16, 17, 320, 321, 512, 513)] == [
        1, 8, 16, 16, 32, 320, 512, 512, None]
    big = verdict(adapter(tmp_path, "r40", rank=40), "vllm")
    assert big["vllm_rank"]["ok"] is False and big["vllm_rank"]["severity"] == "warning"
    assert "--max-lora-rank 64" in str(big["vllm_rank"]["fix"])
    assert big["_"]["ok"] is True  # loads, with the flag it names
    huge = verdict(adapter(tmp_path, "r600", shapes={"model.layers.0.q_proj": (700, 700)},
                           rank=600), "vllm")
    assert huge["vllm_rank"]["ok"] is False and huge["_"]["ok"] is False


def test_vllm_refuses_per_module_patterns(tmp_path: Path) -> None:
    patterned = adapter(tmp_path, alpha_pattern={"v_proj": 3.0})
    checks = verdict(patterned, "vllm")
    assert checks["vllm_patterns"]["ok"] is False and checks["_"]["ok"] is False
    assert "v_proj" in str(checks["vllm_patterns"]["message"])
    assert verdict(patterned, "peft")["_"]["ok"] is True


def test_lorax_needs_every_module_type_in_every_layer(tmp_path: Path) -> None:
    gappy = {k: v for k, v in TWO_LAYERS.items() if k != "model.layers.1.self_attn.v_proj"}
    with open_adapter(adapter(tmp_path, "g", shapes=gappy)) as opened:
        assert layer_coverage(opened.modules.values()) == {"v_proj": [1]}
    checks = verdict(tmp_path / "g", "lorax")
    assert checks["lorax_coverage"]["ok"] is False and checks["_"]["ok"] is False
    assert verdict(tmp_path / "g", "vllm")["_"]["ok"] is True  # vLLM does not care


def test_lorax_drops_keys_without_the_peft_prefix(tmp_path: Path) -> None:
    directory = adapter(tmp_path)
    path = directory / "adapter_model.safetensors"
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    checks = verdict(directory, "lorax")
    assert checks["lorax_keys"]["ok"] is False and checks["_"]["ok"] is False


def test_lorax_warnings_do_not_block(tmp_path: Path) -> None:
    local = write_random_adapter(tmp_path / "local", TWO_LAYERS, rank=4,
                                 base_model="/home/me/models/llama")
    checks = verdict(local, "lorax")
    assert checks["lorax_cuda_graphs"]["ok"] is False  # rank 4 < 8
    assert checks["lorax_base_model"]["ok"] is False
    assert {checks[k]["severity"] for k in ("lorax_cuda_graphs", "lorax_base_model")} == {
        "warning"}
    assert checks["_"]["ok"] is True


def test_unknown_target_is_refused(tmp_path: Path) -> None:
    with open_adapter(adapter(tmp_path)) as opened, pytest.raises(InvalidRequest) as info:
        preflight(opened, "triton")
    assert info.value.code == "unknown_target"


def test_inspect_target_exit_codes(tmp_path: Path) -> None:
    good = adapter(tmp_path, "good")
    patterned = adapter(tmp_path, "p", rank_pattern={"q_proj": 4})  # q_proj factors cut to 4
    tensors = load_file(str(patterned / "adapter_model.safetensors"))
    for key in [k for k in tensors if "q_proj" in k and "lora_A" in k]:
        tensors[key] = tensors[key][:4].contiguous()
    for key in [k for k in tensors if "q_proj" in k and "lora_B" in k]:
        tensors[key] = tensors[key][:, :4].contiguous()
    save_file(tensors, str(patterned / "adapter_model.safetensors"), metadata={"format": "pt"})

    def inspect(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lorafold", "inspect", str(path),
                               "--target", "vllm", "--json"], capture_output=True, text=True,
                              timeout=120)

    ok, bad = inspect(good), inspect(patterned)
    assert ok.returncode == 0 and json.loads(ok.stdout)["preflight"]["ok"] is True
    assert bad.returncode == 1, bad.stderr
    assert json.loads(bad.stdout)["preflight"]["ok"] is False
