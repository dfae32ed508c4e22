"""A merge job trusts the sha256 its download verified: the inputs are not hashed again,
and the lineage still names each input by its true sha256."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafold.adapters import reader
from lorafold.adapters.tensor_file import TensorFile
from lorafold.service.context import ServiceContext
from lorafold.synthetic import write_random_adapter
from tests.integration.service.test_service_api_inprocess import SHAPES, upload
from workers import tasks


def test_a_merge_job_records_true_digests_without_rehashing(
        api: TestClient, ctx: ServiceContext, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    dirs = [write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i) for i in range(2)]
    ids = [upload(api, d, d.name)["id"] for d in dirs]
    true = [hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
            for d in dirs]
    opened: dict[str, str | None] = {}      # file -> the sha256 its reader was given

    class Recording(TensorFile):
        def __init__(self, path: Path, data_start: int, *, sha256: str | None = None) -> None:
            opened[path.parent.name] = sha256
            super().__init__(path, data_start, sha256=sha256)

    monkeypatch.setattr(reader, "TensorFile", Recording)
    response = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids],
                                            "method": "ctm", "rule": "ta", "rank": 4})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    tasks.run_merge(job_id)
    done = api.get(f"/v1/jobs/{job_id}").json()
    assert done["status"] == "succeeded", done
    download = api.get(f"/v1/adapters/{done['result']['adapter_id']}/download")
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        member = tar.extractfile("lorafold.json")
        assert member is not None
        lineage = json.loads(member.read())
    assert [item["sha256"] for item in lineage["inputs"]] == true
    assert {name: opened[name] for name in ids} == dict(zip(ids, true, strict=True))
