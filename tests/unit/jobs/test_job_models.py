"""Job records round-trip through JSON, and the transition table says what it should."""

from __future__ import annotations

import itertools
import json
import re
from datetime import datetime, timezone

import pytest

from lorafold.errors import Conflict
from lorafold.jobs.models import (
    TERMINAL_STATUSES,
    JobRecord,
    JobStatus,
    JobType,
    Progress,
    allowed_sources,
    can_transition,
    check_transition,
    iso,
    new_job_id,
    normalise_error,
    parse_iso,
)

Q, R, S, F, C = (JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED,
                 JobStatus.CANCELLED)
# Written out by hand: the legal moves, and nothing else.
LEGAL = {(Q, R), (Q, F), (Q, C), (R, R), (R, S), (R, F), (R, C)}


def full_record() -> JobRecord:
    return JobRecord(
        id="job_" + "a" * 32, tenant="acme", type=JobType.MERGE, status=JobStatus.SUCCEEDED,
        created_at="2026-01-02T03:04:05.000006Z", started_at="2026-01-02T03:04:06.000000Z",
        finished_at="2026-01-02T03:05:00.123456Z",
        params={"adapters": [{"id": "ad_1", "weight": -0.5}], "rank": 16},
        progress=Progress("done", 1.0),
        result={"adapter_id": "ad_9", "report": {"energy": [0.25, 0.5]}},
        error=None, attempts=2, cancel_requested=True,
    )


def test_record_round_trips_through_json() -> None:
    record = full_record()
    text = json.dumps(record.to_dict())
    again = JobRecord.from_dict(json.loads(text))
    assert again == record
    assert again.type is JobType.MERGE and again.status is JobStatus.SUCCEEDED


def test_to_dict_is_plain_json_with_enum_values() -> None:
    data = full_record().to_dict()
    assert data["type"] == "merge" and type(data["type"]) is str
    assert data["status"] == "succeeded" and type(data["status"]) is str
    assert data["progress"] == {"stage": "done", "fraction": 1.0}
    assert set(data) == {"id", "tenant", "type", "status", "created_at", "started_at",
                         "finished_at", "params", "progress", "result", "error", "attempts",
                         "cancel_requested"}


def test_from_dict_defaults_and_ignores_unknown_keys() -> None:
    record = JobRecord.from_dict({"id": "job_x", "tenant": "t", "type": "unlearn",
                                  "status": "queued", "created_at": "2026-01-01T00:00:00Z",
                                  "some_future_field": 1})
    assert record.type is JobType.UNLEARN
    assert record.progress == Progress("queued", 0.0)
    assert record.attempts == 0 and record.cancel_requested is False
    assert record.result is None and record.error is None and record.params == {}


def test_from_dict_names_a_missing_field() -> None:
    with pytest.raises(ValueError, match="tenant"):
        JobRecord.from_dict({"id": "job_x", "type": "merge", "status": "queued",
                             "created_at": "2026-01-01T00:00:00Z"})


def test_from_dict_rejects_unknown_status() -> None:
    with pytest.raises(ValueError):
        JobRecord.from_dict({"id": "job_x", "tenant": "t", "type": "merge",
                             "status": "paused", "created_at": "2026-01-01T00:00:00Z"})


@pytest.mark.parametrize(("current", "target"), list(itertools.product(JobStatus, JobStatus)))
def test_transition_table(current: JobStatus, target: JobStatus) -> None:
    assert can_transition(current, target) == ((current, target) in LEGAL)
    if (current, target) in LEGAL:
        check_transition("job_1", current, target)
    else:
        with pytest.raises(Conflict) as info:
            check_transition("job_1", current, target)
        expected = "job_finished" if current in TERMINAL_STATUSES else "invalid_transition"
        assert info.value.code == expected
        assert "job_1" in info.value.message


def test_terminal_statuses() -> None:
    assert {s for s in JobStatus if s.is_terminal} == {S, F, C}
    assert all(not can_transition(s, t) for s in TERMINAL_STATUSES for t in JobStatus)


def test_allowed_sources() -> None:
    assert allowed_sources(R) == {Q, R}
    assert allowed_sources(S) == {R}
    assert allowed_sources(C) == {Q, R}
    assert allowed_sources(Q) == frozenset()


def test_enum_values_are_lower_case_strings() -> None:
    assert [s.value for s in JobStatus] == ["queued", "running", "succeeded", "failed",
                                            "cancelled"]
    assert [t.value for t in JobType] == ["merge", "unlearn", "plan"]
    assert JobStatus("running") is R and JobStatus.RUNNING == "running"


@pytest.mark.parametrize("fraction", [-0.01, 1.01, float("nan")])
def test_progress_fraction_must_be_in_unit_interval(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        Progress("merge", fraction)


def test_progress_needs_a_stage() -> None:
    with pytest.raises(ValueError, match="stage"):
        Progress("", 0.5)


def test_normalise_error() -> None:
    assert normalise_error({"code": "x", "message": "boom"}) == {
        "code": "x", "message": "boom", "retryable": False}
    assert normalise_error({"code": "x", "message": "m", "retryable": 1, "extra": 2}) == {
        "code": "x", "message": "m", "retryable": True}
    with pytest.raises(ValueError, match="message"):
        normalise_error({"code": "x"})


def test_iso_is_utc_with_z_and_parses_back() -> None:
    moment = datetime(2026, 5, 6, 7, 8, 9, 123456, tzinfo=timezone.utc)
    text = iso(moment)
    assert text == "2026-05-06T07:08:09.123456Z"
    assert parse_iso(text) == moment


def test_new_job_id_format() -> None:
    ids = {new_job_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"job_[0-9a-f]{32}", i) for i in ids)
