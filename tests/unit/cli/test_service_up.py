"""`lorafold up`'s data-dir lock, its stack record and port choice, and how the client
finds the URL (flag/env > the running stack's record > the default); no servers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lorafold.cli import service_cmd
from lorafold.cli.service_cmd import (
    LOCK_FILE,
    choose_port,
    hold_data_dir,
    write_stack_record,
)
from lorafold.errors import LorafoldError
from lorafold.servers.process import free_port, port_is_free
from lorafold.settings import DEFAULT_URL, LOCAL_DATA_DIR, STACK_FILE, ClientSettings


@pytest.fixture
def listening() -> Iterator[int]:
    """A port something listens on (127.0.0.1), for as long as the test runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_client_url_comes_from_the_flag_or_env_then_the_stack_then_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert ClientSettings().url == DEFAULT_URL  # nothing running here
    LOCAL_DATA_DIR.mkdir()
    write_stack_record(LOCAL_DATA_DIR, "http://127.0.0.1:8123")  # a stack (us) running here
    assert ClientSettings().url == "http://127.0.0.1:8123"
    assert ClientSettings(url="http://127.0.0.1:1").url == "http://127.0.0.1:1"
    monkeypatch.setenv("LORAFOLD_URL", "http://127.0.0.1:2")
    assert ClientSettings().url == "http://127.0.0.1:2"


def test_a_record_left_by_a_dead_stack_is_ignored() -> None:
    LOCAL_DATA_DIR.mkdir()
    (LOCAL_DATA_DIR / STACK_FILE).write_text(json.dumps({"url": "http://127.0.0.1:8123",
                                                         "pid": dead_pid()}))
    assert ClientSettings().url == DEFAULT_URL
    (LOCAL_DATA_DIR / STACK_FILE).write_text("{not json")
    assert ClientSettings().url == DEFAULT_URL


def test_a_second_holder_of_a_data_dir_is_refused_with_the_first_ones_pid_and_url(
        tmp_path: Path) -> None:
    with hold_data_dir(tmp_path):
        assert (tmp_path / LOCK_FILE).read_text().strip() == str(os.getpid())
        # flock: another open file description conflicts, even in the same process
        with pytest.raises(LorafoldError, match=f"pid {os.getpid()}, still starting") as e, \
                hold_data_dir(tmp_path):
            pass
        assert e.value.code == "data_dir_in_use"
        write_stack_record(tmp_path, "http://127.0.0.1:8123")
        with pytest.raises(LorafoldError, match=f"pid {os.getpid()}, http://127.0.0.1:8123"), \
                hold_data_dir(tmp_path):
            pass
    with hold_data_dir(tmp_path):  # released on exit
        pass


def test_a_taken_default_port_falls_back_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                       listening: int) -> None:
    monkeypatch.setattr(service_cmd, "DEFAULT_PORT", listening)
    port, said = choose_port(None, "127.0.0.1")
    assert port != listening and port_is_free(port)
    assert said == f"port {listening} is taken; serving on http://127.0.0.1:{port}"


def test_a_free_default_port_is_used_silently(monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    monkeypatch.setattr(service_cmd, "DEFAULT_PORT", port)
    assert choose_port(None, "127.0.0.1") == (port, None)


def test_a_taken_explicit_port_is_refused(listening: int) -> None:
    with pytest.raises(LorafoldError, match=f"port {listening} is taken") as e:
        choose_port(listening, "127.0.0.1")
    assert e.value.code == "port_taken"
