"""Hermetic tests: no test sees the user's HOME, their LORAFOLD_* / AWS_* variables or
Hugging Face / XDG cache settings, or the working directory's `.lorafold/` (what
`lorafold up` leaves there: an API key, the URL of a running stack).

Two layers, because session- and package-scoped fixtures (the e2e stacks) are set up before
any function-scoped autouse fixture:
- at start-up (`pytest_configure`, before collection imports anything): those variables
  are removed from `os.environ`, and HOME and the XDG/HF directories point into a fresh
  temporary directory; a session fixture then moves the CWD into an empty directory, so
  session-scoped fixtures start their servers there;
- per test: a fresh empty CWD (not `tmp_path`, which tests expect to find empty), HOME
  reset, and whatever such variable a previous test left behind removed (monkeypatch, so
  a test's own `setenv` is undone after it).
Subprocesses inherit the scrubbed environment and, unless given a `cwd`, the sandbox CWD.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRUBBED_PREFIXES = ("LORAFOLD_", "AWS_")  # AWS_*: boto3 would read profiles, endpoints
SCRUBBED = frozenset({
    "HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE",
    "HF_DATASETS_CACHE", "HF_TOKEN", "HF_TOKEN_PATH", "HUGGING_FACE_HUB_TOKEN",
    "HF_ENDPOINT", "TORCH_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME",
})

_sandbox: Path | None = None


def _scrubbed(name: str) -> bool:
    return name.startswith(SCRUBBED_PREFIXES) or name in SCRUBBED


def _home_env(home: Path) -> dict[str, str]:
    return {"HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache"),
            "XDG_CONFIG_HOME": str(home / ".config"), "XDG_DATA_HOME": str(home / ".local"),
            "HF_HOME": str(home / ".cache" / "huggingface")}


def sandbox_home() -> Path:
    assert _sandbox is not None, "pytest_configure of tests/conftest.py has not run"
    return _sandbox / "home"


def pytest_configure(config: pytest.Config) -> None:
    global _sandbox
    _sandbox = Path(tempfile.mkdtemp(prefix="lorafold-tests-"))
    home = sandbox_home()
    home.mkdir()
    for name in [name for name in os.environ if _scrubbed(name)]:
        del os.environ[name]
    os.environ.update(_home_env(home))


def pytest_unconfigure(config: pytest.Config) -> None:
    if _sandbox is not None:
        shutil.rmtree(_sandbox, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _sandbox_cwd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An empty CWD for the whole session (session-scoped fixtures start servers in it)."""
    cwd = tmp_path_factory.mktemp("cwd-session")  # resolves basetemp before we chdir
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)
        yield cwd


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch: pytest.MonkeyPatch,
              tmp_path_factory: pytest.TempPathFactory) -> None:
    """Per test: a fresh empty CWD, the sandbox HOME, no LORAFOLD_* variables."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    for name in [name for name in os.environ if _scrubbed(name)]:
        monkeypatch.delenv(name)
    for name, value in _home_env(sandbox_home()).items():
        monkeypatch.setenv(name, value)
