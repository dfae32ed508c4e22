"""Merging LoRA adapters: Compress-then-Merge, baselines, rules, reports.

The names below are loaded on first use, so that importing a light submodule
(`lorafold.merge.options`: the defaults the client and every `--help` read) does not load
torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lorafold.merge.api import MergeResult, merge_adapters
    from lorafold.merge.methods import METHODS, MethodInput, resolve_method
    from lorafold.merge.plan import MergePlan, MergeRequest, check_request, plan_merge
    from lorafold.merge.rules import RULES, resolve_rule

# Where each public name is defined.
_SOURCES = {
    "MergeResult": "api", "merge_adapters": "api",
    "METHODS": "methods", "MethodInput": "methods", "resolve_method": "methods",
    "MergePlan": "plan", "MergeRequest": "plan", "check_request": "plan",
    "plan_merge": "plan",
    "RULES": "rules", "resolve_rule": "rules",
}

__all__ = [
    "METHODS",
    "RULES",
    "MergePlan",
    "MergeRequest",
    "MergeResult",
    "MethodInput",
    "check_request",
    "merge_adapters",
    "plan_merge",
    "resolve_method",
    "resolve_rule",
]


def __getattr__(name: str) -> Any:
    try:
        module = _SOURCES[name]
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
