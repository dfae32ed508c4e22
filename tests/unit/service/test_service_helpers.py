"""Small service helpers: progress mapping, ids, archives, the idempotency wrapper,
in-process validation."""

from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Any

import pytest

from lorafold.errors import Conflict, InvalidAdapter, InvalidRequest
from lorafold.service.adapters import adapter_id_for_job, check_name, write_archive
from lorafold.service.idempotency import idempotent
from lorafold.service.joblog import ProgressReporter, job_logger
from lorafold.service.merge_job import MERGE_STAGES
from lorafold.service.validation import InProcessValidator
from tests.adapter_cases import CASES, good_adapter


class FakeJobs:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def set_progress(self, job_id: str, stage: str, fraction: float, *,
                     attempt: int | None = None) -> None:
        self.calls.append((stage, round(fraction, 6)))


def test_progress_moves_forward_through_the_stages() -> None:
    jobs = FakeJobs()
    report = ProgressReporter(jobs, "job_x", MERGE_STAGES)  # type: ignore[arg-type]
    for stage, fraction in [("fetch", 0.5), ("fetch", 1.0), ("plan", 1.0), ("merge", 0.25),
                            ("merge", 1.0), ("write", 0.0), ("publish", 0.0)]:
        report(stage, fraction)
    fractions = [f for _, f in jobs.calls]
    assert fractions == sorted(fractions)
    assert jobs.calls[0] == ("fetch", 0.05)
    assert jobs.calls[3] == ("merge", 0.3)
    assert all(0.0 <= f <= 1.0 for f in fractions)


