"""Fetch one archive over https (or allow-listed http), connecting only to checked addresses.

httpcore is used directly (not httpx) for one reason: its network backend is pluggable,
so the TCP connection goes to the address the policy checked (`Target.address`) while
the Host header, TLS SNI and certificate verification still use the URL's host name. No
proxy settings from the environment apply (a proxy would reach hosts we never checked).
Redirects are followed by hand, at most MAX_REDIRECTS, each one checked again; bodies
are never decompressed (no Accept-Encoding), so the bytes counted are the bytes stored.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from urllib.parse import urljoin, urlsplit

import httpcore

from lorafold.budget import Budget
from lorafold.errors import SourceFetchFailed
from lorafold.fetch.policy import Deadline, FetchPolicy, Target
from lorafold.fetch.sink import Sink, pour, refuse_declared
from lorafold.fetch.sources import HttpSource, redacted

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECTS = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "lorafold-import/1"


class PinnedBackend(httpcore.SyncBackend):
    """Connects every request to one address, whatever host name the URL has."""

    def __init__(self, address: str) -> None:
        self.address = address

    def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                    local_address: str | None = None,
                    socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
                    ) -> httpcore.NetworkStream:
        return super().connect_tcp(self.address, port, timeout=timeout,
                                   local_address=local_address, socket_options=socket_options)


def _header(response: httpcore.Response, name: bytes) -> str | None:
    for key, value in response.headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _timeouts(deadline: Deadline) -> dict[str, float]:
    wait = deadline.wait_s()
    return {"connect": wait, "read": wait, "write": wait, "pool": wait}


def _archive_name(url: str) -> str:
    name = urlsplit(url).path.rsplit("/", 1)[-1]
    return name if name and not name.startswith(".") and name.isprintable() else "archive"


def _get(target: Target, *, ssl_context: ssl.SSLContext, sink: Sink, budget: Budget,
         deadline: Deadline) -> str | None:
    """GET `target`: the archive goes to `sink` (None returned), or the redirect's URL."""
    with httpcore.ConnectionPool(ssl_context=ssl_context, max_connections=1, retries=0,
                                 network_backend=PinnedBackend(target.address)) as pool:
        headers = [(b"User-Agent", USER_AGENT.encode()), (b"Accept", b"*/*")]
        with pool.stream("GET", target.url, headers=headers,
                         extensions={"timeout": _timeouts(deadline)}) as response:
            if response.status in REDIRECTS:
                location = _header(response, b"location")
                if not location:
                    raise SourceFetchFailed(f"{redacted(target.url)}: a redirect without a "
                                            "Location")
                return urljoin(target.url, location)
            if response.status != 200:
                raise SourceFetchFailed(f"{redacted(target.url)} answered HTTP "
                                        f"{response.status}")
            declared = _header(response, b"content-length")
            if declared is not None and declared.isdigit():
                refuse_declared(int(declared), budget)
            pour(response.iter_stream(), sink.archive(_archive_name(target.url)),
                 budget=budget, deadline=deadline)
            return None


def fetch_http(source: HttpSource, *, policy: FetchPolicy, sink: Sink, budget: Budget,
               deadline: Deadline, ssl_context: ssl.SSLContext | None = None) -> None:
    """Stream the archive at `source.url` into `sink`, following checked redirects."""
    context = ssl_context or ssl.create_default_context()
    url = source.url
    for hop in range(MAX_REDIRECTS + 1):
        target = policy.http_target(url, deadline, redirect=hop > 0)
        logger.info("import: GET %s (%s)", redacted(url), target.address)
        try:
            next_url = _get(target, ssl_context=context, sink=sink, budget=budget,
                            deadline=deadline)
        except httpcore.TimeoutException as e:
            raise deadline.expired() if deadline.remaining() <= 0 else SourceFetchFailed(
                f"{redacted(url)}: no answer within {deadline.wait_s():.0f} s",
                code="source_timeout") from e
        except (httpcore.NetworkError, httpcore.ProtocolError, httpcore.UnsupportedProtocol,
                ssl.SSLError, OSError) as e:
            raise SourceFetchFailed(f"{redacted(url)}: {type(e).__name__}: "
                                    f"{str(e)[:200]}") from e
        if next_url is None:
            return
        url = next_url
    raise SourceFetchFailed(f"{redacted(source.url)}: more than {MAX_REDIRECTS} redirects")
