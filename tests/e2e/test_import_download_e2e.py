"""Over real HTTP with the CLI client: import a real PEFT adapter by reference from the
stack's SeaweedFS and from a loopback HTTP origin, download it as .zip and .tar.gz with the
files at the root, and load the extracted directory in PEFT with the original logits."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel

from lorafold.servers.seaweedfs import SeaweedFS
from lorafold.storage.s3 import S3Storage
from tests.e2e.stack import IMPORT_BUCKET, Stack, client_cli
from tests.loopback_http import Origin, Route
from tests.peft_models import llama_inputs, make_peft_adapter, tiny_llama

PEFT_FILES = {"adapter_config.json", "adapter_model.safetensors"}



def logits(directory: Path) -> torch.Tensor:
    with torch.no_grad():
        return PeftModel.from_pretrained(tiny_llama(), str(directory)).eval()(
            llama_inputs()).logits


@pytest.fixture(scope="module")
def peft_archive(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    root = tmp_path_factory.mktemp("import-e2e")
    adapter = make_peft_adapter(tiny_llama, root / "support-v3", LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), seed=7)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in sorted(PEFT_FILES):
            tar.add(adapter / name, arcname=name)
    return adapter, buffer.getvalue()


def test_import_from_s3_then_download_zip_and_load_in_peft(
        s3_stack: Stack, e2e_seaweedfs: SeaweedFS, peft_archive: tuple[Path, bytes],
        tmp_path: Path) -> None:
    adapter, archive = peft_archive
    bucket = S3Storage(IMPORT_BUCKET, create_bucket=True, **e2e_seaweedfs.storage_options())
    bucket.put_bytes("team/support-v3.tar.gz", archive)
    done = client_cli(s3_stack, "import", f"s3://{IMPORT_BUCKET}/team/support-v3.tar.gz", "-q")
    assert done.returncode == 0, done.stderr
    adapter_id = done.stdout.strip()
    for fmt in ("zip", "tar.gz"):
        out = tmp_path / fmt
        got = client_cli(s3_stack, "download", adapter_id, "--format", fmt, "--extract", "--out",
                  str(out))
        assert got.returncode == 0, got.stderr
        assert {p.name for p in out.iterdir()} == PEFT_FILES
        torch.testing.assert_close(logits(out), logits(adapter), rtol=0, atol=0)
    saved = tmp_path / "a.zip"
    assert client_cli(s3_stack, "download", adapter_id, "--format", "zip", "--out",
               str(saved)).returncode == 0
    assert saved.read_bytes()[:4] == b"PK\x03\x04"


def test_import_from_a_loopback_origin_and_refusals(s3_stack: Stack,
                                                    peft_archive: tuple[Path, bytes]) -> None:
    _, archive = peft_archive
    origin = Origin("127.0.0.1")
    try:
        origin.routes["/models/billing.tar.gz"] = Route(body=archive)
        done = client_cli(s3_stack, "import", origin.url("/models/billing.tar.gz"), "--metadata",
                   '{"team": "billing"}')
        assert done.returncode == 0, done.stderr
        view = json.loads(done.stdout)
        assert view["name"] == "billing" and view["metadata"] == {"team": "billing"}
        assert origin.hits["/models/billing.tar.gz"] == 1
    finally:
        origin.stop()
    for source, code in (("ftp://127.0.0.1/a.zip", "source_scheme_unsupported"),
                         ("http://127.0.0.2:9/a.zip", "source_not_allowed"),
                         ("s3://not-listed/a.tar.gz", "source_not_allowed"),
                         ("hf://org/name", "source_hub_disabled")):
        refused = client_cli(s3_stack, "import", source)
        assert refused.returncode != 0 and code in refused.stderr, refused.stderr
