"""A byte budget: counts bytes as they stream and refuses the first one past the limit.

One class for every bound of this kind (an upload's request bytes, what an archive expands
to); each caller says which error a breach is.
"""

from __future__ import annotations

from collections.abc import Callable


class Budget:
    def __init__(self, limit: int, exceeded: Callable[[int], Exception]) -> None:
        self.limit = limit
        self.used = 0
        self._exceeded = exceeded

    def add(self, n: int) -> None:
        self.used += n
        if self.used > self.limit:
            raise self._exceeded(self.limit)
