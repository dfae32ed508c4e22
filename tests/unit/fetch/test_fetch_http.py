"""fetch_http against loopback origins: TLS verified against the URL's host name while the
connection goes to the address checked once (a DNS answer that changes later is ignored)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator

import pytest

from lorafold.budget import Budget
from lorafold.errors import PayloadTooLarge
from lorafold.fetch.http import fetch_http
from lorafold.fetch.policy import Deadline, FetchPolicy
from lorafold.fetch.sources import HttpSource
from tests.loopback_http import Origin, Route

trustme = pytest.importorskip("trustme")
BODY = b"\x1f\x8b" + bytes(300_000)


class MemorySink:
    def __init__(self) -> None:
        self.archives: dict[str, bytearray] = {}

    def archive(self, name: str) -> bytearray:
        class Buffer(bytearray):
            def write(self, chunk: bytes) -> None:
                self.extend(chunk)
        self.archives[name] = Buffer()
        return self.archives[name]

    def file(self, name: str) -> None:
        return None


@pytest.fixture
def ca() -> object:
    return trustme.CA()


@pytest.fixture
def tls_origin(ca: object) -> Iterator[Origin]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("models.test").configure_cert(context)  # type: ignore[attr-defined]
    server = Origin("127.0.0.1", ssl_context=context)
    server.routes["/a.tar.gz"] = Route(body=BODY)
    try:
        yield server
    finally:
        server.stop()


def budget(limit: int = 10**7) -> Budget:
    return Budget(limit, lambda n: PayloadTooLarge(f"over {n}", code="source_too_large"))


def client_context(ca: object) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)  # type: ignore[attr-defined]
    return context


def test_https_by_name_connects_to_the_checked_address_once(ca: object,
                                                            tls_origin: Origin) -> None:
    """models.test resolves to 127.0.0.1 on the first query and to 127.0.0.2 (nothing
    there) on any later one: the fetch uses the first answer, and verifies the cert
    against models.test."""
    answers = iter([["127.0.0.1"], ["127.0.0.2"], ["127.0.0.2"]])
    queried: list[str] = []

    def resolve(host: str, port: int) -> list[str]:
        queried.append(host)
        return next(answers)

    policy = FetchPolicy.from_entries(["models.test"], resolver=resolve)
    sink = MemorySink()
    fetch_http(HttpSource(tls_origin.url("/a.tar.gz", host="models.test")), policy=policy,
               sink=sink, budget=budget(), deadline=Deadline(10, "x"),  # type: ignore[arg-type]
               ssl_context=client_context(ca))
    assert bytes(sink.archives["a.tar.gz"]) == BODY
    assert queried == ["models.test"] and tls_origin.hits["/a.tar.gz"] == 1


def test_the_certificate_must_name_the_host(ca: object, tls_origin: Origin) -> None:
    from lorafold.errors import SourceFetchFailed

    policy = FetchPolicy.from_entries(["other.test"], resolver=lambda h, p: ["127.0.0.1"])
    with pytest.raises(SourceFetchFailed, match=r"(?i)certificate|hostname"):
        fetch_http(HttpSource(tls_origin.url("/a.tar.gz", host="other.test")), policy=policy,
                   sink=MemorySink(), budget=budget(),  # type: ignore[arg-type]
                   deadline=Deadline(10, "x"), ssl_context=client_context(ca))


def test_declared_length_is_refused_before_reading(ca: object, tls_origin: Origin) -> None:
    policy = FetchPolicy.from_entries(["models.test"], resolver=lambda h, p: ["127.0.0.1"])
    sink = MemorySink()
    with pytest.raises(PayloadTooLarge):
        fetch_http(HttpSource(tls_origin.url("/a.tar.gz", host="models.test")), policy=policy,
                   sink=sink, budget=budget(len(BODY) - 1),  # type: ignore[arg-type]
                   deadline=Deadline(10, "x"), ssl_context=client_context(ca))
    assert sink.archives == {}  # not one byte written
