"""Over HTTP: an archive bomb is refused by the upload limit (422 archive_too_large),
stores nothing and leaves the spool empty; a valid archive upload still works."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from lorafold.adapters.source import CONFIG_NAME, WEIGHTS_NAME
from lorafold.settings import MIB, Settings
from tests.adapter_cases import good_adapter

UPLOAD_LIMIT = 8 * MIB
BOMB_BYTES = 200 * MIB


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The conftest settings with a small upload limit (the bomb stays far below it)."""
    return settings.model_copy(update={"max_upload_bytes": UPLOAD_LIMIT})


def zip_bomb(good: Path) -> bytes:
    """A valid adapter plus 200 MB of zeros: about 200 KB, as stored by the old code."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            archive.write(good / name, f"adapter/{name}")
        info = zipfile.ZipInfo("adapter/junk.bin")
        info.compress_type = zipfile.ZIP_DEFLATED
        with archive.open(info, "w") as out:
            chunk = bytes(MIB)
            for _ in range(BOMB_BYTES // MIB):
                out.write(chunk)
    return buffer.getvalue()


def tar_gz(good: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            archive.add(good / name, arcname=f"adapter/{name}")
        readme, text = tarfile.TarInfo("adapter/README.md"), b"skipped, not stored"
        readme.size = len(text)
        archive.addfile(readme, io.BytesIO(text))
    return buffer.getvalue()


def stored_files(settings: Settings) -> list[Path]:
    return [p for p in Path(settings.storage_url).rglob("*") if p.is_file()]


def test_a_bomb_is_refused_and_leaves_nothing(api: TestClient, settings: Settings,
                                              tmp_path: Path) -> None:
    bomb = zip_bomb(good_adapter(tmp_path / "good"))
    assert len(bomb) < UPLOAD_LIMIT < BOMB_BYTES
    response = api.post("/v1/adapters", data={"name": "bomb"},
                        files=[("archive", ("adapter.zip", bomb, "application/zip"))])
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "archive_too_large"
    assert api.get("/v1/adapters").json()["count"] == 0
    assert stored_files(settings) == []
    assert settings.spool_dir is not None and list(settings.spool_dir.iterdir()) == []


def test_a_valid_archive_upload_still_works(api: TestClient, settings: Settings,
                                            tmp_path: Path) -> None:
    good = good_adapter(tmp_path / "good")
    response = api.post("/v1/adapters", data={"name": "packed"},
                        files=[("archive", ("adapter.tar.gz", tar_gz(good),
                                            "application/gzip"))])
    assert response.status_code == 201, response.text
    adapter = response.json()
    assert adapter["module_count"] == 2
    download = api.get(f"/v1/adapters/{adapter['id']}/download")
    with tarfile.open(fileobj=io.BytesIO(download.content)) as tar:
        assert sorted(tar.getnames()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert settings.spool_dir is not None and list(settings.spool_dir.iterdir()) == []
