"""What the CLI prints around its results: defaults in `--help`, readable progress labels,
and nothing but an exit status when the reader of stdout goes away (`... | head`)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafold.cli import BROKEN_PIPE_EXIT, main
from lorafold.cli.client_cmd import wait_with_bar
from lorafold.client import LorafoldClient
from lorafold.synthetic import write_random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.mlp.up_proj": (20, 12)}


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def option_help(text: str, option: str) -> str:
    """The help of one option, its continuation lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(option))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if line.strip().startswith("-") or not line.startswith(" " * 10):
            break
        block.append(line)
    return " ".join(" ".join(block).split())


def test_help_shows_every_default(capsys: pytest.CaptureFixture[str]) -> None:
    merge = help_text(["merge"], capsys)
    assert option_help(merge, "--device").endswith("(default: auto)")
    assert option_help(merge, "--method").endswith("(default ctm)")  # stated once, not twice
    assert "(default: None)" not in merge and "(default: False)" not in merge
    client = help_text(["client", "merge"], capsys)
    assert option_help(client, "--timeout").endswith("(default: 3600.0)")
    assert option_help(help_text(["client", "jobs"], capsys), "--limit").endswith(
        "(default: 50)")
    assert option_help(help_text(["demo"], capsys), "--layers").endswith("(default: 2)")


def test_merge_progress_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    inputs = [str(write_random_adapter(tmp_path / f"a{i}", SHAPES, rank=3, seed=i))
              for i in range(2)]
    assert main(["merge", *inputs, "--rank", "4", "--out", str(tmp_path / "m")]) == 0
    frames = capsys.readouterr().err.split("\r")
    assert not [f for f in frames if ": :" in f or f.startswith(":")]
    assert any(f.startswith("merge  50%|") for f in frames)
    assert frames[-1].startswith("write 100%|")


def test_wait_progress_labels(capsys: pytest.CaptureFixture[str]) -> None:
    states = iter([("running", "merge", 0.5), ("succeeded", "done", 1.0)])

    def answer(request: httpx.Request) -> httpx.Response:
        status, stage, fraction = next(states)
        return httpx.Response(200, json={"id": "job_1", "status": status,
                                         "progress": {"stage": stage, "fraction": fraction}})

    with LorafoldClient("http://test", "k", transport=httpx.MockTransport(answer)) as client:
        assert wait_with_bar(client, "job_1", timeout=10)["status"] == "succeeded"
    frames = capsys.readouterr().err.split("\r")
    assert any(f.startswith("merge  50%|") for f in frames)
    assert frames[-1].startswith("succeeded 100%|")


class _Adapters(BaseHTTPRequestHandler):
    """GET /v1/adapters: far more JSON than a pipe holds."""

    body = json.dumps({"data": [{"id": f"ad_{i:032d}", "name": f"adapter {i}"}
                                for i in range(20_000)], "count": 20_000}).encode()

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def adapters_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Adapters)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_closed_stdout_ends_the_cli_quietly(adapters_url: str) -> None:
    """`lorafold client list | head -1`: no BrokenPipeError traceback, SIGPIPE's status."""
    proc = subprocess.Popen([sys.executable, "-m", "lorafold", "client", "--url", adapters_url,
                             "--api-key", "k", "list"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == b"["
    proc.stdout.close()  # what `head -1` does after its line
    stderr = proc.communicate(timeout=120)[1].decode()
    assert proc.returncode == BROKEN_PIPE_EXIT, stderr
    assert stderr == ""
