"""A loopback HTTP(S) origin for import tests: routes of canned answers, hits counted.

Each route answers with a status, headers and a body; a body may be a callable that
writes to the socket itself (to dribble bytes slowly or send more than announced). The
server binds one loopback address on a free port and is stopped by the fixture.
"""

from __future__ import annotations

import ssl
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import BinaryIO

Writer = Callable[[BinaryIO], None]


@dataclass
class Route:
    status: int = 200
    body: bytes | Writer = b""
    headers: dict[str, str] = field(default_factory=dict)
    length: bool = True  # send Content-Length for a bytes body


class Origin:
    def __init__(self, host: str = "127.0.0.1", ssl_context: ssl.SSLContext | None = None):
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        origin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                origin.hits[path] += 1
                route = origin.routes.get(path, Route(404, b"no such path"))
                self.send_response(route.status)
                for name, value in route.headers.items():
                    self.send_header(name, value)
                if isinstance(route.body, bytes) and route.length:
                    self.send_header("Content-Length", str(len(route.body)))
                else:
                    self.send_header("Connection", "close")
                self.end_headers()
                try:
                    if isinstance(route.body, bytes):
                        self.wfile.write(route.body)
                    else:
                        route.body(self.wfile)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    pass  # the client stopped reading: that is what some tests check
                self.close_connection = not (isinstance(route.body, bytes) and route.length)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        if ssl_context is not None:
            self.server.socket = ssl_context.wrap_socket(self.server.socket, server_side=True)
        self.host = host
        self.port = self.server.server_address[1]
        self.scheme = "https" if ssl_context is not None else "http"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def url(self, path: str, host: str | None = None) -> str:
        return f"{self.scheme}://{host or self.host}:{self.port}{path}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=5)
