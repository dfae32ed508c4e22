"""Which import sources the service may reach: the SSRF guard.

- https to a public address: allowed when `public_https` is on (the default);
- http, or any address that is not public (loopback, private, link-local, shared,
  reserved, multicast; IPv4-mapped IPv6 unwrapped first): only when `allowed_hosts` names
  the host (`name` or `name:port`) or a network holding the address (`10.0.0.0/8`,
  `127.0.0.1`, `[::1]`);
- the host is resolved once, here, and the fetch connects to the address that passed
  (`Target.address`), so a DNS answer that changes between check and connect (rebinding)
  cannot move it; every redirect is checked again the same way;
- s3:// only for the buckets (or `bucket/prefix`) in `s3_buckets`.

The whole fetch has one deadline (`Deadline`), checked as bytes arrive, so a server
sending one byte at a time cannot hold an API thread past it.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from lorafold.errors import InvalidRequest, SourceFetchFailed, SourceRefused
from lorafold.fetch.sources import S3Source, redacted

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], list[str]]
DEFAULT_PORTS = {"https": 443, "http": 80}
MAX_READ_WAIT_S = 30.0    # no single connect or read waits longer, whatever the deadline


@dataclass(frozen=True)
class HostEntry:
    name: str
    port: int | None = None

    def matches(self, host: str, port: int) -> bool:
        return host.lower() == self.name and self.port in (None, port)


def parse_allowed_host(entry: str) -> HostEntry | IpNetwork:
    """One allow-list entry: a network (CIDR or one address, v6 in brackets or not), or a
    host name with an optional port. ValueError says what is wrong with it."""
    text = entry.strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"import_allowed_hosts entry {entry!r} is not a host or a network")
    try:
        return ipaddress.ip_network(text.strip("[]"), strict=False)
    except ValueError:
        pass
    try:
        parts = urlsplit(f"//{text}")
        port = parts.port
    except ValueError as e:
        raise ValueError(f"import_allowed_hosts entry {entry!r}: {e}") from e
    host = parts.hostname or ""
    if not host or parts.path or parts.username or not host.isascii():
        raise ValueError(f"import_allowed_hosts entry {entry!r} is not a host, host:port or "
                         "network")
    return HostEntry(host.lower(), port)  # "127.0.0.1:9000": that address, on that port


def _unwrapped(address: IpAddress) -> IpAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public(address: IpAddress) -> bool:
    address = _unwrapped(address)
    return address.is_global and not address.is_multicast


def system_resolver(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class Deadline:
    """The fetch's time budget: `remaining()` seconds, `check()` raises once it is spent."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self._end = time.monotonic() + seconds
        self._what = what

    def remaining(self) -> float:
        return self._end - time.monotonic()

    def wait_s(self) -> float:
        """How long one connect or read may wait."""
        return max(0.001, min(self.remaining(), MAX_READ_WAIT_S))

    def check(self) -> None:
        if self.remaining() <= 0:
            raise self.expired()

    def expired(self) -> SourceFetchFailed:
        return SourceFetchFailed(f"fetching {self._what} took longer than {self.seconds:g} s",
                                 code="source_timeout")


@dataclass(frozen=True)
class Target:
    """A checked http(s) URL: connect to `address` (port `port`), speak to `host`."""

    url: str
    scheme: str
    host: str
    port: int
    address: str


@dataclass(frozen=True)
class FetchPolicy:
    allowed_hosts: Sequence[HostEntry | IpNetwork] = ()
    public_https: bool = True
    s3_buckets: Sequence[str] = ()
    hub: bool = False
    timeout_s: float = 300.0
    resolver: Resolver = field(default=system_resolver, compare=False)

    @classmethod
    def from_entries(cls, allowed_hosts: Sequence[str], **kwargs: object) -> FetchPolicy:
        return cls(allowed_hosts=tuple(parse_allowed_host(e) for e in allowed_hosts),
                   **kwargs)  # type: ignore[arg-type]

    @property
    def _networks(self) -> bool:
        return any(not isinstance(e, HostEntry) for e in self.allowed_hosts)

    def _named(self, host: str, port: int) -> bool:
        return any(isinstance(e, HostEntry) and e.matches(host, port)
                   for e in self.allowed_hosts)

    def _listed(self, address: IpAddress, port: int) -> bool:
        for entry in self.allowed_hosts:
            if isinstance(entry, HostEntry):
                if entry.matches(str(address), port):
                    return True
            elif _unwrapped(address) in entry or address in entry:
                return True
        return False

    def http_target(self, url: str, deadline: Deadline, *, redirect: bool = False) -> Target:
        """Check `url` against the policy and resolve its host once; the address to use."""
        via = " (a redirect)" if redirect else ""
        try:
            if not url.isascii() or not url.isprintable():
                raise ValueError("not printable ASCII")
            parts = urlsplit(url)
            explicit_port = parts.port
        except ValueError as e:
            raise SourceFetchFailed(f"{redacted(url)[:200]}{via}: not a usable URL ({e})") from e
        scheme, host = parts.scheme.lower(), parts.hostname or ""
        if scheme not in DEFAULT_PORTS or not host:
            raise SourceRefused(f"{redacted(url)}{via}: only https (and allow-listed http) "
                                "URLs can be fetched", code="source_scheme_unsupported")
        if parts.username is not None or parts.password is not None:
            raise InvalidRequest(f"{redacted(url)}{via}: credentials in the URL are not "
                                 "accepted", code="invalid_source")
        port = explicit_port or DEFAULT_PORTS[scheme]
        named = self._named(host, port)
        public_ok = scheme == "https" and self.public_https
        if not (named or public_ok or self._networks):
            raise SourceRefused(f"{redacted(url)}{via}: {host} is not in import_allowed_hosts"
                                + ("" if scheme == "https" else
                                   " (http only to allow-listed hosts; use https)"))
        addresses = [ipaddress.ip_address(a.split("%", 1)[0])
                     for a in _resolve(self.resolver, host, port, deadline, url)]
        for address in addresses:
            if named or self._listed(address, port) or (public_ok and is_public(address)):
                return Target(url=url, scheme=scheme, host=host, port=port,
                              address=str(address))
        shown = ", ".join(str(a) for a in addresses[:4])
        why = "is not a public address" if public_ok else "is not allowed over " + scheme
        raise SourceRefused(f"{redacted(url)}{via}: {host} resolves to {shown}, which {why} "
                            "and is not in import_allowed_hosts")

    def check_bucket(self, source: S3Source) -> None:
        for entry in self.s3_buckets:
            bucket, _, prefix = entry.partition("/")
            if bucket == source.bucket and source.key.startswith(prefix):
                return
        raise SourceRefused(f"s3://{source.bucket}/{source.key}: this bucket (and prefix) "
                            "is not in import_s3_buckets")

    def deadline(self, what: str) -> Deadline:
        return Deadline(self.timeout_s, redacted(what))


_RESOLVERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="import-dns")


def _resolve(resolver: Resolver, host: str, port: int, deadline: Deadline,
             url: str) -> list[str]:
    """The host's addresses, within the deadline (getaddrinfo itself has no timeout)."""
    future = _RESOLVERS.submit(resolver, host, port)
    try:
        addresses = future.result(timeout=deadline.wait_s())
    except FutureTimeout as e:
        raise deadline.expired() from e
    except (OSError, UnicodeError) as e:
        raise SourceFetchFailed(f"{redacted(url)}: cannot resolve {host}: {e}") from e
    if not addresses:
        raise SourceFetchFailed(f"{redacted(url)}: {host} has no address")
    return addresses
