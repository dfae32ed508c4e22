"""Fixtures for unlearning tests: one tiny fact world, built once per session."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import pytest

from lorafold.merge.threads import torch_threads
from tests.unlearn_world import FactWorld, build_world


def one_thread() -> AbstractContextManager[None]:
    """Models this small run fastest on one thread; more threads thrash on a busy machine."""
    return torch_threads(1)


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
