"""Where fetched bytes go, and the one loop that moves them there under the byte budget
and the deadline (every fetcher uses it, so every source is bounded the same way)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Protocol

from lorafold.budget import Budget
from lorafold.fetch.policy import Deadline


class Writer(Protocol):
    def write(self, chunk: bytes) -> None: ...


class Sink(Protocol):
    """The upload spool as fetchers see it: one archive, or the files of a directory."""

    def archive(self, name: str) -> Writer: ...

    def file(self, name: str) -> Writer | None:
        """Where the directory's file `name` goes; None for a file that is not kept."""
        ...


def pour(chunks: Iterable[bytes], writer: Writer | None, *, budget: Budget,
         deadline: Deadline) -> None:
    """Write `chunks` (counted against `budget` before each write) until they end or the
    deadline passes. With no writer the bytes are still counted, then dropped."""
    for chunk in chunks:
        deadline.check()
        budget.add(len(chunk))
        if writer is not None:
            writer.write(chunk)
    deadline.check()


def refuse_declared(size: int, budget: Budget) -> None:
    """Refuse a size the source declares (Content-Length, an object's size) that would
    overrun `budget`, before any of it is read; the budget itself is not charged."""
    copy.copy(budget).add(size)
