"""The settings object: environment variables in, unsafe values refused."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import SecretStr, ValidationError

from lorafold.settings import ClientSettings, Settings, key_digest

GOOD_KEY = "k" * 32


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("LORAFOLD_") or name == "CUDA_VISIBLE_DEVICES":
            monkeypatch.delenv(name)


def test_reads_prefixed_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFOLD_API_KEYS", json.dumps({GOOD_KEY: "team-a"}))
    monkeypatch.setenv("LORAFOLD_MERGE_TIMEOUT_S", "7200")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,3")
    settings = Settings()
    assert settings.merge_timeout_s == 7200
    assert settings.job_timeout_s("merge") == 7200
    assert settings.tenant_for_digest(key_digest(GOOD_KEY)) == "team-a"
    assert settings.tenant_for_digest(key_digest("other")) is None
    assert settings.cuda_visible_devices == "1,3"


def test_defaults_are_safe_for_development() -> None:
    settings = Settings()
    assert settings.environment == "development"
    assert settings.merge_timeout_s == 3600  # never RQ's 180 s
    assert settings.abandoned_after_s >= 2 * settings.job_monitoring_interval_s
    assert not settings.uses_s3


@pytest.mark.parametrize("keys", [{"short": "t"}, {"changeme" * 4: "t"} | {"key1": "t"}])
def test_production_refuses_weak_keys(keys: dict[str, str]) -> None:
    with pytest.raises(ValidationError):
        Settings(environment="production", api_keys=keys)


def test_only_the_api_needs_keys_in_production() -> None:
    worker = Settings(environment="production")  # a worker authenticates nothing
    assert worker.tenants == set()
    with pytest.raises(ValueError, match="needs at least one API key"):
        worker.require_api_keys()
    Settings(environment="production", api_keys={GOOD_KEY: "t"}).require_api_keys()
    Settings().require_api_keys()  # development: an open API is allowed


def test_secrets_are_secret_strings() -> None:
    settings = Settings(api_keys={GOOD_KEY: "t"}, s3_secret_key="s3-" + "x" * 30,
                        webhook_secret="whsec_" + "y" * 30)
    assert all(isinstance(key, SecretStr) for key in settings.api_keys)
    assert isinstance(settings.s3_secret_key, SecretStr)
    assert isinstance(settings.webhook_secret, SecretStr)
    for secret in (GOOD_KEY, "x" * 30, "y" * 30):
        assert secret not in repr(settings) and secret not in settings.model_dump_json()
    assert settings.storage_options()["secret_key"] == "s3-" + "x" * 30  # unwrapped at use


def test_production_accepts_strong_keys() -> None:
    settings = Settings(environment="production", api_keys={GOOD_KEY: "t"})
    assert settings.tenants == {"t"}


def test_production_refuses_placeholder_s3_secret() -> None:
    with pytest.raises(ValidationError, match="S3 secret"):
        Settings(environment="production", api_keys={GOOD_KEY: "t"},
                 storage_url="s3://bucket", s3_endpoint_url="http://127.0.0.1:9000",
                 s3_secret_key="minioadmin")


def test_refuses_unsafe_tenant_names() -> None:
    with pytest.raises(ValidationError, match="tenant"):
        Settings(api_keys={GOOD_KEY: "../etc"})


def test_refuses_heartbeat_longer_than_abandonment() -> None:
    with pytest.raises(ValidationError, match="abandoned_after_s"):
        Settings(job_monitoring_interval_s=30, abandoned_after_s=40)


@pytest.mark.parametrize("field, value", [("redis_url", "http://x"),
                                          ("storage_url", "ftp://x/y"),
                                          ("gpus", "first"),
                                          ("worker_ttl_s", 5)])
def test_refuses_bad_values(field: str, value: object) -> None:
    with pytest.raises(ValidationError):
        Settings(**{field: value})


def test_keys_file_must_be_private(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({GOOD_KEY: "from-file"}))
    path.chmod(0o644)
    with pytest.raises(ValidationError, match="chmod 600"):
        Settings(api_keys_file=path)
    path.chmod(0o600)
    settings = Settings(api_keys_file=path, api_keys={"x" * 20: "inline"})
    assert settings.tenants == {"from-file", "inline"}


def test_overrides_as_a_child_process_would_see_them() -> None:
    settings = Settings.from_env_overrides({"LORAFOLD_WORKERS": "3", "PATH": "/bin"})
    assert settings.workers == 3


def test_client_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAFOLD_URL", "http://127.0.0.1:9999")
    monkeypatch.setenv("LORAFOLD_API_KEY", "abc")
    client = ClientSettings()
    assert client.url == "http://127.0.0.1:9999"
    assert client.api_key is not None and client.api_key.get_secret_value() == "abc"


def test_api_keys_never_appear_in_the_settings_repr() -> None:
    """Settings get logged and printed in tracebacks; the keys must not be."""
    settings = Settings(api_keys={"lf_" + "s3cr3t" * 8: "acme"})
    assert "s3cr3t" not in repr(settings) and "s3cr3t" not in str(settings)
    assert settings.tenant_for_digest(key_digest("lf_" + "s3cr3t" * 8)) == "acme"
