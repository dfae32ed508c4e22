"""Merging LoRA adapters: Compress-then-Merge, baselines, rules, reports."""

from lorafold.merge.api import MergeResult, merge_adapters
from lorafold.merge.methods import METHODS, MethodInput, resolve_method
from lorafold.merge.plan import MergePlan, MergeRequest, check_request, plan_merge
from lorafold.merge.rules import RULES, resolve_rule

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
