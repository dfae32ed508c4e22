"""Streaming request bodies: multipart parts go to an `UploadSpool`, a raw body (a data
set) to one spooled file, as the bytes arrive.

The body is read with `request.stream()` and fed to python-multipart's streaming parser,
so memory stays at one network chunk whatever the upload's size. Every byte is counted
against the limit as it arrives; past it (or on any refusal) the rest of the body is read
and dropped, up to `drain_limit` bytes, so that the client gets to read our answer
instead of a connection reset.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Protocol

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from lorafold.errors import InvalidRequest, PayloadTooLarge
from lorafold.service.uploads import MAX_FIELD_BYTES, ByteBudget, SpooledFile, UploadSpool

MAX_PART_HEADER_BYTES = 16 * 1024


class PartSink:
    """python-multipart callbacks writing file parts to the spool, keeping text fields."""

    def __init__(self, spool: UploadSpool) -> None:
        self.spool = spool
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._header_bytes = 0
        self._name = ""
        self._file: SpooledFile | None = None
        self._text: bytearray | None = None

    def callbacks(self) -> dict[str, object]:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished,
                "on_part_data": self.on_part_data, "on_part_end": self.on_part_end}

    def on_part_begin(self) -> None:
        self._headers = {}
        self._header_bytes = 0
        self._file = None
        self._text = None

    def _grow(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > MAX_PART_HEADER_BYTES:
            raise InvalidRequest("a multipart part has oversized headers", code="invalid_upload")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow(end - start)
        self._header_field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._grow(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_field).lower()] = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition"))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidRequest("each part needs 'Content-Disposition: form-data; name=...'",
                                 code="invalid_upload")
        self._name = options[b"name"].decode("utf-8", "replace")
        filename = options.get(b"filename")
        if filename is not None:
            self._file = self.spool.open_file(self._name, filename.decode("utf-8", "replace"))
            if self._file is None:
                self._text = None  # a file we ignore: its bytes are dropped
        else:
            self._text = bytearray()

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            self._file.write(data[start:end])
        elif self._text is not None:
            if len(self._text) + (end - start) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"form field {self._name!r} is longer than "
                                     f"{MAX_FIELD_BYTES} bytes", code="invalid_upload")
            self._text += data[start:end]

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
        elif self._text is not None:
            self.spool.set_field(self._name, bytes(self._text))
        self._file = None
        self._text = None


def _boundary(request: Request) -> bytes:
    content_type, options = parse_options_header(request.headers.get("content-type"))
    if content_type != b"multipart/form-data" or not options.get(b"boundary"):
        raise InvalidRequest("send the adapter as multipart/form-data",
                             code="unsupported_media_type")
    return options[b"boundary"]


def _declared_length(request: Request) -> int | None:
    raw = request.headers.get("content-length")
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None


async def _drain(stream: AsyncIterator[bytes], limit: int) -> None:
    """Read and drop up to `limit` more bytes of the body (never keeps them)."""
    dropped = 0
    with contextlib.suppress(ClientDisconnect):
        async for chunk in stream:
            dropped += len(chunk)
            if dropped > limit:
                return


async def receive_upload(request: Request, *, spool: UploadSpool, budget: ByteBudget,
                         drain_limit: int) -> int:
    """Parse the multipart body into `spool`; returns the number of body bytes read."""
    boundary = _boundary(request)
    declared = _declared_length(request)
    if declared is not None and declared - budget.limit > drain_limit:
        raise PayloadTooLarge(f"the upload ({declared} bytes) exceeds the limit of "
                                  f"{budget.limit} bytes", limit=budget.limit)
    try:
        parser = MultipartParser(boundary, PartSink(spool).callbacks())  # type: ignore[arg-type]
    except (ValueError, FormParserError) as e:
        raise InvalidRequest(f"bad multipart boundary: {e}", code="invalid_upload") from e
    stream = request.stream()
    try:
        async for chunk in stream:
            budget.add(len(chunk))
            parser.write(chunk)
        parser.finalize()
    except ClientDisconnect as e:
        raise InvalidRequest("the client closed the connection during the upload",
                             code="upload_incomplete") from e
    except (InvalidRequest, PayloadTooLarge):
        await _drain(stream, drain_limit)
        raise
    except FormParserError as e:
        await _drain(stream, drain_limit)
        raise InvalidRequest(f"malformed multipart body: {e}", code="invalid_upload") from e
    return budget.used


class Sink(Protocol):
    """Where `receive_file` writes a body: a spooled file, or memory."""

    def write(self, chunk: bytes) -> object: ...
    def close(self) -> None: ...


async def receive_file(request: Request, *, sink: Sink, budget: ByteBudget,
                       drain_limit: int) -> int:
    """Stream a raw (non-multipart) body into `sink`; returns the number of bytes read."""
    declared = _declared_length(request)
    if declared is not None and declared - budget.limit > drain_limit:
        raise PayloadTooLarge(f"the body ({declared} bytes) exceeds the limit of "
                              f"{budget.limit} bytes", limit=budget.limit)
    stream = request.stream()
    try:
        async for chunk in stream:
            budget.add(len(chunk))
            sink.write(chunk)
    except ClientDisconnect as e:
        raise InvalidRequest("the client closed the connection during the upload",
                             code="upload_incomplete") from e
    except PayloadTooLarge:
        await _drain(stream, drain_limit)
        raise
    finally:
        sink.close()
    return budget.used


class _MemorySink:
    """A `receive_file` sink that keeps a small body in memory."""

    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes) -> None:
        self.data += chunk

    def close(self) -> None:
        pass


async def receive_small_body(request: Request, *, limit: int) -> bytes:
    """A small body (an import request's JSON) in memory, refused past `limit` bytes."""
    sink = _MemorySink()
    await receive_file(request, sink=sink, budget=ByteBudget(limit), drain_limit=0)
    return bytes(sink.data)
