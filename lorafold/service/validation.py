"""Validating an uploaded adapter, optionally in a separate process.

`inspect_adapter` opens the adapter with the core library, reads every tensor
(`validate()`: NaN/Inf, readability) and returns its summary; an archive is unpacked
into `dest` so the caller can publish the files. The API runs it in a small pool of
validator processes (`ProcessValidator`): reading a 200 MB adapter maps 200 MB of file
pages into the reading process, and a hostile file should crash a validator, not the API.
Workers and tests use `InProcessValidator`.
"""

from __future__ import annotations

import logging
import multiprocessing
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lorafold import errors
from lorafold.adapters import open_adapter
from lorafold.adapters.source import CONFIG_NAME, WEIGHTS_NAME
from lorafold.errors import InvalidAdapter, LorafoldError

logger = logging.getLogger(__name__)

_ERROR_CLASSES: dict[str, type[LorafoldError]] = {
    name: cls for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, LorafoldError)}


@dataclass(frozen=True)
class Inspection:
    """A valid adapter: its summary, and the directory holding its PEFT files."""

    summary: dict[str, Any]
    directory: Path


def inspect_adapter(source: str, dest: str | None = None) -> dict[str, Any]:
    """Validate the adapter at `source` (dir or archive). Runs in the validator process, so
    it returns plain data: {"summary", "directory"} or {"error": {type, code, message}}."""
    try:
        with open_adapter(Path(source)) as adapter:
            adapter.validate()
            summary = adapter.summary()
            directory = adapter.directory
            if dest is not None and directory != Path(dest):
                target = Path(dest)
                target.mkdir(parents=True, exist_ok=True)
                for name in (CONFIG_NAME, WEIGHTS_NAME):
                    shutil.copyfile(directory / name, target / name)
                directory = target
        return {"summary": summary, "directory": str(directory)}
    except LorafoldError as e:
        return {"error": {"type": type(e).__name__, "code": e.code, "message": e.message}}
    except Exception as e:  # a file no check foresaw: the upload's fault, never a 500
        logger.exception("validating %s raised %s", source, type(e).__name__)
        return {"error": {"type": "InvalidAdapter", "code": "unreadable_adapter",
                          "message": f"the adapter could not be read ({type(e).__name__}: "
                                     f"{str(e)[:200]})"}}


def _result(reply: dict[str, Any]) -> Inspection:
    if "error" in reply:
        error = reply["error"]
        cls = _ERROR_CLASSES.get(error["type"], LorafoldError)
        raise cls(error["message"], code=error["code"])
    return Inspection(summary=reply["summary"], directory=Path(reply["directory"]))


class Validator(Protocol):
    def inspect(self, source: Path, *, dest: Path | None = None) -> Inspection: ...

    def close(self) -> None: ...


class InProcessValidator:
    def inspect(self, source: Path, *, dest: Path | None = None) -> Inspection:
        return _result(inspect_adapter(str(source), str(dest) if dest else None))

    def close(self) -> None:
        pass


def _warm() -> None:
    """Runs in each validator process at start: imports torch now rather than on the first
    upload, and keeps it to one thread — validation is memory-bound, and OpenMP threads
    spinning against the API and the workers on a small machine make it many times slower."""
    import torch

    torch.set_num_threads(1)


class ProcessValidator:
    """A pool of `processes` spawned validator processes, rebuilt if one crashes.

    Each inspection has a budget of `timeout_s` seconds (from its submission): past it the
    pool's processes are killed, so a hostile adapter cannot hold a validator, and the
    upload is refused (422 validation_timeout). Inspections that were in the killed pool,
    or in one that crashed, run once more on a fresh pool; a second crash is the adapter's
    (422 validator_crashed). `task` is what the processes run (tests pass a slow one).
    """

    def __init__(self, processes: int = 1, *, timeout_s: float = 600.0,
                 task: Callable[[str, str | None], dict[str, Any]] = inspect_adapter) -> None:
        self._processes = processes
        self._timeout_s = timeout_s
        self._task = task
        self._lock = threading.Lock()
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn, not fork: the API process has threads and an event loop.
                self._pool = ProcessPoolExecutor(
                    max_workers=self._processes, initializer=_warm,
                    mp_context=multiprocessing.get_context("spawn"))
            return self._pool

    def start(self) -> None:
        """Start the processes now (API start-up) rather than on the first upload."""
        pool = self._get_pool()
        for future in [pool.submit(_warm) for _ in range(self._processes)]:
            future.result(timeout=self._timeout_s)

    def inspect(self, source: Path, *, dest: Path | None = None) -> Inspection:
        args = (str(source), str(dest) if dest else None)
        try:
            reply = self._run(*args)
        except BrokenProcessPool:
            logger.warning("validating %s again on a fresh validator pool", source)
            try:
                reply = self._run(*args)
            except BrokenProcessPool as e:
                raise InvalidAdapter("the adapter crashed the validator process",
                                     code="validator_crashed") from e
        return _result(reply)

    def _run(self, source: str, dest: str | None) -> dict[str, Any]:
        pool = self._get_pool()
        try:
            future = pool.submit(self._task, source, dest)
        except RuntimeError as e:  # shut down by another thread's overrun meanwhile
            raise BrokenProcessPool(str(e)) from e
        try:
            reply: dict[str, Any] = future.result(timeout=self._timeout_s)
        except FutureTimeout as e:
            logger.error("validating %s overran its budget of %g s; killing the validator "
                         "processes", source, self._timeout_s)
            self._discard(pool, kill=True)
            raise InvalidAdapter(f"validating the adapter took longer than {self._timeout_s:g} "
                                 "s; it was stopped", code="validation_timeout") from e
        except (BrokenProcessPool, CancelledError) as e:
            logger.error("the validator pool broke while reading %s; restarting it", source)
            self._discard(pool, kill=False)
            raise BrokenProcessPool(str(e)) from e
        return reply

    def _discard(self, pool: ProcessPoolExecutor, *, kill: bool) -> None:
        """Stop using `pool` (the next inspection builds a new one); `kill` its processes."""
        with self._lock:
            if self._pool is pool:
                self._pool = None
        if kill:  # no public way before Python 3.14 (ProcessPoolExecutor.kill_workers)
            for process in list((pool._processes or {}).values()):
                process.kill()
        pool.shutdown(wait=False)  # its queued inspections fail as broken: run again

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
