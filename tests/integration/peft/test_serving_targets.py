"""`--target`: a merge's output conforms to a serving engine, passes its own preflight, and
is still the same model in PEFT.

Two real PEFT adapters on a tiny Llama that target different module types in different
layers: their merge has v_proj in layer 0 only, which LoRAX would skip in every layer.
With target lorax the gap is filled with zero factors; the logits do not move.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from lorafold.adapters import open_adapter
from lorafold.adapters.serving import preflight
from lorafold.errors import InvalidRequest
from lorafold.merge import MergeRequest, merge_adapters
from tests.peft_models import llama_inputs, make_peft_adapter, tiny_llama


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("targets")
    q_both = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.0)
    v_first = LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], lora_dropout=0.0,
                         layers_to_transform=[0])
    return [make_peft_adapter(tiny_llama, root / "q", q_both, seed=1),
            make_peft_adapter(tiny_llama, root / "v", v_first, seed=2)]


def logits(adapter_dir: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)).eval()
    with torch.no_grad():
        out: torch.Tensor = model(llama_inputs()).logits
    return out


def test_lorax_target_fills_module_types_and_keeps_the_model(inputs: list[Path],
                                                             tmp_path: Path) -> None:
    plain = merge_adapters(inputs, tmp_path / "plain", MergeRequest(method="cat"))
    with open_adapter(plain.out_dir) as written:
        assert preflight(written, "lorax").ok is False  # v_proj missing in layer 1
    served = merge_adapters(inputs, tmp_path / "lorax",
                            MergeRequest(method="cat", target="lorax",
                                         base_model_name="org/tiny-llama"))
    verdict = served.report["serving"]
    assert verdict["target"] == "lorax" and verdict["ok"] is True, verdict
    config = json.loads((served.out_dir / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    tensors = load_file(str(served.out_dir / "adapter_model.safetensors"))
    filled = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert filled in tensors and not bool(tensors[filled].any())
    assert {t.dtype for t in tensors.values()} == {torch.float16}  # half unless asked
    # the same model: zero factors add nothing (float16 storage rounds the rest)
    reference, conformed = logits(plain.out_dir), logits(served.out_dir)
    assert torch.allclose(conformed, reference, atol=2e-3 * float(reference.abs().max()))


def test_vllm_target_passes_its_preflight_and_refuses_ranks_it_cannot_serve(
        inputs: list[Path], tmp_path: Path) -> None:
    served = merge_adapters(inputs, tmp_path / "vllm",
                            MergeRequest(method="ctm", rank=8, target="vllm", dtype="float32"))
    assert served.report["serving"]["ok"] is True
    assert torch.allclose(logits(served.out_dir),
                          logits(merge_adapters(inputs, tmp_path / "same",
                                                MergeRequest(method="ctm", rank=8)).out_dir))
    with pytest.raises(InvalidRequest) as info:
        merge_adapters(inputs, tmp_path / "big",
                       MergeRequest(method="ctm", rank=600, target="vllm"))
    assert info.value.code == "rank_exceeds_target"
    assert not (tmp_path / "big").exists()
    with pytest.raises(InvalidRequest) as info:
        merge_adapters(inputs, tmp_path / "x", MergeRequest(method="cat", target="triton"))
    assert info.value.code == "unknown_target"


def test_the_api_offers_exactly_the_cores_targets() -> None:
    import typing

    from app.schemas import MergeCreate
    from lorafold.merge.options import SERVING_TARGETS

    annotation = MergeCreate.model_fields["target"].annotation
    literal = next(a for a in typing.get_args(annotation) if a is not type(None))
    assert typing.get_args(literal) == SERVING_TARGETS
