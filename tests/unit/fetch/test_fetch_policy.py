"""The SSRF guard without a network: which addresses pass, resolving once, the allow-list
entries, the source parser and the deadline."""

from __future__ import annotations

import ipaddress
import time

import pytest

from lorafold.errors import InvalidRequest, SourceFetchFailed, SourceRefused
from lorafold.fetch.policy import Deadline, FetchPolicy, HostEntry, is_public, parse_allowed_host
from lorafold.fetch.sources import HttpSource, HubSource, S3Source, parse_source, redacted
from lorafold.settings import Settings

NOT_PUBLIC = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
              "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "fc00::1",
              "fe80::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::", "ff02::1"]


def resolver_of(*addresses: str) -> tuple[list[str], object]:
    calls: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return list(addresses)
    return calls, resolve


@pytest.mark.parametrize("address", NOT_PUBLIC)
def test_non_public_addresses(address: str) -> None:
    assert not is_public(ipaddress.ip_address(address))
    _, resolve = resolver_of(address)
    policy = FetchPolicy(resolver=resolve)  # type: ignore[arg-type]
    with pytest.raises(SourceRefused) as err:
        policy.http_target("https://innocent.example/a.zip", Deadline(5, "x"))
    assert err.value.code == "source_not_allowed"
    assert str(ipaddress.ip_address(address)) in err.value.message


def test_public_https_passes_and_pins_the_checked_address() -> None:
    calls, resolve = resolver_of("10.0.0.1", "93.184.216.34")
    target = FetchPolicy(resolver=resolve).http_target(  # type: ignore[arg-type]
        "https://models.example/a.zip", Deadline(5, "x"))
    assert (target.address, target.host, target.port) == ("93.184.216.34", "models.example",
                                                          443)
    assert calls == ["models.example"]  # resolved once


def test_http_needs_the_allow_list_even_for_public_addresses() -> None:
    calls, resolve = resolver_of("93.184.216.34")
    with pytest.raises(SourceRefused, match="http only"):
        FetchPolicy(resolver=resolve).http_target(  # type: ignore[arg-type]
            "http://models.example/a.zip", Deadline(5, "x"))
    assert calls == []  # refused before any DNS query
    allowed = FetchPolicy.from_entries(["models.example:8080"], resolver=resolve)
    assert allowed.http_target("http://models.example:8080/a", Deadline(5, "x")).port == 8080
    with pytest.raises(SourceRefused):
        allowed.http_target("http://models.example:8081/a", Deadline(5, "x"))


def test_networks_on_the_allow_list() -> None:
    _, resolve = resolver_of("10.20.30.40")
    policy = FetchPolicy.from_entries(["10.20.0.0/16"], public_https=False, resolver=resolve)
    assert policy.http_target("http://minio.internal/a", Deadline(5, "x")).address == \
        "10.20.30.40"
    _, elsewhere = resolver_of("10.99.0.1")
    with pytest.raises(SourceRefused):
        FetchPolicy.from_entries(["10.20.0.0/16"], public_https=False,
                                 resolver=elsewhere).http_target("https://x.internal/a",
                                                                 Deadline(5, "x"))


def test_public_https_off_refuses_unlisted_hosts_without_resolving() -> None:
    calls, resolve = resolver_of("93.184.216.34")
    with pytest.raises(SourceRefused):
        FetchPolicy(public_https=False, resolver=resolve).http_target(  # type: ignore[arg-type]
            "https://models.example/a", Deadline(5, "x"))
    assert calls == []


def test_resolution_failure_and_timeout() -> None:
    def fails(host: str, port: int) -> list[str]:
        raise OSError("Name or service not known")

    def hangs(host: str, port: int) -> list[str]:
        time.sleep(1.0)
        return ["93.184.216.34"]

    with pytest.raises(SourceFetchFailed) as err:
        FetchPolicy(resolver=fails).http_target("https://nx.example/a", Deadline(5, "x"))
    assert err.value.code == "source_fetch_failed"
    with pytest.raises(SourceFetchFailed) as err:
        FetchPolicy(resolver=hangs).http_target("https://slow.example/a", Deadline(0.2, "x"))
    assert err.value.code == "source_timeout"


def test_allow_list_entries() -> None:
    assert parse_allowed_host("10.0.0.0/8") == ipaddress.ip_network("10.0.0.0/8")
    assert parse_allowed_host("[::1]") == ipaddress.ip_network("::1/128")
    assert parse_allowed_host("Minio.Internal:9000") == HostEntry("minio.internal", 9000)
    for bad in ("", "a b", "http://x", "host/path", "host:99999"):
        with pytest.raises(ValueError):
            parse_allowed_host(bad)
    with pytest.raises(ValueError, match="import_allowed_hosts"):
        Settings(import_allowed_hosts=["http://x"])


def test_deadline() -> None:
    deadline = Deadline(0.05, "https://h/a?sig=secret")
    deadline.check()
    time.sleep(0.06)
    with pytest.raises(SourceFetchFailed) as err:
        deadline.check()
    assert err.value.code == "source_timeout"


def test_sources_parse_and_redact() -> None:
    assert parse_source("https://h/a/support-v3.tar.gz?x=1") == \
        HttpSource("https://h/a/support-v3.tar.gz?x=1")
    assert HttpSource("https://h/a/support-v3.tar.gz?x=1").default_name == "support-v3"
    s3 = parse_source("s3://bucket/models/billing.zip")
    assert s3 == S3Source("bucket", "models/billing.zip") and not s3.is_directory
    assert parse_source("s3://bucket/models/").is_directory  # type: ignore[union-attr]
    assert parse_source("hf://org/name") == HubSource("org/name", "main")
    assert parse_source("hf://org/name@refs/pr/1") == HubSource("org/name", "refs/pr/1")
    assert redacted("https://h/a.zip?X-Amz-Signature=abc#frag") == "https://h/a.zip?…"
    with pytest.raises(InvalidRequest) as err:
        parse_source("https://h/a.zip?X-Amz-Signature=abc def")
    assert "abc" not in err.value.message  # the signature never shows in a refusal
