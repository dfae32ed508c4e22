"""Real PEFT on both sides: PEFT writes the inputs, PEFT loads our output.

References are computed independently of lorafold's reader: PEFT's own
`add_weighted_adapter(combination_type="cat")` + `merge_and_unload()` for exact sums, and a
dense delta built straight from our output file (own transpose/reshape rules) for the rest.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from torch import nn

from lorafold.merge import MergeRequest, merge_adapters
from tests.peft_models import (
    llama_inputs,
    make_peft_adapter,
    tiny_embed_conv,
    tiny_gpt2,
    tiny_llama,
)

ATOL = 2e-4


def peft_cat_reference(factory: Callable[[], nn.Module], adapters: list[Path],
                       weights: list[float]) -> nn.Module:
    """PEFT's exact weighted sum of the adapters, merged into a fresh base."""
    model = PeftModel.from_pretrained(factory(), str(adapters[0]), adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "sum", combination_type="cat")
    model.set_adapter("sum")
    return model.merge_and_unload().eval()


def load_merged(factory: Callable[[], nn.Module], out: Path) -> nn.Module:
    return PeftModel.from_pretrained(factory(), str(out)).eval()


def apply_delta_independently(base: nn.Module, out: Path, fan_in_fan_out: bool) -> nn.Module:
    """Base model with our output's delta added by hand (scale r/alpha = 1)."""
    model = copy.deepcopy(base)
    tensors = load_file(str(out / "adapter_model.safetensors"))
    modules = dict(model.named_modules())
    for key, a in tensors.items():
        if ".lora_A." not in key and not key.endswith("lora_embedding_A"):
            continue
        b = tensors[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
        name = key.split(".lora_")[0].removeprefix("base_model.model.")
        layer = modules[name]
        delta = b.flatten(1) @ a.flatten(1)
        if isinstance(layer, nn.Embedding) or fan_in_fan_out:
            delta = delta.T
        with torch.no_grad():
            layer.weight += delta.reshape(layer.weight.shape)
    return model.eval()


def outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        result = model(inputs)
    return result.logits if hasattr(result, "logits") else result


@pytest.fixture(scope="module")
def llama_adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("llama")
    configs = [
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                   rank_pattern={"v_proj": 2}, alpha_pattern={"up_proj": 3}),
        LoraConfig(r=6, lora_alpha=4, target_modules=["q_proj", "v_proj", "up_proj"],
                   use_rslora=True),
        LoraConfig(r=3, lora_alpha=3, target_modules=["q_proj", "k_proj"]),
    ]
    return [make_peft_adapter(tiny_llama, root / f"a{i}", c, seed=10 + i)
            for i, c in enumerate(configs)]


def test_llama_cat_equals_peft_cat(llama_adapters: list[Path], tmp_path: Path) -> None:
    weights = [1.0, 0.5, -1.0]
    out = merge_adapters(llama_adapters, tmp_path / "cat",
                         MergeRequest(method="cat", weights=tuple(weights))).out_dir
    ours = outputs(load_merged(tiny_llama, out), llama_inputs())
    reference = outputs(peft_cat_reference(tiny_llama, llama_adapters, weights), llama_inputs())
    base = outputs(tiny_llama(), llama_inputs())
    assert (reference - base).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("method", ["ctm", "core"])
def test_llama_full_rank_ta_equals_the_sum(llama_adapters: list[Path], tmp_path: Path,
                                           method: str) -> None:
    """Mixed ranks (rank_pattern), alpha_pattern, rsLoRA and partial target overlap."""
    weights = [0.7, 1.0, 0.4]
    out = merge_adapters(llama_adapters, tmp_path / method,
                         MergeRequest(method=method, rule="ta", rank=13,
                                      weights=tuple(weights))).out_dir
    ours = outputs(load_merged(tiny_llama, out), llama_inputs())
    reference = outputs(peft_cat_reference(tiny_llama, llama_adapters, weights), llama_inputs())
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize(("method", "rule"), [("ctm", "ties"), ("ctm", "dare"), ("mtc", "ta"),
                                              ("ctm", "iso")])
