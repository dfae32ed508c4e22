"""Method registry and hyperparameters: everything refused before a model is loaded."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafold.errors import InvalidDataset, InvalidRequest
from lorafold.unlearn import METHODS, TextDataset, resolve_hyperparams, unlearn
from lorafold.unlearn.objectives import resolve_layers

FORGET = TextDataset.from_pairs([("The capital of Zorvania is", "Quell")])


def test_registry_lists_the_methods_with_valid_defaults() -> None:
    assert set(METHODS) == {"gradient_ascent", "grad_diff", "ihl", "npo", "simnpo",
                            "feature_alignment"}
    assert METHODS["ihl"].defaults.forget_loss == "ihl"
    assert METHODS["grad_diff"].defaults.forget_loss == "ascent"
    for name, spec in METHODS.items():
        assert spec.name == name
        assert resolve_hyperparams(name) == spec.defaults


def test_overrides_are_typed_and_unknown_keys_refused() -> None:
    hp = resolve_hyperparams("npo", {"lr": "3e-4", "max_steps": 20, "layers": [1, -1],
                                     "consolidation_beta": "0.25"})
    assert (hp.lr, hp.max_steps, hp.layers, hp.consolidation_beta, hp.beta) == (
        3e-4, 20, (1, -1), 0.25, 0.1)
    assert resolve_hyperparams("feature_alignment").consolidation_beta == 0.0  # balanced
    bad_values: list[dict[str, object]] = [
        {"learning_rate": 1e-3}, {"max_steps": 2.5}, {"lr": -1.0}, {"lr": "fast"},
        {"consolidation_beta": "yes"}, {"consolidation_beta": 1.5},
        {"consolidation_beta": -0.1}, {"consolidation_beta": float("nan")},
        {"consolidation_beta": float("inf")}, {"consolidation_beta": True},
        {"balance": True}, {"batch_size": 0}, {"layers": []},
        # wrong types of every kind answer invalid_hyperparameters, never a crash
        {"layers": 5}, {"layers": "1,2"}, {"layers": [1.5]}, {"layers": [True]},
        {"lr": None}, {"lr": [1e-3]}, {"lr": {"value": 1}}, {"max_steps": "ten"},
        {"forget_loss": 3}, {"forget_loss": "kl"}, {"quantization_probe": "yes"},
        {"quantization_probe": 1}, {"delta": float("nan")}, {"delta": "low"},
        {"output_rank": 0}, {"residual_rank": 2.5}, {"relearn_probe_steps": -1},
        {"probe_time_limit_s": 0}]
    for bad in bad_values:
        with pytest.raises(InvalidRequest) as info:
            resolve_hyperparams("npo", bad)
        assert info.value.code == "invalid_hyperparameters", bad
    with pytest.raises(InvalidRequest) as info:
        resolve_hyperparams("feature_alignment", {"balance": True})
    assert "consolidation_beta" in info.value.message
    with pytest.raises(InvalidRequest) as info:
        resolve_hyperparams("npo", [("lr", 1e-3)])  # type: ignore[arg-type]
    assert info.value.code == "invalid_hyperparameters"


def test_optional_and_new_fields_take_their_types() -> None:
    hp = resolve_hyperparams("simnpo", {"delta": 4, "output_rank": None, "residual_rank": 4.0,
                                        "quantization_probe": True, "relearn_probe_steps": "3",
                                        "forget_loss": "ihl"})
    assert (hp.delta, hp.output_rank, hp.residual_rank, hp.quantization_probe,
            hp.relearn_probe_steps, hp.forget_loss) == (4.0, None, 4, True, 3, "ihl")
    assert isinstance(hp.delta, float) and isinstance(hp.residual_rank, int)
    assert resolve_hyperparams("simnpo").beta == 2.5 and resolve_hyperparams("simnpo").delta is None


def test_layers_resolve_to_decoder_outputs() -> None:
    assert resolve_layers(None, 3) == [1, 2, 3]
    assert resolve_layers((-1, 1, 3), 3) == [1, 3]
    for bad in ((0,), (4,), (-4,)):
        with pytest.raises(InvalidRequest):
            resolve_layers(bad, 3)


def run(tmp_path: Path, **overrides: object) -> None:
    args: dict[str, object] = dict(
        base_model_dir=tmp_path / "no-such-model", adapter_dir=tmp_path / "no-such-adapter",
        forget=FORGET, retain=None, holdout=None, method="gradient_ascent",
        out_dir=tmp_path / "out")
    args.update(overrides)
    unlearn(**args)  # type: ignore[arg-type]


def test_unknown_method_is_refused_before_anything_is_loaded(tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as info:
        run(tmp_path, method="lobotomy")
    assert info.value.code == "unknown_unlearning_method"
    assert "feature_alignment" in info.value.message


def test_empty_forget_set_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidDataset) as info:
        run(tmp_path, forget=TextDataset())
    assert info.value.code == "empty_dataset"


@pytest.mark.parametrize("method", ["grad_diff", "feature_alignment"])
def test_methods_that_anchor_on_retain_need_one(tmp_path: Path, method: str) -> None:
    for retain in (None, TextDataset()):
        with pytest.raises(InvalidRequest) as info:
            run(tmp_path, method=method, retain=retain)
        assert info.value.code == "retain_set_required"
    assert not (tmp_path / "out").exists()
