"""fetch_hub's own logic with a stand-in for the huggingface_hub module (the real Hub is
never reached by the tests): sizes refused before any download, both files from the one
commit the metadata named, the hub's errors mapped to source_fetch_failed."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lorafold.budget import Budget
from lorafold.errors import PayloadTooLarge, SourceFetchFailed, SourceRefused
from lorafold.fetch import hub
from lorafold.fetch.policy import Deadline, FetchPolicy
from lorafold.fetch.sources import HubSource

FILES = {"adapter_config.json": b'{"r": 2}', "adapter_model.safetensors": b"\x00" * 500,
         "README.md": b"# card"}


class FakeHub:
    def __init__(self, files: dict[str, bytes], error: Exception | None = None) -> None:
        self.files = files
        self.error = error
        self.downloads: list[tuple[str, str]] = []

    def HfApi(self) -> Any:  # the module's name
        outer = self

        class Api:
            def model_info(self, repo_id: str, **kwargs: Any) -> Any:
                if outer.error is not None:
                    raise outer.error
                siblings = [SimpleNamespace(rfilename=n, size=len(b))
                            for n, b in outer.files.items()]
                return SimpleNamespace(sha="c0ffee", siblings=siblings)
        return Api()

    def hf_hub_download(self, repo_id: str, filename: str, *, revision: str,
                        local_dir: str, **kwargs: Any) -> str:
        self.downloads.append((filename, revision))
        path = Path(local_dir) / filename
        path.write_bytes(self.files[filename])
        return str(path)


class Sink:
    def __init__(self) -> None:
        self.files: dict[str, bytearray] = {}

    def archive(self, name: str) -> Any:
        raise AssertionError("a Hub repo is a directory")

    def file(self, name: str) -> Any:
        class Buffer(bytearray):
            def write(self, chunk: bytes) -> None:
                self.extend(chunk)
        self.files[name] = Buffer()
        return self.files[name]


def run(fake: FakeHub, tmp_path: Path, limit: int = 10_000, enabled: bool = True) -> Sink:
    sink = Sink()
    budget = Budget(limit, lambda n: PayloadTooLarge("over", code="source_too_large"))
    hub.fetch_hub(HubSource("org/name", "main"), policy=FetchPolicy(hub=enabled), sink=sink,  # type: ignore[arg-type]
                  budget=budget, deadline=Deadline(10, "x"), work_dir=tmp_path)
    return sink


def test_fetches_the_peft_files_of_one_commit(monkeypatch: pytest.MonkeyPatch,
                                              tmp_path: Path) -> None:
    fake = FakeHub(FILES)
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    sink = run(fake, tmp_path)
    assert {n: bytes(b) for n, b in sink.files.items()} == \
        {n: FILES[n] for n in ("adapter_config.json", "adapter_model.safetensors")}
    assert {revision for _, revision in fake.downloads} == {"c0ffee"}
    assert list(tmp_path.iterdir()) == []  # the download dir is gone


def test_refusals(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = FakeHub(FILES)
    monkeypatch.setattr(hub, "_hub", lambda: fake)
    with pytest.raises(SourceRefused) as refused:
        run(fake, tmp_path, enabled=False)
    assert refused.value.code == "source_hub_disabled"
    with pytest.raises(PayloadTooLarge):
        run(fake, tmp_path, limit=100)
    assert fake.downloads == []  # refused on the sizes, before downloading
    empty = FakeHub({"README.md": b"x"})
    monkeypatch.setattr(hub, "_hub", lambda: empty)
    with pytest.raises(SourceFetchFailed, match=r"no adapter_config\.json"):
        run(empty, tmp_path)
    broken = FakeHub(FILES, error=RuntimeError("401 Client Error: Unauthorized"))
    monkeypatch.setattr(hub, "_hub", lambda: broken)
    with pytest.raises(SourceFetchFailed, match="Unauthorized"):
        run(broken, tmp_path)
