"""Forward hooks add exactly the adapter's delta: the patched base matches PEFT's model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel

from lorafold.adapters import open_adapter
from lorafold.adapters.reader import ModuleSpec
from lorafold.errors import IncompatibleAdapters
from lorafold.tune.patch import Delta, fixed_delta, patched
from tests.peft_models import llama_inputs, make_peft_adapter, tiny_embed_conv, tiny_llama


def _deltas(adapter_dir: Path) -> dict[str, tuple[ModuleSpec, Delta]]:
    with open_adapter(adapter_dir) as adapter:
        out: dict[str, tuple[ModuleSpec, Delta]] = {}
        for name, spec in adapter.modules.items():
            loaded = adapter.load(name)
            out[name] = (spec, fixed_delta(spec, loaded.A.float(),
                                           loaded.B.float() * loaded.scale))
        return out


def test_patched_llama_matches_peft(tmp_path: Path) -> None:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    adapter = make_peft_adapter(tiny_llama, tmp_path / "lora", config, seed=0)
    ids = llama_inputs()
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_llama(), str(adapter)).eval()(ids).logits
        base = tiny_llama()
        plain = base(ids).logits
        with patched(base, _deltas(adapter)):
            got = base(ids).logits
        after = base(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(plain, want)
    torch.testing.assert_close(after, plain)  # hooks are gone after the block


def test_patched_embedding_matches_peft(tmp_path: Path) -> None:
    config = LoraConfig(r=3, lora_alpha=6, target_modules=["emb", "lin"])
    adapter = make_peft_adapter(tiny_embed_conv, tmp_path / "lora", config, seed=1)
    ids = torch.arange(10).reshape(2, 5)
    with torch.no_grad():
        want = PeftModel.from_pretrained(tiny_embed_conv(), str(adapter)).eval()(ids)
        base = tiny_embed_conv()
        with patched(base, _deltas(adapter)):
            got = base(ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_conv_module_is_refused_before_any_hook(tmp_path: Path) -> None:
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["lin", "conv"])
    adapter = make_peft_adapter(tiny_embed_conv, tmp_path / "lora", config, seed=0)
    model = tiny_embed_conv()
    with pytest.raises(IncompatibleAdapters) as caught, patched(model, _deltas(adapter)):
        pass
    assert caught.value.code == "tune_unsupported_module"
    assert not any(m._forward_hooks for m in model.modules())
