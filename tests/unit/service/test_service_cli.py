"""`lorafold up`'s key handling and the `lorafold client` command line."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from lorafold.cli import build_parser, client_cmd, main
from lorafold.cli.service_cmd import ensure_api_key, ensure_s3_credentials
from lorafold.settings import Settings


def test_first_start_creates_a_private_key_file_and_reuses_it(tmp_path: Path) -> None:
    path, key = ensure_api_key(tmp_path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {key: "default"}
    assert len(key) >= 40
    assert ensure_api_key(tmp_path) == (path, key)
    settings = Settings(environment="production", api_keys_file=path)  # strong enough
    assert settings.tenants == {"default"}


def test_s3_credentials_are_kept_private(tmp_path: Path) -> None:
    access, secret = ensure_s3_credentials(tmp_path)
    assert ensure_s3_credentials(tmp_path) == (access, secret)
    assert stat.S_IMODE((tmp_path / "s3_credentials.json").stat().st_mode) == 0o600


def test_client_commands_parse() -> None:
    parser = build_parser()
    args = parser.parse_args(["client", "--url", "http://x", "merge", "ad_1", "ad_2",
                              "--rank", "8", "--rule", "ties", "--weights", "1,0.5", "--wait"])
    assert args.action == "merge" and args.adapter_ids == ["ad_1", "ad_2"] and args.wait
    args = parser.parse_args(["up", "--s3", "--workers", "2", "--port", "8001"])
    assert args.s3 and args.workers == 2 and args.port == 8001


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[list[str], dict[str, Any]]] = []

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def merge(self, adapter_ids: list[str], **options: Any) -> dict[str, Any]:
        self.calls.append((adapter_ids, options))
        return {"id": "job_1", "status": "queued"}


def test_client_merge_sends_the_new_options_and_only_those_set(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeClient()
    monkeypatch.setattr(client_cmd, "_client", lambda args: fake)
    assert main(["client", "merge", "ad_1", "ad_2", "--rank", "4", "--rule", "dare_ties",
                 "--density", "0.3", "--drop", "0.2", "--beta", "0.25", "--subspace", "hosvd",
                 "-q"]) == 0
    assert capsys.readouterr().out.strip() == "job_1"
    assert main(["client", "merge", "ad_1", "--rank", "4", "-q"]) == 0
    (ids, given), (_, defaults) = fake.calls
    assert ids == ["ad_1", "ad_2"]
    assert {k: given[k] for k in ("rule", "density", "drop", "beta", "subspace")} == {
        "rule": "dare_ties", "density": 0.3, "drop": 0.2, "beta": 0.25, "subspace": "hosvd"}
    assert "balance" not in given
    # nothing set: None, so the client leaves them out and the service's defaults apply
    assert [defaults[k] for k in ("method", "rule", "density", "drop", "beta", "subspace")] \
        == [None] * 6
    with pytest.raises(SystemExit):
        build_parser().parse_args(["client", "merge", "ad_1", "--subspace", "x"])


def test_client_without_a_key_says_so(monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LORAFOLD_API_KEY", raising=False)
    assert main(["client", "list"]) == 2
    assert "missing_api_key" in capsys.readouterr().err