def test_job_log_lines_carry_the_job_id(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    with caplog.at_level(logging.INFO):
        job_logger(logging.getLogger("lorafold.test"), "job_123").info("step %d", 2)
    assert caplog.messages == ["job job_123: step 2"]


def test_output_id_is_derived_from_the_job_id() -> None:
    assert adapter_id_for_job("job_0a1b") == "ad_0a1b"
    assert adapter_id_for_job("job_0a1b") == adapter_id_for_job("job_0a1b")


def test_names_are_checked() -> None:
    assert check_name("  support v3 ") == "support v3"
    for bad in ("", "x" * 201, "tab\there"):
        with pytest.raises(InvalidRequest):
            check_name(bad)


def test_archive_holds_the_files_at_its_root(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.bin").write_bytes(b"\0" * 10)
    archive = write_archive({"adapter_config.json": tmp_path / "a.json",
                             "adapter_model.safetensors": tmp_path / "b.bin"},
                            tmp_path / "out.tar")
    with tarfile.open(archive) as tar:
        assert sorted(tar.getnames()) == ["adapter_config.json", "adapter_model.safetensors"]


class FakeIdempotency:
    pending_ttl_s = 120  # the keep-alive renews a third of this; never reached here

    def __init__(self) -> None:
        self.stored: dict[str, dict[str, Any]] = {}
        self.pending: set[str] = set()

    def extend(self, *, tenant: str, scope: str, key: str, body_hash: str) -> bool:
        return key in self.pending

    def claim(self, *, tenant: str, scope: str, key: str, body_hash: str) -> Any:
        if key in self.stored:
            if self.stored[key]["hash"] != body_hash:
                raise Conflict("reused", code="idempotency_key_reused")
            return self.stored[key]["value"]
        self.pending.add(key)
        return None

    def complete(self, *, tenant: str, scope: str, key: str, body_hash: str,
                 value: dict[str, Any]) -> None:
        self.pending.discard(key)
        self.stored[key] = {"hash": body_hash, "value": value}

    def release(self, *, tenant: str, scope: str, key: str, body_hash: str) -> None:
        self.pending.discard(key)


def test_idempotent_replays_and_releases() -> None:
    store = FakeIdempotency()

    def create(key: str | None, fingerprint: str = "h1", fail: bool = False) -> dict[str, Any]:
        with idempotent(store, tenant="t", scope="s", key=key,  # type: ignore[arg-type]
                        fingerprint=fingerprint) as claim:
            if claim.replay is not None:
                return claim.replay
            if fail:
                raise RuntimeError("boom")
            claim.value = {"n": len(store.stored) + 1}
            return claim.value

    with pytest.raises(RuntimeError):
        create("k", fail=True)
    assert not store.pending and not store.stored  # released: a retry may run
    first = create("k")
    assert create("k") == first
    with pytest.raises(Conflict):
        create("k", fingerprint="h2")
    assert create(None) == {"n": 2} and create(None) == {"n": 2}  # no key: no memory


def test_in_process_validation(tmp_path: Path) -> None:
    validator = InProcessValidator()
    good = good_adapter(tmp_path / "good")
    inspection = validator.inspect(good)
    assert inspection.directory == good
    assert inspection.summary["r"] == 4 and len(inspection.summary["sha256"]) == 64
    build, code = CASES["nan"]
    with pytest.raises(InvalidAdapter) as err:
        validator.inspect(build(tmp_path / "bad"))
    assert err.value.code == code


def test_archives_are_unpacked_for_publishing(tmp_path: Path) -> None:
    import shutil

    good = good_adapter(tmp_path / "good")
    archive = Path(shutil.make_archive(str(tmp_path / "good"), "zip", good))
    inspection = InProcessValidator().inspect(archive, dest=tmp_path / "unpacked")
    assert inspection.directory == tmp_path / "unpacked"
    assert sorted(p.name for p in inspection.directory.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]


def test_presigned_urls_name_the_public_endpoint() -> None:
    from redis import Redis

    from lorafold.service.context import ServiceContext
    from lorafold.settings import Settings

    settings = Settings(storage_url="s3://bucket", s3_endpoint_url="http://seaweedfs:8333",
                        s3_public_endpoint_url="http://127.0.0.1:8333", s3_access_key="a",
                        s3_secret_key="b")
    ctx = ServiceContext(settings, redis=Redis(port=1))  # signing needs no connection
    url = ctx.presign_storage.presigned_url("blobs/sha256/" + "a" * 64, 60, filename="x.tar")
    assert url is not None and url.startswith("http://127.0.0.1:8333/bucket/blobs/sha256/")
    plain = Settings(storage_url="s3://bucket", s3_endpoint_url="http://seaweedfs:8333")
    assert plain.presign_options() is None


def test_a_merge_job_body_round_trips_and_old_bodies_still_run() -> None:
    from dataclasses import asdict

    from lorafold.merge import MergeRequest
    from lorafold.service.merges import request_from_params

    request = MergeRequest(rule="dare_ties", rank=8, weights=(1.0, 0.5), density=0.3, drop=0.2,
                           beta=0.25, subspace="hosvd")
    assert request_from_params({"request": asdict(request)}) == request
    # queued before `beta` replaced `balance` (balance: true meant β = 0)
    old = {k: v for k, v in asdict(request).items() if k not in ("beta", "subspace", "drop")}
    assert request_from_params({"request": {**old, "balance": True}}).beta == 0.0
    assert request_from_params({"request": {**old, "balance": False}}).beta is None


def test_a_ctm_job_result_shows_the_subspace_search(tmp_path: Path) -> None:
    from lorafold.merge import MergeRequest, merge_adapters
    from lorafold.service.merge_job import merge_summary
    from lorafold.synthetic import write_random_adapter

    shapes = {"model.layers.0.self_attn.q_proj": (12, 10)}
    inputs = [write_random_adapter(tmp_path / f"in{i}", shapes, rank=3, seed=i) for i in range(3)]
    ctm = merge_summary(merge_adapters(inputs, tmp_path / "ctm", MergeRequest(rank=4)))
    assert ctm["subspaces"]["mode"] == "hooi" and "modules" not in ctm["subspaces"]
    assert ctm["subspaces"]["mean_energy"] >= ctm["subspaces"]["mean_start_energy"]
    mtc = merge_summary(merge_adapters(inputs, tmp_path / "mtc",
                                       MergeRequest(method="mtc", rank=4)))
    assert "subspaces" not in mtc
