"""`--hp KEY=VALUE`, shared by `lorafold unlearn data` and `lorafold client unlearn`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from lorafold.errors import InvalidRequest


def parse_hyperparams(pairs: Sequence[str]) -> dict[str, Any] | None:
    """KEY=VALUE pairs, each VALUE read as JSON (a bare word stays a string); None if none.

    The values are checked later, against the method's fields, by resolve_hyperparams.
    """
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise InvalidRequest(f"--hp {pair!r}: expected KEY=VALUE",
                                 code="invalid_hyperparameters")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values or None
