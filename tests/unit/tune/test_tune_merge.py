"""Tuned merges on a tiny base with two task adapters and a pure-noise one (issue 12)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lorafold.adapters import open_adapter
from lorafold.errors import IncompatibleAdapters, InvalidRequest
from lorafold.merge import MergeRequest, merge_adapters
from lorafold.synthetic import write_random_adapter
from lorafold.tune.api import TunedMerge, tune_merge
from lorafold.tune.options import TuneRequest
from lorafold.unlearn.adapter_ops import remove_constituents
from lorafold.unlearn.datasets import TextDataset
from tests.unit.tune.conftest import TuneWorld

ISO = MergeRequest(method="ctm", rule="iso", rank=4)


def _tune(world: TuneWorld, out: Path, request: MergeRequest, tune: TuneRequest,
          inputs: list[Path] | None = None,
          sets: list[TextDataset] | None = None) -> TunedMerge:
    return tune_merge(inputs or world.tasks, out, request, tune,
                      datasets=sets or world.sets, base_model_dir=world.base_dir, device="cpu")


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    with open_adapter(path) as adapter:
        return {name: adapter.load(name).scale * adapter.load(name).B.float()
                @ adapter.load(name).A.float() for name in adapter.modules}


@pytest.fixture(scope="module")
def tuned(tune_world: TuneWorld, tmp_path_factory: pytest.TempPathFactory) -> TunedMerge:
    return _tune(tune_world, tmp_path_factory.mktemp("tuned") / "out", ISO,
                 TuneRequest(budget=14))


def test_the_chosen_merge_beats_every_grid_setting_it_searched(tuned: TunedMerge) -> None:
    tuning = tuned.tuning
    assert tuning["params"] == ["lambda", "beta"]
    losses = [c["loss"] for c in tuning["curve"]]
    assert tuning["best"]["loss"] == min(losses)
    untuned = [c for c in tuning["curve"] if c["point"] == {"lambda": 1.0, "beta": 0.0}]
    assert untuned and untuned[0]["stage"] == "start"
    assert tuning["written"]["loss"] <= min(losses) + 1e-4  # the written adapter scores so
    assert tuning["written"]["loss"] < tuning["untuned"]["loss"]
    assert tuning["chosen"] != {"lambda": 1.0, "beta": 0.0}


def test_the_chosen_values_are_in_lineage_and_report(tuned: TunedMerge) -> None:
    lineage = json.loads((tuned.result.out_dir / "lorafold.json").read_text())
    chosen = tuned.tuning["chosen"]
    assert lineage["parameters"]["scale"] == chosen["lambda"]
    assert lineage["parameters"]["beta"] == chosen["beta"]
    assert lineage["tuning"]["candidates_evaluated"] == tuned.tuning["candidates_evaluated"]
    assert tuned.result.report["tuning"]["chosen"] == chosen
    assert tuned.tuning["wall_time_s"] > 0 and len(tuned.tuning["curve"]) >= 2


def test_the_search_is_deterministic_for_a_seed(tune_world: TuneWorld, tuned: TunedMerge,
                                                tmp_path: Path) -> None:
    again = _tune(tune_world, tmp_path / "again", ISO, TuneRequest(budget=14))
    assert [(c["point"], c["loss"]) for c in again.tuning["curve"]] == \
        [(c["point"], c["loss"]) for c in tuned.tuning["curve"]]
    for name, delta in _deltas(tuned.result.out_dir).items():
        torch.testing.assert_close(_deltas(again.result.out_dir)[name], delta)


def test_a_budget_is_respected(tune_world: TuneWorld, tmp_path: Path) -> None:
    small = _tune(tune_world, tmp_path / "out", ISO, TuneRequest(budget=3))
    assert small.tuning["candidates_evaluated"] == 3
    assert small.tuning["stopped"] == "budget"


def test_learned_weights_push_a_noise_adapter_toward_zero(tune_world: TuneWorld,
                                                           tmp_path: Path) -> None:
    inputs = [*tune_world.tasks, tune_world.noise]
    sets = [tune_world.sets[0], tune_world.sets[1], tune_world.sets[0]]
    request = MergeRequest(method="ctm", rule="ta", rank=12, weights=(0.5, 0.5, 0.5))
    learned = _tune(tune_world, tmp_path / "out", request,
                    TuneRequest(params=("weights",), budget=40), inputs=inputs, sets=sets)
    weights = learned.tuning["weights"]
    noise = abs(weights["chosen"][2])
    assert noise < 0.2 * min(abs(w) for w in weights["chosen"][:2])
    assert noise < 0.5 * abs(weights["start"][2])
    assert weights["loss"] < weights["start_loss"]
    uniform = learned.tuning["untuned"]["loss"]
    assert learned.tuning["written"]["loss"] < uniform
    lineage = json.loads((learned.result.out_dir / "lorafold.json").read_text())
    assert [i["weight"] for i in lineage["inputs"]] == pytest.approx(weights["chosen"])


def test_remove_re_merges_at_the_chosen_values(tune_world: TuneWorld, tmp_path: Path) -> None:
    """Exactness: removing a constituent of a tuned merge equals merging the rest directly
    with the chosen values."""
    inputs = [*tune_world.tasks, tune_world.noise]
    tuned = _tune(tune_world, tmp_path / "tuned", MergeRequest(method="ctm", rule="ties",
                                                              rank=6),
                  TuneRequest(params=("lambda", "density"), budget=6), inputs=inputs,
                  sets=[tune_world.sets[0]])
    by_path = {str(p): p for p in inputs}
    removed = remove_constituents(tuned.result.out_dir, [str(tune_world.noise)],
                                  tmp_path / "removed", resolve=lambda e: by_path[e["label"]],
                                  device="cpu")
    direct_request = MergeRequest(**{**tuned.request.__dict__,
                                     "weights": tuned.request.weights[:2]
                                     if tuned.request.weights else None})
    direct = merge_adapters(tune_world.tasks, tmp_path / "direct", direct_request, device="cpu")
    want = _deltas(direct.out_dir)
    for name, delta in _deltas(removed.out_dir).items():
        torch.testing.assert_close(delta, want[name], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(("request_", "tune", "code"), [
    (ISO, TuneRequest(params=("weights",)), "invalid_tune"),
    (ISO, TuneRequest(params=("density",)), "invalid_tune"),
    (ISO, TuneRequest(params=("gamma",)), "invalid_tune"),
    (ISO, TuneRequest(budget=0), "invalid_tune"),
    (MergeRequest(method="ctm", rule="iso", min_energy=0.9), TuneRequest(), "invalid_tune"),
])
def test_bad_tuning_requests_are_refused(tune_world: TuneWorld, tmp_path: Path,
                                         request_: MergeRequest, tune: TuneRequest,
                                         code: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        _tune(tune_world, tmp_path / "out", request_, tune)
    assert caught.value.code == code
    assert not (tmp_path / "out").exists()


def test_budget_over_the_bound_and_wrong_set_count_are_refused(tune_world: TuneWorld,
                                                               tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as over:
        tune_merge(tune_world.tasks, tmp_path / "out", ISO, TuneRequest(budget=50),
                   datasets=tune_world.sets, base_model_dir=tune_world.base_dir,
                   max_budget=10)
    assert over.value.code == "tune_budget_exceeded"
    with pytest.raises(InvalidRequest) as count:
        _tune(tune_world, tmp_path / "out", ISO, TuneRequest(),
              sets=[tune_world.sets[0]] * 3)
    assert count.value.code == "invalid_tune"


def test_an_adapter_for_another_architecture_is_refused(tune_world: TuneWorld,
                                                        tmp_path: Path) -> None:
    alien = write_random_adapter(tmp_path / "alien", {"model.layers.0.self_attn.k_proj":
                                                      (24, 16)}, rank=4,
                                 base_model="lorafold-test/tiny-llama")
    with pytest.raises(IncompatibleAdapters) as caught:
        _tune(tune_world, tmp_path / "out", ISO, TuneRequest(),
              inputs=[tune_world.tasks[0], alien])
    assert caught.value.code == "adapter_base_mismatch"
    assert not (tmp_path / "out").exists()
