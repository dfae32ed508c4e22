"""The model under unlearning: one base model, the original adapter, optionally a residual.

Everything is one PEFT model, so the reference views the methods need (base alone, base +
original adapter) are reached by switching adapters, never by a second copy of the base.
PEFT's switches also flip `requires_grad`; we re-apply our own choice of trainable tensors
after every switch so that a frozen original adapter stays frozen.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from lorafold.unlearn.datasets import Batch

logger = logging.getLogger(__name__)

ORIGINAL = "default"  # PEFT saves the adapter named "default" at the top of a directory
RESIDUAL = "residual"
View = Literal["base", "original"]


class UnlearnModel:
    """A PEFT model with the original adapter (trainable or frozen) and maybe a residual."""

    def __init__(self, base: nn.Module, adapter_dir: Path, *, train_original: bool) -> None:
        from peft import PeftModel

        self.peft: Any = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=ORIGINAL,
                                                   is_trainable=train_original)
        self.peft.eval()  # dropout off: unlearning steps on the deterministic function
        self.has_residual = False
        self._active_names = [ORIGINAL]
        self._trainable: set[int] = set()
        self._set_trainable(ORIGINAL if train_original else None)

    @property
    def device(self) -> torch.device:
        return next(self.peft.parameters()).device

    def _adapter_params(self, name: str) -> Iterator[nn.Parameter]:
        marker = f".{name}."
        for pname, param in self.peft.named_parameters():
            if "lora_" in pname and (marker in pname or pname.endswith(f".{name}")):
                yield param

    def _set_trainable(self, name: str | None) -> None:
        self._trainable = {id(p) for p in self._adapter_params(name)} if name else set()
        self._apply_trainable()

    def _apply_trainable(self) -> None:
        for pname, param in self.peft.named_parameters():
            if "lora_" in pname:
                param.requires_grad_(id(param) in self._trainable)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.peft.parameters() if id(p) in self._trainable]

    def add_residual(self, *, rank: int, target_modules: Sequence[str], seed: int) -> None:
        """A fresh LoRA (B = 0, so it starts as the identity) stacked on the frozen original."""
        from peft import LoraConfig

        torch.manual_seed(seed)  # lora_A's init
        # Same base-model name as the original, or merging the two would be refused.
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                            target_modules=list(target_modules), bias="none",
                            base_model_name_or_path=self.peft.peft_config[ORIGINAL]
                            .base_model_name_or_path)
        self.peft.add_adapter(RESIDUAL, config)
        self.peft.to(self.device)
        self.has_residual = True
        self._active_names = [ORIGINAL, RESIDUAL]
        self.peft.base_model.set_adapter(self._active_names)
        self._set_trainable(RESIDUAL)

    @contextlib.contextmanager
    def view(self, which: View) -> Iterator[None]:
        """Temporarily run as the base model alone, or as base + original adapter alone."""
        try:
            if which == "base":
                self.peft.base_model.disable_adapter_layers()
            else:
                self.peft.base_model.set_adapter([ORIGINAL])
            yield
        finally:
            if which == "base":
                self.peft.base_model.enable_adapter_layers()
            self.peft.base_model.set_adapter(self._active_names)
            self._apply_trainable()

    def __call__(self, batch: Batch, *, hidden_states: bool = False) -> Any:
        return self.peft(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         output_hidden_states=hidden_states, use_cache=False)

    def num_layers(self) -> int:
        return int(self.peft.get_base_model().config.num_hidden_layers)

    def save_adapter(self, name: str, out_dir: Path, *, dtype: torch.dtype | None = None) -> Path:
        """Write adapter `name` as a plain PEFT dir (config + safetensors) at `out_dir`."""
        if dtype is not None:
            for param in self._adapter_params(name):
                param.data = param.data.to(dtype)
        scratch = Path(tempfile.mkdtemp(prefix=".peft-save-", dir=out_dir.parent))
        try:
            self.peft.save_pretrained(str(scratch), selected_adapters=[name],
                                      save_embedding_layers=False)
            saved = scratch if name == ORIGINAL else scratch / name
            out_dir.mkdir(parents=True, exist_ok=True)
            for filename in ("adapter_config.json", "adapter_model.safetensors"):
                shutil.move(str(saved / filename), str(out_dir / filename))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return out_dir

    @contextlib.contextmanager
    def temporary_adapter(self, adapter_dir: Path, name: str = "probe") -> Iterator[None]:
        """Run as base + the adapter at `adapter_dir` alone, then drop it and switch back."""
        self.peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        self.peft.to(self.device)
        try:
            self.peft.base_model.set_adapter([name])
            yield
        finally:
            self.peft.base_model.set_adapter(self._active_names)
            self.peft.delete_adapter(name)
            self.peft.base_model.set_adapter(self._active_names)
            self._apply_trainable()

    def load_output(self, adapter_dir: Path, name: str = "output") -> None:
        """Switch to a written adapter alone, so that "after" metrics describe the real output."""
        self.peft.load_adapter(str(adapter_dir), adapter_name=name, is_trainable=False)
        self.peft.to(self.device)
        self._active_names = [name]
        self.peft.base_model.set_adapter(self._active_names)
        self._set_trainable(None)

    def close(self) -> None:
        """Drop the model and give GPU memory back (workers run many jobs per process)."""
        on_cuda = self.device.type == "cuda"
        self.peft = None
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
