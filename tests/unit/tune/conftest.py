"""Fixtures for tuned merges: a tiny base, two task adapters and a pure-noise adapter.

The base is pretrained on the template facts (tests/unlearn_world.py); task adapter t
learns the facts of its own six countries; the noise adapter is seeded noise on the same
base. Built once per session, on one thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from lorafold.merge.threads import torch_threads
from lorafold.unlearn.datasets import TextDataset
from tests.unlearn_world import (
    BASE_NAME,
    COUNTRIES,
    facts,
    fit,
    noise_adapter,
    pretrained_base,
)

TASKS = (COUNTRIES[:6], COUNTRIES[6:12])
TARGETS = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class TuneWorld:
    base_dir: Path
    tasks: list[Path]           # one adapter per task
    noise: Path
    sets: list[TextDataset]     # task t's facts (the validation split of these tests)
    tokenizer: Any


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with torch_threads(1):
        yield


def _task_adapter(base: torch.nn.Module, tokenizer: Any, data: TextDataset, out: Path,
                  seed: int) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                            target_modules=TARGETS))
    fit(model, tokenizer, data, steps=80, lr=5e-3, seed=seed)
    model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE_NAME
    (out / "adapter_config.json").write_text(json.dumps(config))
    model.unload()  # take the LoRA layers out of the shared base again
    return out


def build_tune_world(root: Path) -> TuneWorld:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base, tokenizer, base_dir = pretrained_base(root)
    sets = [TextDataset.from_pairs(facts(list(countries)), name=f"task{t}")
            for t, countries in enumerate(TASKS)]
    tasks = [_task_adapter(base, tokenizer, ds, root / "adapters" / f"task{t}", seed=t + 1)
             for t, ds in enumerate(sets)]
    noise = noise_adapter(base_dir, root / "adapters" / "noise", rank=4, seed=7, std=0.25)
    return TuneWorld(base_dir, tasks, noise, sets, tokenizer)


@pytest.fixture(scope="session")
def tune_world(tmp_path_factory: pytest.TempPathFactory) -> TuneWorld:
    with torch_threads(1):
        return build_tune_world(Path(tmp_path_factory.mktemp("tune_world")))
