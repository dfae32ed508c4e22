"""Which stored items a job's params name: what a delete must not take from a live job."""

from __future__ import annotations

from lorafold.service.job_inputs import job_inputs


def test_merge_inputs_and_tuned_merge_validation_sets() -> None:
    params = {"inputs": [{"id": "a1", "weight": 1.0}, {"id": "a2", "weight": 0.5}],
              "tune": {"datasets": ["d1", "d2"], "base_model": "m"}}
    assert job_inputs(params) == {("adapters", "a1"), ("adapters", "a2"),
                                  ("datasets", "d1"), ("datasets", "d2")}


def test_unlearning_inputs() -> None:
    params = {"adapter": "a1", "forget_adapter": "a2", "constituents": ["a3"],
              "datasets": {"forget": "d1", "retain": "d2"}}
    assert job_inputs(params) == {("adapters", "a1"), ("adapters", "a2"), ("adapters", "a3"),
                                  ("datasets", "d1"), ("datasets", "d2")}


def test_a_plain_merge_names_no_data_set() -> None:
    assert job_inputs({"inputs": [{"id": "a1"}]}) == {("adapters", "a1")}
