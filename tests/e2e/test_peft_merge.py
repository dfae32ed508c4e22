"""The main path over real HTTP: adapters made by real PEFT are uploaded, merged with CtM
and TIES by a worker process, downloaded and loaded back with PeftModel.from_pretrained.
Runs against both deployments (filesystem storage and SeaweedFS S3)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file

from lorafold.adapters import open_adapter
from lorafold.merge import MergeRequest, merge_adapters
from tests.e2e.stack import Stack, upload_path, wait_job
from tests.peft_models import llama_inputs, make_peft_adapter, tiny_llama

CONFIGS = [
    LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    LoraConfig(r=6, lora_alpha=12, target_modules=["q_proj", "k_proj", "up_proj"]),
    LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj", "o_proj", "down_proj"],
               use_rslora=True),
]
MERGE = {"method": "ctm", "rule": "ties", "rank": 6, "density": 0.5}


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three real PEFT adapters; the last one is handed over as a .zip archive."""
    root = tmp_path_factory.mktemp("peft")
    paths = [make_peft_adapter(tiny_llama, root / f"adapter{i}", config, seed=10 + i)
             for i, config in enumerate(CONFIGS)]
    archive = shutil.make_archive(str(root / "adapter2"), "zip", paths[2])
    return [paths[0], paths[1], Path(archive)]


def _download(stack: Stack, adapter_id: str) -> bytes:
    with stack.client() as client:
        response = client.get(f"/v1/adapters/{adapter_id}/download")
        if stack.name == "s3":
            assert response.status_code == 307, response.text
            location = response.headers["location"]
            assert "X-Amz-Signature" in location
            response = client.get(location, headers={"Authorization": ""})
        assert response.status_code == 200, response.text
        return response.content


def test_peft_adapters_merge_end_to_end(stack: Stack, peft_adapters: list[Path],
                                        tmp_path: Path) -> None:
    with stack.client() as client:
        uploaded: list[dict[str, Any]] = []
        for i, path in enumerate(peft_adapters):
            response = upload_path(client, path, f"peft-{i}")
            assert response.status_code == 201, response.text
            uploaded.append(response.json())
        ids = [a["id"] for a in uploaded]
        assert [a["r"] for a in uploaded] == [4, 6, 2]
        assert all(a["source"] == "upload" for a in uploaded)

        response = client.post("/v1/merges", json={
            "adapters": [{"id": i, "weight": w} for i, w in zip(ids, [1.0, 0.5, 1.0],
                                                                strict=True)],
            **MERGE, "name": "peft merge"})
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        job = wait_job(client, response.json()["id"])
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 1
        assert [row["input"] for row in job["result"]["report"]["inputs"]] == ids
        output_id = job["result"]["adapter_id"]

        output = client.get(f"/v1/adapters/{output_id}").json()
        assert output["source"] == "merge" and output["parents"] == ids
        assert output["r"] == 6 and output["job_id"] == job["id"]
        assert output_id in [a["id"] for a in client.get("/v1/adapters").json()["data"]]

    merged = tmp_path / "merged"
    with tarfile.open(fileobj=io.BytesIO(_download(stack, output_id))) as tar:
        tar.extractall(merged, filter="data")
    lineage = json.loads((merged / "lorafold.json").read_text())
    assert lineage["input_ids"] == ids and lineage["job_id"] == job["id"]

    # PEFT loads the result, and it changes the model's outputs.
    base = tiny_llama()
    with torch.no_grad():
        base_logits = base(llama_inputs()).logits
        model = PeftModel.from_pretrained(tiny_llama(), str(merged)).eval()
        logits = model(llama_inputs()).logits
    assert torch.isfinite(logits).all()
    assert not torch.allclose(logits, base_logits, atol=1e-4)

    # The service computed exactly what the library computes on the same inputs.
    weights = [1.0, 0.5, 1.0]
    local_inputs = [open_adapter(p, label=i) for p, i in zip(peft_adapters, ids, strict=True)]
    try:
        local = merge_adapters(local_inputs, tmp_path / "local", MergeRequest(
            method="ctm", rule="ties", rank=6, density=0.5, weights=tuple(weights))).out_dir
    finally:
        for adapter in local_inputs:
            adapter.close()
    ours = load_file(str(merged / "adapter_model.safetensors"))
    reference = load_file(str(local / "adapter_model.safetensors"))
    assert ours.keys() == reference.keys()
    for key, tensor in reference.items():
        torch.testing.assert_close(ours[key], tensor, atol=1e-5, rtol=1e-4)
