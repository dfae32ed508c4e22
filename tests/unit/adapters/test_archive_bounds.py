"""Archives are bounded: only the adapter files are written, into the directory the caller
chooses, and a bomb (too many bytes, by header or by content, or too many entries) is
refused as `archive_too_large` before anything is written past the bound."""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from lorafold.adapters import open_adapter
from lorafold.adapters.source import (
    CONFIG_NAME,
    MAX_ARCHIVE_ENTRIES,
    WEIGHTS_NAME,
    resolve_source,
)
from lorafold.errors import InvalidAdapter
from tests.adapter_cases import good_adapter

MIB = 1024 * 1024
LIMIT = 10 * MIB
BOMB_BYTES = 200 * MIB
KINDS = ("zip", "tar.gz")


class Zeros:
    """`size` zero bytes, read in chunks: a bomb's payload without holding it in memory."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._left = size

    def read(self, n: int = -1) -> bytes:
        n = self._left if n < 0 else min(n, self._left)
        self._left -= n
        return bytes(n)


Member = bytes | Zeros


def write_archive(path: Path, members: Mapping[str, Member]) -> Path:
    """A .zip (deflated) or .tar.gz at `path`, by its suffix, holding `members`."""
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, data in members.items():
                info = zipfile.ZipInfo(name)
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w") as out:
                    shutil.copyfileobj(_reader(data), out, MIB)
        return path
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = data.size if isinstance(data, Zeros) else len(data)
            archive.addfile(info, _reader(data))
    return path


def _reader(data: Member) -> Zeros | io.BytesIO:
    return data if isinstance(data, Zeros) else io.BytesIO(data)


def adapter_members(directory: Path, prefix: str = "") -> dict[str, Member]:
    return {prefix + name: (directory / name).read_bytes() for name in (CONFIG_NAME,
                                                                         WEIGHTS_NAME)}


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return good_adapter(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory, good: Path) -> dict[str, Path]:
    """A valid adapter plus 200 MB of zeros, compressed to about 200 KB, per kind."""
    root = tmp_path_factory.mktemp("bombs")
    return {kind: write_archive(root / f"bomb.{kind}",
                                {**adapter_members(good), "junk.bin": Zeros(BOMB_BYTES)})
            for kind in KINDS}


@pytest.fixture
def dest(tmp_path: Path) -> Path:
    path = tmp_path / "spool"
    path.mkdir()
    return path


@pytest.mark.parametrize("kind", KINDS)
def test_bomb_is_refused_quickly_leaving_nothing(kind: str, bombs: dict[str, Path],
                                                 dest: Path) -> None:
    assert bombs[kind].stat().st_size < 1 * MIB
    started = time.perf_counter()
    with pytest.raises(InvalidAdapter) as err:
        resolve_source(bombs[kind], extract_limit=LIMIT, extract_dir=dest)
    assert err.value.code == "archive_too_large"
    assert time.perf_counter() - started < 2.0  # refused by the headers, not by inflating
    assert list(dest.iterdir()) == []


def test_bytes_are_counted_when_the_zip_headers_lie(tmp_path: Path, good: Path, dest: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """CPython's zipfile stops at the declared size, so a crafted archive would only fail
    its CRC; to check our own count, the declared sizes are shrunk after parsing while
    members are still read with their real ones (a reader that trusts the data)."""
    weights = Zeros(2 * LIMIT)
    archive = write_archive(tmp_path / "liar.zip",
                            {CONFIG_NAME: (good / CONFIG_NAME).read_bytes(),
                             WEIGHTS_NAME: weights})
    real_infolist, real_open = zipfile.ZipFile.infolist, zipfile.ZipFile.open

    def small_infolist(self: zipfile.ZipFile) -> list[zipfile.ZipInfo]:
        infos = []
        for info in real_infolist(self):
            small = zipfile.ZipInfo(info.filename, info.date_time)
            for attr in ("compress_type", "compress_size", "header_offset", "flag_bits",
                         "external_attr", "CRC"):
                setattr(small, attr, getattr(info, attr))
            small.file_size = 1024
            infos.append(small)
        return infos

    def real_size_open(self: zipfile.ZipFile, name: str | zipfile.ZipInfo,
                       *args: object, **kwargs: object) -> object:
        return real_open(self, name if isinstance(name, str) else name.filename,
                         *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(zipfile.ZipFile, "infolist", small_infolist)
    monkeypatch.setattr(zipfile.ZipFile, "open", real_size_open)
    with pytest.raises(InvalidAdapter) as err:
        resolve_source(archive, extract_limit=LIMIT, extract_dir=dest)
    assert err.value.code == "archive_too_large"
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("kind", KINDS)
def test_too_many_entries_are_refused(kind: str, tmp_path: Path, good: Path,
                                      dest: Path) -> None:
    members = adapter_members(good)
    members |= {f"junk/{i}.txt": b"x" for i in range(MAX_ARCHIVE_ENTRIES - len(members))}
    at_bound = write_archive(tmp_path / f"full.{kind}", members)
    with open_adapter(at_bound) as adapter:
        adapter.validate()
    members["junk/one-more.txt"] = b"x"
    over = write_archive(tmp_path / f"over.{kind}", members)
    with pytest.raises(InvalidAdapter) as err:
        resolve_source(over, extract_limit=LIMIT, extract_dir=dest)
    assert err.value.code == "archive_too_large"
    assert f"more than {MAX_ARCHIVE_ENTRIES} entries" in err.value.message
    assert list(dest.iterdir()) == []


def test_an_oversized_zip_directory_is_refused_before_parsing(tmp_path: Path, good: Path,
                                                              dest: Path) -> None:
    long_names = {f"junk/{i:04d}-{'x' * 4000}": b"" for i in range(300)}
    archive = write_archive(tmp_path / "wide.zip", {**adapter_members(good), **long_names})
    with pytest.raises(InvalidAdapter) as err:
        resolve_source(archive, extract_limit=LIMIT, extract_dir=dest)
    assert err.value.code == "archive_too_large"
    assert "central directory" in err.value.message


LAYOUTS = {"root": "", "top_dir": "adapter/", "nested": "runs/adapter/"}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("kind", KINDS)
def test_only_the_adapter_files_are_extracted_into_the_given_dir(
        kind: str, layout: str, tmp_path: Path, good: Path, dest: Path) -> None:
    prefix = LAYOUTS[layout]
    junk: dict[str, Member] = {f"{prefix}{name}": b"junk" for name in (
        "README.md", "lorafold.json", "adapter_model.bin", "checkpoint/optimizer.pt", ".env")}
    junk["__MACOSX/._adapter_config.json"] = b"resource fork"
    archive = write_archive(tmp_path / f"adapter.{kind}", {**adapter_members(good, prefix),
                                                          **junk})
    source = resolve_source(archive, extract_limit=LIMIT, extract_dir=dest)
    try:
        assert source.directory.parent == dest
        assert files_under(dest) == sorted(
            f"{source.directory.name}/{n}" for n in (CONFIG_NAME, WEIGHTS_NAME))
        assert (source.directory / WEIGHTS_NAME).read_bytes() == \
            (good / WEIGHTS_NAME).read_bytes()
    finally:
        source.cleanup()
    assert list(dest.iterdir()) == []
    with open_adapter(archive) as adapter:
        adapter.validate()
        assert adapter.summary()["module_count"] == 2


def test_without_a_dir_archives_go_to_the_system_temp_dir(
        tmp_path: Path, good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_archive(tmp_path / "adapter.zip", adapter_members(good))
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    source = resolve_source(archive)
    try:
        assert source.directory.parent == system_temp
    finally:
        source.cleanup()


@pytest.mark.parametrize("kind", KINDS)
def test_pickled_weights_in_an_archive_are_refused_unwritten(kind: str, tmp_path: Path,
                                                             good: Path, dest: Path) -> None:
    pickled = b"\x80\x04cos\nsystem\n(S'false'\ntR."
    archive = write_archive(tmp_path / f"pickle.{kind}", {
        f"adapter/{CONFIG_NAME}": (good / CONFIG_NAME).read_bytes(),
        "adapter/adapter_model.bin": pickled})
    with pytest.raises(InvalidAdapter) as err:
        resolve_source(archive, extract_limit=LIMIT, extract_dir=dest)
    assert err.value.code == "pickle_not_supported"
    assert list(dest.iterdir()) == []



def test_an_encrypted_zip_entry_is_an_invalid_archive_not_a_crash(tmp_path: Path, good: Path,
                                                                   dest: Path) -> None:
    """zipfile raises a bare RuntimeError for an encrypted entry: that was a 500."""
    path = write_archive(tmp_path / "encrypted.zip", adapter_members(good))
    raw = bytearray(path.read_bytes())  # zipfile cannot write encryption: set the flag bit
    for signature, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        start = raw.find(signature)
        while start >= 0:
            raw[start + flag_at] |= 0x1  # "encrypted": reading asks for a password
            start = raw.find(signature, start + 4)
    path.write_bytes(bytes(raw))
    with pytest.raises(InvalidAdapter) as info:
        resolve_source(path, extract_limit=LIMIT, extract_dir=dest)
    assert info.value.code == "invalid_archive"
    assert files_under(dest) == []
