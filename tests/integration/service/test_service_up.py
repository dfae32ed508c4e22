"""`lorafold up` for real (Redis, API, a worker, as child processes): one stack per data dir,
a taken port said plainly and followed by the client, the record removed on a clean stop.
Its default port is replaced by one the test holds, so nothing here touches port 8000."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lorafold.cli import main
from lorafold.cli.service_cmd import hold_data_dir
from lorafold.servers.process import ManagedProcess, free_port
from lorafold.settings import STACK_FILE, ClientSettings
from tests.up_process import UpProcess, lorafold_argv, start_up, with_default_port


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """The stack's default port, taken (something listens on it) for the whole module."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, taken_port: int) -> Iterator[UpProcess]:
    stack = start_up(tmp_path_factory.mktemp("up"), argv=with_default_port(taken_port))
    try:
        yield stack
    finally:
        stack.stop()


def record(stack: UpProcess) -> dict[str, Any]:
    value: dict[str, Any] = json.loads((stack.data_dir / STACK_FILE).read_text())
    return value


def test_a_taken_port_is_said_and_the_client_reaches_the_actual_url(
        up: UpProcess, taken_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    assert up.url != f"http://127.0.0.1:{taken_port}"
    assert f"port {taken_port} is taken; serving on {up.url}\n" in up.output()
    assert record(up) == {"url": up.url, "pid": up.pid}
    monkeypatch.chdir(up.cwd)  # the README's second terminal, in the same directory
    assert ClientSettings().url == up.url
    assert main(["client", "list"]) == 0  # URL from stack.json, key from api_keys.json


def test_a_second_up_on_the_same_data_dir_refuses_and_names_the_first(
        up: UpProcess, tmp_path: Path) -> None:
    second = ManagedProcess(name="second up", cwd=up.cwd, log_path=tmp_path / "second.log",
                            argv=[*lorafold_argv(), "up", "--port", str(free_port())]).start()
    assert second.process is not None
    try:
        code = second.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("a second `lorafold up` started on the same data dir")
    finally:
        second.stop(timeout=60)  # a no-op once it has exited
    said = (tmp_path / "second.log").read_text()
    assert code != 0, said
    assert "data_dir_in_use" in said and f"(pid {up.pid}, {up.url})" in said, said
    assert up.process.alive() and record(up) == {"url": up.url, "pid": up.pid}
    assert httpx.get(f"{up.url}/healthz", timeout=10).status_code == 200


def test_a_clean_stop_removes_the_record_and_frees_the_data_dir(tmp_path: Path) -> None:
    stack = start_up(tmp_path, "--port", str(free_port()))
    assert (stack.data_dir / STACK_FILE).exists()
    assert stack.stop() == 0
    assert not (stack.data_dir / STACK_FILE).exists()
    assert stack.output().rstrip().endswith("stopped.")
    with hold_data_dir(stack.data_dir):  # a next `up` may take it
        pass