def test_llama_compressed_output_loads_and_matches_its_delta(
        llama_adapters: list[Path], tmp_path: Path, method: str, rule: str) -> None:
    result = merge_adapters(llama_adapters, tmp_path / "out",
                            MergeRequest(method=method, rule=rule, rank=4, seed=3))
    peft_out = outputs(load_merged(tiny_llama, result.out_dir), llama_inputs())
    by_hand = outputs(apply_delta_independently(tiny_llama(), result.out_dir, False),
                      llama_inputs())
    torch.testing.assert_close(peft_out, by_hand, atol=ATOL, rtol=1e-4)
    config = PeftModel.from_pretrained(tiny_llama(), str(result.out_dir)).peft_config["default"]
    assert config.r == 4 and config.lora_alpha == 4 and not config.use_rslora
    assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "up_proj"}
    inputs = {row["input"] for row in result.report["inputs"]}
    assert inputs == {str(p) for p in llama_adapters}


def test_gpt2_conv1d_fan_in_fan_out(tmp_path: Path) -> None:
    configs = [LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                          fan_in_fan_out=True),
               LoraConfig(r=2, lora_alpha=2, target_modules=["c_attn"], fan_in_fan_out=True,
                          use_rslora=True)]
    adapters = [make_peft_adapter(tiny_gpt2, tmp_path / f"g{i}", c, seed=20 + i)
                for i, c in enumerate(configs)]
    weights = [1.0, 0.8]
    out = merge_adapters(adapters, tmp_path / "ctm", MergeRequest(
        method="ctm", rule="ta", rank=6, weights=tuple(weights))).out_dir
    ours = outputs(load_merged(tiny_gpt2, out), llama_inputs())
    reference = outputs(peft_cat_reference(tiny_gpt2, adapters, weights), llama_inputs())
    torch.testing.assert_close(ours, reference, atol=ATOL, rtol=1e-4)
    low = merge_adapters(adapters, tmp_path / "low", MergeRequest(method="ctm", rank=2)).out_dir
    torch.testing.assert_close(
        outputs(load_merged(tiny_gpt2, low), llama_inputs()),
        outputs(apply_delta_independently(tiny_gpt2(), low, True), llama_inputs()),
        atol=ATOL, rtol=1e-4)


def test_embedding_and_conv2d(tmp_path: Path) -> None:
    configs = [LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "lin", "conv"]),
               LoraConfig(r=2, lora_alpha=2, target_modules=["emb", "conv"])]
    adapters = [make_peft_adapter(tiny_embed_conv, tmp_path / f"e{i}", c, seed=30 + i)
                for i, c in enumerate(configs)]
    ids = torch.tensor([[1, 5, 7, 49]])
    out = merge_adapters(adapters, tmp_path / "ctm",
                         MergeRequest(method="ctm", rule="ta", rank=5)).out_dir
    torch.testing.assert_close(
        outputs(load_merged(tiny_embed_conv, out), ids),
        outputs(peft_cat_reference(tiny_embed_conv, adapters, [1.0, 1.0]), ids),
        atol=ATOL, rtol=1e-4)
    low = merge_adapters(adapters, tmp_path / "low", MergeRequest(method="ctm", rank=2)).out_dir
    torch.testing.assert_close(
        outputs(load_merged(tiny_embed_conv, low), ids),
        outputs(apply_delta_independently(tiny_embed_conv(), low, False), ids),
        atol=ATOL, rtol=1e-4)


def test_half_precision_inputs_keep_their_dtype(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    path = make_peft_adapter(tiny_llama, tmp_path / "a", config, seed=1)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    from safetensors.torch import save_file
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    out = merge_adapters([path], tmp_path / "out",
                         MergeRequest(method="ctm", rule="ta", rank=4)).out_dir
    merged = load_file(str(out / "adapter_model.safetensors"))
    assert {v.dtype for v in merged.values()} == {torch.bfloat16}
    stored = load_file(str(path / "adapter_model.safetensors"))
    reference = {k: v.double() for k, v in stored.items()}
    key = next(k for k in merged if k.endswith("lora_A.weight"))
    ours = merged[key.replace("lora_A", "lora_B")].double() @ merged[key].double()
    theirs = reference[key.replace("lora_A", "lora_B")] @ reference[key] * 2.0
    assert float((ours - theirs).norm() / theirs.norm()) < 2e-2  # bf16 output rounding
