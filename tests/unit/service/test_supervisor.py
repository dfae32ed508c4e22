"""The supervisor of `lorafold up`'s children: a dead child is restarted after a growing
backoff, said on the console; one that keeps dying is given up on; one that stays up is
forgiven its earlier deaths; a failed restart counts as one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from lorafold.errors import LorafoldError
from lorafold.servers.supervisor import Supervisor


@dataclass
class FakePopen:
    returncode: int | None = None


@dataclass
class FakeProcess:
    pid: int
    process: FakePopen = field(default_factory=FakePopen)

    def alive(self) -> bool:
        return self.process.returncode is None


@dataclass
class FakeServer:
    process: FakeProcess
    stopped: bool = False

    def stop(self) -> None:
        self.stopped = True

    def die(self, code: int = -9) -> None:
        self.process.process.returncode = code


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make(clock: Clock, said: list[str], **kwargs: Any) -> tuple[Supervisor, list[FakeServer]]:
    started: list[FakeServer] = [FakeServer(FakeProcess(pid=100))]

    def restart() -> Any:
        started.append(FakeServer(FakeProcess(pid=100 + len(started))))
        return started[-1]

    supervisor = Supervisor(say=said.append, clock=clock, backoff_s=(1, 2, 5),
                            max_restarts=3, stable_after_s=60, **kwargs)
    supervisor.add("redis", started[0], restart)  # type: ignore[arg-type]
    return supervisor, started


def test_a_dead_child_is_restarted_after_its_backoff_and_it_is_said(clock: Clock) -> None:
    said: list[str] = []
    supervisor, started = make(clock, said)
    supervisor.check()
    assert said == []
    started[0].die()
    supervisor.check()
    assert said == ["redis (pid 100) exited with code -9; restarting in 1s "
                    "(restart 1 of at most 3)"]
    supervisor.check()  # not yet due
    assert len(started) == 1
    clock.now = 1.0
    supervisor.check()
    assert len(started) == 2 and said[-1] == "redis restarted (pid 101)"
    started[1].die()
    supervisor.check()
    assert "restarting in 2s (restart 2 of at most 3)" in said[-1]


def crash_and_restart(supervisor: Supervisor, started: list[FakeServer], clock: Clock, *,
                      times: int) -> None:
    """The newest child dies `times` times, each restarted once its backoff has passed."""
    for _ in range(times):
        started[-1].die()
        supervisor.check()
        clock.now += 10
        supervisor.check()


def test_a_child_that_keeps_dying_is_given_up_on(clock: Clock) -> None:
    said: list[str] = []
    supervisor, started = make(clock, said)
    crash_and_restart(supervisor, started, clock, times=3)
    started[-1].die()
    with pytest.raises(LorafoldError) as gave_up:
        supervisor.check()
    assert gave_up.value.code == "child_failed" and "after 3 restarts" in gave_up.value.message
    supervisor.stop()
    assert started[-1].stopped


def test_a_child_that_stays_up_is_forgiven(clock: Clock) -> None:
    said: list[str] = []
    supervisor, started = make(clock, said)
    crash_and_restart(supervisor, started, clock, times=3)
    clock.now += 60  # up for a while
    supervisor.check()
    started[-1].die()
    supervisor.check()
    assert "restarting in 1s (restart 1 of at most 3)" in said[-1]


def test_a_failed_restart_counts_and_is_said(clock: Clock) -> None:
    said: list[str] = []
    server = FakeServer(FakeProcess(pid=7))

    def refuse() -> Any:
        raise LorafoldError("port 6379 is taken", code="redis_start_failed")

    supervisor = Supervisor(say=said.append, clock=clock, backoff_s=(1,), max_restarts=2)
    supervisor.add("redis", server, refuse)  # type: ignore[arg-type]
    server.die(1)
    supervisor.check()
    clock.now = 1
    supervisor.check()
    assert "did not restart (redis_start_failed: port 6379 is taken); restarting in 1s " \
           "(restart 2 of at most 2)" in said[-1]
    clock.now = 2
    with pytest.raises(LorafoldError, match="giving up"):
        supervisor.check()
