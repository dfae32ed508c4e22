"""Fixtures for unlearning tests: one tiny fact world, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from tests.unlearn_world import FactWorld, build_world


@contextmanager
def one_thread() -> Iterator[None]:
    """Models this small run fastest on one thread; more threads thrash on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="session")
def fact_world(tmp_path_factory: pytest.TempPathFactory) -> FactWorld:
    """Tiny pretrained Llama + a LoRA trained on fictitious facts (trained here, once)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with one_thread():
        return build_world(Path(tmp_path_factory.mktemp("fact_world")))
