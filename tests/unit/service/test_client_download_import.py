"""The client's download formats and import-by-reference, against a mock transport that
answers with real archives; and their command lines."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafold.adapters.archive_stream import Member, stream_archive
from lorafold.cli import build_parser, client_cmd
from lorafold.client import LorafoldClient

FILES = {"adapter_config.json": b'{"r": 2}', "adapter_model.safetensors": b"\x00" * 1000}


def archive_server(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        members = [Member(n, len(b), [b]) for n, b in FILES.items()]
        payload = b"".join(stream_archive(request.url.params["format"], members))  # type: ignore[arg-type]
        return httpx.Response(200, content=payload)
    return httpx.MockTransport(handler)


@pytest.mark.parametrize("fmt", ["tar.gz", "zip"])
def test_download_asks_for_the_format_and_extracts_it(tmp_path: Path, fmt: str) -> None:
    seen: list[httpx.Request] = []
    with LorafoldClient("http://svc", "k", transport=archive_server(seen)) as client:
        saved = client.download("ad_1", tmp_path / f"a.{fmt}", archive_format=fmt)
        out = client.download("ad_1", tmp_path / "out", archive_format=fmt, extract=True)
    assert saved.is_file() and saved.name == f"a.{fmt}"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == FILES  # archive removed
    assert [r.url.params["format"] for r in seen] == [fmt, fmt]
    assert seen[0].url.path == "/v1/adapters/ad_1/download"


def test_import_posts_json_with_the_idempotency_key() -> None:
    seen: dict[str, Any] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        seen["type"] = request.headers["content-type"]
        seen["key"] = request.headers.get("idempotency-key")
        seen["body"] = json.loads(request.read())
        return httpx.Response(201, json={"id": "ad_9"})

    with LorafoldClient("http://svc", "k", transport=httpx.MockTransport(handler)) as client:
        assert client.import_adapter("s3://b/k.tar.gz", name="n", metadata={"t": 1},
                                     idempotency_key="i1") == {"id": "ad_9"}
        assert client.import_adapter("https://h/a.zip") == {"id": "ad_9"}
    assert seen["type"] == "application/json" and seen["body"] == {"source": "https://h/a.zip"}


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def download(self, *args: Any, **kwargs: Any) -> Path:
        self.calls.append(("download", args, kwargs))
        return Path(args[1])

    def import_adapter(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(("import", args, kwargs))
        return {"id": "ad_2"}


def test_cli_download_format_and_import(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    recorder = Recorder()
    monkeypatch.setattr(client_cmd, "_client", lambda args: recorder)
    parser = build_parser()
    for argv in (["client", "download", "ad_1", "--format", "zip"],
                 ["client", "import", "hf://org/name@v1", "--name", "n", "--metadata",
                  '{"a": 1}', "-q"]):
        args = parser.parse_args(argv)
        assert args.handler(args) == 0
    (_, down_args, down_kwargs), (_, imp_args, imp_kwargs) = recorder.calls
    assert down_args == ("ad_1", Path("ad_1.zip"))
    assert down_kwargs == {"extract": False, "archive_format": "zip"}
    assert imp_args == ("hf://org/name@v1",)
    assert imp_kwargs == {"name": "n", "metadata": {"a": 1}}
    assert capsys.readouterr().out.split()[-1] == "ad_2"
    with pytest.raises(SystemExit):
        parser.parse_args(["client", "download", "ad_1", "--format", "rar"])
