"""Streaming multipart into the spool: files on disk as they arrive, bytes counted, the
limit enforced, and the shape of the form checked before any tensor is read."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from starlette.requests import Request

from app.multipart import receive_upload
from lorafold.errors import InvalidRequest, PayloadTooLarge
from lorafold.service.uploads import ByteBudget, UploadSpool, read_form

BOUNDARY = "unit-boundary-42"


def part(name: str, value: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + value \
        + b"\r\n"


def body(*parts: bytes) -> bytes:
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


class Body:
    """An ASGI receive() that hands out a body in small chunks and counts what was read."""

    def __init__(self, data: bytes, chunk: int = 1000) -> None:
        self.chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)] or [b""]
        self.sent = 0

    async def __call__(self) -> dict[str, object]:
        chunk = self.chunks[self.sent]
        self.sent += 1
        return {"type": "http.request", "body": chunk, "more_body": self.sent < len(self.chunks)}


def request(data: bytes, *, content_type: str | None = None,
            extra: Iterable[tuple[bytes, bytes]] = ()) -> tuple[Request, Body]:
    ctype = content_type or f"multipart/form-data; boundary={BOUNDARY}"
    receive = Body(data)
    scope = {"type": "http", "method": "POST", "path": "/v1/adapters", "query_string": b"",
             "headers": [(b"content-type", ctype.encode()), *extra]}
    return Request(scope, receive), receive  # type: ignore[arg-type]


def receive(data: bytes, spool: UploadSpool, limit: int = 10**6, drain: int = 10**6,
            **kwargs: object) -> Body:
    req, source = request(data, **kwargs)  # type: ignore[arg-type]
    asyncio.run(receive_upload(req, spool=spool, budget=ByteBudget(limit), drain_limit=drain))
    return source


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[UploadSpool]:
    spool = UploadSpool.create(tmp_path)
    yield spool
    spool.cleanup()


def test_files_and_fields_are_spooled_and_hashed(spool: UploadSpool) -> None:
    weights = bytes(range(256)) * 40
    receive(body(part("name", b"my adapter"), part("metadata", b'{"team": "a"}'),
                 part("files", b"{}", "adapter_config.json"),
                 part("files", weights, "adapter_model.safetensors"),
                 part("files", b"# readme", "README.md")), spool)
    assert spool.fields == {"name": "my adapter", "metadata": '{"team": "a"}'}
    assert set(spool.files) == {"adapter_config.json", "adapter_model.safetensors"}
    stored = spool.files["adapter_model.safetensors"]
    assert stored.path.read_bytes() == weights
    assert stored.sha256 == hashlib.sha256(weights).hexdigest()
    form = read_form(spool)
    assert form.name == "my adapter" and form.metadata == {"team": "a"}
    assert form.source == spool.root / "files"


def test_client_paths_are_reduced_to_basenames(spool: UploadSpool) -> None:
    receive(body(part("files", b"{}", "../../etc/adapter_config.json"),
                 part("files", b"x", "C:\\tmp\\adapter_model.safetensors")), spool)
    assert {p.path.parent for p in spool.files.values()} == {spool.root / "files"}


def test_past_the_limit_is_refused_after_draining(spool: UploadSpool) -> None:
    data = body(part("files", b"\0" * 50_000, "adapter_model.safetensors"))
    req, source = request(data)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_upload(req, spool=spool, budget=ByteBudget(10_000),
                                   drain_limit=10**6))
    assert source.sent == len(source.chunks)  # drained: the client will read our 413
    written = spool.files["adapter_model.safetensors"].path.stat().st_size
    assert written <= 10_000


def test_drain_stops_at_its_own_limit(spool: UploadSpool) -> None:
    data = body(part("files", b"\0" * 50_000, "adapter_model.safetensors"))
    req, source = request(data)
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_upload(req, spool=spool, budget=ByteBudget(10_000),
                                   drain_limit=5_000))
    assert source.sent < len(source.chunks)


def test_declared_length_past_the_limit_is_refused_unread(spool: UploadSpool) -> None:
    req, source = request(b"x" * 10, extra=[(b"content-length", b"999999999")])
    with pytest.raises(PayloadTooLarge):
        asyncio.run(receive_upload(req, spool=spool, budget=ByteBudget(1000), drain_limit=10))
    assert source.sent == 0


@pytest.mark.parametrize("data, code", [
    (body(part("files", b"x", "weights.pt")), "invalid_upload"),
    (body(part("other", b"x", "adapter_config.json")), "invalid_upload"),
    (body(part("color", b"blue")), "invalid_upload"),
    (body(part("name", b"n" * 70_000)), "invalid_upload"),
    (body(part("files", b"x", "a.zip"), part("archive", b"y", "b.tar.gz")), "invalid_upload"),
    (b"--" + BOUNDARY.encode() + b"\r\nno headers here", "invalid_upload"),
])
def test_malformed_forms_are_refused(spool: UploadSpool, data: bytes, code: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        receive(data, spool)
    assert err.value.code == code


def test_only_multipart_is_accepted(spool: UploadSpool) -> None:
    with pytest.raises(InvalidRequest) as err:
        receive(b"{}", spool, content_type="application/json")
    assert err.value.code == "unsupported_media_type"


@pytest.mark.parametrize("parts, code", [
    ((), "invalid_upload"),
    ((part("files", b"{}", "adapter_config.json"), part("archive", b"PK", "a.zip")),
     "invalid_upload"),
    ((part("files", b"{}", "adapter_config.json"), part("metadata", b"[1]")),
     "invalid_metadata"),
    ((part("files", b"{}", "adapter_config.json"), part("metadata", b"{oops")),
     "invalid_metadata"),
    # non-finite numbers used to reach the idempotency fingerprint and answer 500
    *[((part("files", b"{}", "adapter_config.json"), part("metadata", value)),
       "invalid_metadata")
      for value in (b'{"x": NaN}', b'{"x": Infinity}', b'{"x": [-Infinity]}',
                    b'{"x": {"y": 1e999}}')],
    ((part("files", b"{}", "adapter_config.json"), part("name", b"   ")), "invalid_name"),
])
def test_form_shape_is_checked(spool: UploadSpool, parts: tuple[bytes, ...],
                               code: str) -> None:
    receive(body(*parts), spool)
    with pytest.raises(InvalidRequest) as err:
        read_form(spool)
    assert err.value.code == code


def test_fingerprint_identifies_the_content(tmp_path: Path) -> None:
    def fingerprint(name: bytes, weights: bytes, order: int) -> str:
        spool = UploadSpool.create(tmp_path)
        files = [part("files", b"{}", "adapter_config.json"),
                 part("files", weights, "adapter_model.safetensors")]
        receive(body(part("name", name), *files[::order]), spool)
        try:
            return read_form(spool).fingerprint
        finally:
            spool.cleanup()

    same = fingerprint(b"a", b"w1", 1)
    assert fingerprint(b"a", b"w1", -1) == same
    assert fingerprint(b"b", b"w1", 1) != same
    assert fingerprint(b"a", b"w2", 1) != same
    assert json.loads(json.dumps(same)) == same
