"""Base models are found locally only, and an adapter must fit the base it is used with."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from lorafold.errors import IncompatibleAdapters, InvalidRequest, ModelNotFound
from lorafold.unlearn.base_models import check_adapter_fits, resolve_base_model
from tests.unlearn_world import build_tokenizer, tiny_llama


def fake_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Records (and blocks) every outgoing connection attempt."""
    attempts: list[Any] = []

    def refuse(self: socket.socket, address: Any) -> None:
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


def test_found_in_a_configured_dir_first_root_wins(tmp_path: Path) -> None:
    first = fake_model_dir(tmp_path / "a" / "org" / "model")
    fake_model_dir(tmp_path / "b" / "org" / "model")
    fake_model_dir(tmp_path / "b" / "plain")
    roots = [tmp_path / "missing-root", tmp_path / "a", tmp_path / "b"]
    assert resolve_base_model("org/model", model_dirs=roots, use_hf_cache=False) == first
    assert resolve_base_model("plain", model_dirs=roots, use_hf_cache=False) == \
        tmp_path / "b" / "plain"


def test_a_dir_without_config_is_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "root" / "empty").mkdir(parents=True)
    with pytest.raises(ModelNotFound):
        resolve_base_model("empty", model_dirs=[tmp_path / "root"], use_hf_cache=False)


def test_found_in_the_hugging_face_cache(tmp_path: Path, no_network: list[Any]) -> None:
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--org--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = fake_model_dir(repo / "snapshots" / commit)
    assert resolve_base_model("org/cached", cache_dir=cache) == snapshot
    assert no_network == []


def test_missing_model_names_where_it_looked_and_never_downloads(
        tmp_path: Path, no_network: list[Any]) -> None:
    with pytest.raises(ModelNotFound) as info:
        resolve_base_model("org/absent", model_dirs=[tmp_path / "models"],
                           cache_dir=tmp_path / "hub")
    assert info.value.code == "base_model_not_found"
    assert str(tmp_path / "models" / "org" / "absent") in info.value.message
    assert str(tmp_path / "hub") in info.value.message
    assert no_network == []


@pytest.mark.parametrize("name", ["", "../etc", "org/../../etc", "/abs/path", "a//b", "a\\b",
                                  "org/.hidden", "x" * 300])
def test_names_cannot_escape_the_model_dirs(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_base_model(name, model_dirs=[tmp_path], use_hf_cache=False)
    assert info.value.code == "invalid_base_model_name"


def save_lora(model: Any, path: Path, targets: list[str], rank: int = 4) -> Path:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank,
                                                  target_modules=targets))
    peft_model.save_pretrained(str(path))
    return path


def test_adapter_fits_its_own_base(tmp_path: Path) -> None:
    vocab = len(build_tokenizer().get_vocab())
    adapter = save_lora(tiny_llama(vocab), tmp_path / "a", ["q_proj", "down_proj"])
    check_adapter_fits(tiny_llama(vocab), adapter)


def test_adapter_for_another_width_is_refused_naming_the_module(tmp_path: Path) -> None:
    vocab = len(build_tokenizer().get_vocab())
    adapter = save_lora(tiny_llama(vocab, hidden=32), tmp_path / "a", ["q_proj"])
    with pytest.raises(IncompatibleAdapters) as info:
        check_adapter_fits(tiny_llama(vocab, hidden=64), adapter)
    assert info.value.code == "adapter_base_mismatch"
    assert "model.layers.0.self_attn.q_proj" in info.value.message


def test_adapter_for_a_deeper_model_is_refused(tmp_path: Path) -> None:
    vocab = len(build_tokenizer().get_vocab())
    adapter = save_lora(tiny_llama(vocab, layers=3), tmp_path / "a", ["v_proj"])
    with pytest.raises(IncompatibleAdapters) as info:
        check_adapter_fits(tiny_llama(vocab, layers=2), adapter)
    assert info.value.code == "adapter_base_mismatch"
    assert "model.layers.2.self_attn.v_proj" in info.value.message
