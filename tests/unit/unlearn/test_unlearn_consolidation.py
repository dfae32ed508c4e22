"""feature_alignment's output: original + residual written exactly (cat) or compressed (ctm).

The residual here is seeded noise, not a trained one: exactness is a property of the
writing, whatever the residual holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorafold.adapters import open_adapter
from lorafold.adapters.config import model_path
from lorafold.unlearn.consolidation import consolidate, consolidation_request, written_view
from lorafold.unlearn.datasets import Batch, TextDataset, encode, make_batches, pad_id_of
from lorafold.unlearn.hyperparams import Hyperparams
from lorafold.unlearn.model import RESIDUAL, UnlearnModel
from tests.unlearn_world import FactWorld

CPU = torch.device("cpu")


def stacked_model(world: FactWorld, *, residual_rank: int) -> UnlearnModel:
    from transformers import AutoModelForCausalLM

    model = UnlearnModel(AutoModelForCausalLM.from_pretrained(str(world.base_dir)),
                         world.adapter_dir, train_original=False)
    with open_adapter(world.adapter_dir) as original:
        targets = [model_path(n) for n in original.modules]
    model.add_residual(rank=residual_rank, target_modules=targets, seed=0)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.peft.named_parameters():
            if f".{RESIDUAL}." in name:  # B starts at 0: give the residual a real effect
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def one_batch(world: FactWorld) -> Batch:
    """Every forget and retain fact in one padded batch."""
    data = TextDataset(world.forget.examples + world.retain.examples)
    return make_batches(encode(world.tokenizer, data), batch_size=len(data),
                        pad_id=pad_id_of(world.tokenizer))[0]


def logits(model: UnlearnModel, world: FactWorld) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(one_batch(world)).logits
    return out


def written_logits(world: FactWorld, adapter_dir: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(world.base_dir)),
                                     str(adapter_dir))
    peft.eval()
    batch = one_batch(world)
    with torch.no_grad():
        out: torch.Tensor = peft(input_ids=batch.input_ids,
                                 attention_mask=batch.attention_mask).logits
    return out


def test_exact_consolidation_gives_the_stacked_models_logits(fact_world: FactWorld,
                                                              tmp_path: Path) -> None:
    model = stacked_model(fact_world, residual_rank=4)
    stacked = logits(model, fact_world)
    with open_adapter(fact_world.adapter_dir) as original:
        with model.view("original"):
            original_only = logits(model, fact_world)
        request = consolidation_request(original, Hyperparams(), residual_rank=4)
        assert request.method == "cat"
        record = consolidate(model, original, request, tmp_path / "out", device=CPU)
    assert record["exact"] is True and record["output_rank"] == fact_world.rank + 4
    written = written_logits(fact_world, tmp_path / "out")
    scale = stacked.abs().max()
    assert (stacked - original_only).abs().max() > 0.05 * scale  # the residual matters
    assert torch.allclose(written, stacked, atol=1e-5 * float(scale), rtol=0), \
        float((written - stacked).abs().max())


def test_lossy_output_rank_compresses_and_the_view_is_what_is_written(
        fact_world: FactWorld, tmp_path: Path) -> None:
    model = stacked_model(fact_world, residual_rank=4)
    stacked = logits(model, fact_world)
    with open_adapter(fact_world.adapter_dir) as original:
        hp = Hyperparams(output_rank=fact_world.rank)
        request = consolidation_request(original, hp, residual_rank=4)
        assert (request.method, request.rank) == ("ctm", fact_world.rank)
        with written_view(model, original, request, scratch_root=tmp_path, device=CPU):
            viewed = logits(model, fact_world)
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # the view cleans up
        assert torch.equal(logits(model, fact_world), stacked)   # and switches back
        record = consolidate(model, original, request, tmp_path / "out", device=CPU)
    assert record["exact"] is False and record["output_rank"] == fact_world.rank
    assert min(entry["mean_energy"] for entry in record["inputs"]) < 0.999
    written = written_logits(fact_world, tmp_path / "out")
    assert torch.allclose(viewed, written, atol=1e-5, rtol=0)
    assert not torch.allclose(written, stacked, atol=1e-3, rtol=0)  # lossy, as reported
    # at or above the exact rank, a requested output rank is simply exact
    with open_adapter(fact_world.adapter_dir) as original:
        big = Hyperparams(output_rank=fact_world.rank + 4)
        assert consolidation_request(original, big, residual_rank=4).method == "cat"


@pytest.mark.parametrize("output_rank", [None, 100])
def test_default_and_large_output_ranks_are_exact(fact_world: FactWorld,
                                                  output_rank: int | None) -> None:
    with open_adapter(fact_world.adapter_dir) as original:
        request = consolidation_request(original, Hyperparams(output_rank=output_rank),
                                        residual_rank=fact_world.rank)
    assert request.method == "cat" and request.weights == (1.0, 1.0)
