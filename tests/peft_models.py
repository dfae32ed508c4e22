"""Tiny transformers models built from a config, and real PEFT adapters trained-free on them.

PEFT initialises lora_B to zero; we fill every LoRA factor with seeded noise so each adapter
has a non-trivial delta, then save it with PEFT's own `save_pretrained`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

BASE_NAME = "lorafold-tests/tiny"


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    model.config.name_or_path = BASE_NAME
    return model


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(config).eval()
    model.config.name_or_path = BASE_NAME + "-gpt2"
    return model


class EmbedConvNet(nn.Module):
    """Embedding → Linear → Conv2d: the three layer kinds PEFT LoRA has, in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.lin = nn.Linear(16, 16)
        self.conv = nn.Conv2d(1, 6, kernel_size=3, padding=1)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.lin(self.emb(ids))                    # batch × seq × 16
        return self.conv(h.unsqueeze(1)).flatten(1)    # batch × (6·seq·16)


def tiny_embed_conv(seed: int = 0) -> EmbedConvNet:
    torch.manual_seed(seed)
    return EmbedConvNet().eval()


def make_peft_adapter(base_factory: Callable[[], nn.Module], out_dir: Path, config: LoraConfig,
                      seed: int) -> Path:
    model = get_peft_model(base_factory(), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.3)
    model.save_pretrained(str(out_dir))
    return out_dir


def llama_inputs() -> torch.Tensor:
    return torch.arange(12).reshape(2, 6) % 64
