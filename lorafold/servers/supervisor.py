"""Keep a set of child servers running: restart what dies, say so, give up eventually.

`lorafold up` runs Redis, SeaweedFS and the API as children (its workers have their own
pool). A child that exits is restarted after a backoff that grows with each restart
(1, 2, 5, 10, 30 s); a child that dies more than `max_restarts` times without staying up
for `stable_after_s` in between is given up on: `check` raises, and `up` stops everything
rather than serve half a stack. Waiting happens between `check` calls, so one child's
backoff never delays noticing another's death. Each restart is said through `say` (the
console, for `up`), with the exit code and where the log is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from lorafold.errors import LorafoldError
from lorafold.servers.process import ManagedProcess

logger = logging.getLogger(__name__)

BACKOFF_S: Sequence[float] = (1.0, 2.0, 5.0, 10.0, 30.0)
MAX_RESTARTS = 5
STABLE_AFTER_S = 300.0


class Server(Protocol):
    """What a supervised child is: its process, and how to stop it."""

    @property
    def process(self) -> ManagedProcess: ...

    def stop(self) -> None: ...


@dataclass
class ProcessServer:
    """A bare `ManagedProcess` (the API) as a supervised server."""

    process: ManagedProcess

    def stop(self) -> None:
        self.process.stop()


@dataclass
class _Child:
    name: str
    server: Server
    restart: Callable[[], Server]
    restarts: int = 0
    started_at: float = 0.0
    retry_at: float | None = None


class Supervisor:
    """Children in start order; `check()` often (it never blocks), `stop()` at the end."""

    def __init__(self, *, say: Callable[[str], None] = logger.warning,
                 backoff_s: Sequence[float] = BACKOFF_S, max_restarts: int = MAX_RESTARTS,
                 stable_after_s: float = STABLE_AFTER_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._say = say
        self._backoff_s = backoff_s
        self._max_restarts = max_restarts
        self._stable_after_s = stable_after_s
        self._clock = clock
        self._children: list[_Child] = []

    def add(self, name: str, server: Server, restart: Callable[[], Server]) -> None:
        self._children.append(_Child(name, server, restart, started_at=self._clock()))

    def server(self, name: str) -> Server:
        return next(c.server for c in self._children if c.name == name)

    def check(self) -> None:
        """Schedule a restart of each child that died, and run those that are due."""
        now = self._clock()
        for child in self._children:
            if child.retry_at is None:
                if child.server.process.alive():
                    if child.restarts and now - child.started_at >= self._stable_after_s:
                        child.restarts = 0  # up long enough: its earlier deaths are forgiven
                    continue
                self._schedule(child, now, f"exited with code {_exit_code(child.server)}")
            elif now >= child.retry_at:
                self._restart(child, now)

    def _schedule(self, child: _Child, now: float, why: str) -> None:
        if child.restarts >= self._max_restarts:
            raise LorafoldError(f"{child.name} {why} after {child.restarts} restarts; giving "
                                "up (see its log)", code="child_failed", child=child.name)
        delay = self._backoff_s[min(child.restarts, len(self._backoff_s) - 1)]
        self._say(f"{child.name} (pid {child.server.process.pid}) {why}; restarting in "
                  f"{delay:.0f}s (restart {child.restarts + 1} of at most "
                  f"{self._max_restarts})")
        child.retry_at = now + delay

    def _restart(self, child: _Child, now: float) -> None:
        child.restarts += 1
        child.retry_at = None
        try:
            child.server = child.restart()
        except LorafoldError as e:
            self._schedule(child, now, f"did not restart ({e.code}: {e.message})")
            return
        child.started_at = self._clock()
        self._say(f"{child.name} restarted (pid {child.server.process.pid})")

    def stop(self) -> None:
        """Stop every child, last started first."""
        for child in reversed(self._children):
            try:
                child.server.stop()
            except Exception:  # stopping the rest matters more
                logger.warning("could not stop %s", child.name, exc_info=True)


def _exit_code(server: Server) -> str:
    popen = server.process.process
    return str(popen.returncode) if popen is not None else "?"
