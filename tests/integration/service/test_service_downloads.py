"""GET /v1/adapters/{id}/download?format=tar|tar.gz|zip: the stored files at the archive
root, and the extracted directory loads in PEFT with the original adapter's logits."""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import LoraConfig, PeftModel

from lorafold.errors import StorageError
from lorafold.service.context import ServiceContext
from tests.e2e.stack import assert_problem
from tests.peft_models import llama_inputs, make_peft_adapter, tiny_llama

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}


@pytest.fixture
def peft_adapter(tmp_path: Path) -> Path:
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return make_peft_adapter(tiny_llama, tmp_path / "peft-adapter", config, seed=3)


def upload(api: TestClient, directory: Path) -> str:
    files = [("files", (p.name, p.read_bytes())) for p in sorted(directory.iterdir())
             if p.name in PEFT_FILES]
    response = api.post("/v1/adapters", files=files, data={"name": directory.name})
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def members(fmt: str, payload: bytes) -> dict[str, bytes]:
    """Every member of the archive by its name: regular files only, or the test fails."""
    if fmt == "zip":
        with zipfile.ZipFile(io.BytesIO(payload)) as archive:
            assert archive.testzip() is None  # every CRC checks
            return {info.filename: archive.read(info) for info in archive.infolist()}
    with tarfile.open(fileobj=io.BytesIO(payload), mode="r:*") as tar:
        assert all(m.isfile() for m in tar.getmembers())
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


def logits(adapter_dir: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(llama_inputs()).logits


@pytest.mark.parametrize("fmt", ["tar", "tar.gz", "zip"])
def test_each_format_has_the_files_at_its_root_and_loads_in_peft(
        api: TestClient, peft_adapter: Path, tmp_path: Path, fmt: str) -> None:
    adapter_id = upload(api, peft_adapter)
    response = api.get(f"/v1/adapters/{adapter_id}/download", params={"format": fmt})
    assert response.status_code == 200, response.text
    assert response.headers["content-disposition"] == \
        f'attachment; filename="{adapter_id}.{fmt}"'
    assert response.headers["content-type"] == {
        "tar": "application/x-tar", "tar.gz": "application/gzip", "zip": "application/zip"}[fmt]
    files = members(fmt, response.content)
    assert set(files) == PEFT_FILES  # exactly the adapter's files, at the root
    for name, data in files.items():
        assert data == (peft_adapter / name).read_bytes()

    extracted = tmp_path / "extracted"
    extracted.mkdir()
    for name, data in files.items():
        (extracted / name).write_bytes(data)
    torch.testing.assert_close(logits(extracted), logits(peft_adapter), rtol=0, atol=0)


def test_a_merge_output_carries_its_lineage_in_every_format(
        api: TestClient, ctx: ServiceContext, peft_adapter: Path) -> None:
    from workers import tasks

    ids = [upload(api, peft_adapter) for _ in range(2)]
    job = api.post("/v1/merges", json={"adapters": [{"id": i} for i in ids], "rank": 4}).json()
    tasks.run_merge(job["id"])
    output = api.get(f"/v1/jobs/{job['id']}").json()["result"]["adapter_id"]
    stored = set(ctx.adapters.get_manifest("tenant-a", output)["files"])
    assert stored == PEFT_FILES | {"lorafold.json"}
    for fmt in ("tar", "tar.gz", "zip"):
        payload = api.get(f"/v1/adapters/{output}/download", params={"format": fmt}).content
        assert set(members(fmt, payload)) == stored


def test_archives_pass_the_system_tools(api: TestClient, peft_adapter: Path,
                                        tmp_path: Path) -> None:
    """unzip and gzip (what a serving platform's pipeline may use) accept the streams."""
    if not (shutil.which("unzip") and shutil.which("gzip")):
        pytest.skip("unzip or gzip is not installed")
    adapter_id = upload(api, peft_adapter)
    for fmt, check in (("zip", ["unzip", "-t"]), ("tar.gz", ["gzip", "-t"])):
        path = tmp_path / f"a.{fmt}"
        path.write_bytes(api.get(f"/v1/adapters/{adapter_id}/download",
                                 params={"format": fmt}).content)
        done = subprocess.run([*check, str(path)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr


def test_bad_format_and_missing_adapter(api: TestClient, peft_adapter: Path) -> None:
    adapter_id = upload(api, peft_adapter)
    for fmt in ("rar", "TAR", "tar.bz2", ""):
        assert_problem(api.get(f"/v1/adapters/{adapter_id}/download", params={"format": fmt}),
                       422, "unsupported_format")
    assert_problem(api.get("/v1/adapters/ad_missing/download", params={"format": "zip"}),
                   404, "adapter_not_found")


def test_a_corrupt_blob_aborts_the_stream(api: TestClient, ctx: ServiceContext,
                                          peft_adapter: Path) -> None:
    """A blob whose bytes no longer match its sha256 never yields a complete archive."""
    from lorafold.storage import layout

    adapter_id = upload(api, peft_adapter)
    ref = ctx.adapters.get_manifest("tenant-a", adapter_id)["files"]["adapter_config.json"]
    key = layout.blob_key(ref["sha256"])
    original = ctx.storage.get_bytes(key)
    ctx.storage.put_bytes(key, original.replace(b"lora", b"LORA", 1))  # same size
    with pytest.raises(Exception) as err:  # a live server closes the connection mid-body
        api.get(f"/v1/adapters/{adapter_id}/download", params={"format": "zip"})
    chain: list[BaseException] = []
    error: BaseException | None = err.value
    while error is not None:
        chain.append(error)
        error = error.__cause__ or error.__context__
    assert any(isinstance(e, StorageError) and e.code == "blob_corrupt" for e in chain), chain
