"""`lorafold merge --tune-data ...`: the options of a tuned merge and its run.

Imported by `lorafold merge`'s parser, so only torch-free modules at the top; the search
itself is imported when a tuned merge runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafold.tune.options import (
    DEFAULT_BUDGET,
    DEFAULT_TIME_LIMIT_S,
    TUNE_PARAMS,
    TuneRequest,
    parse_params,
)

if TYPE_CHECKING:
    from lorafold.merge.plan import MergeRequest
    from lorafold.tune.api import TunedMerge


def add_tune_options(p: argparse.ArgumentParser, *, service: bool = False) -> None:
    """The tuning options of `lorafold merge` and, with `service`, of `lorafold client
    merge` (there --tune-data takes data set ids or JSONL files to upload, and the base
    model is a name the service resolves)."""
    group = p.add_argument_group("tuning (docs/tuning.md)")
    where = ("data set id, or a JSONL file uploaded first" if service
             else "validation set (JSONL, the unlearning data format)")
    group.add_argument("--tune-data", action="append", metavar="VAL.jsonl",
                       help=f"{where}: once for all inputs or once per input; makes the "
                            "merge a tuned one")
    group.add_argument("--base-model", metavar="NAME" if service else "DIR|NAME",
                       help="tuning: the base model (default: the inputs' own)" if service
                       else "tuning: the base model (a local directory, or a name found in "
                            "the Hugging Face cache)")
    group.add_argument("--tune", type=int, default=None if service else DEFAULT_BUDGET,
                       metavar="BUDGET",
                       help="tuning: validation passes allowed (candidates and weight "
                            f"steps; default {DEFAULT_BUDGET})")
    group.add_argument("--tune-params", metavar="P,...",
                       help=f"tuning: parameters to tune, from {', '.join(TUNE_PARAMS)} "
                            "(default lambda, plus beta for ctm and the rule's knobs)")
    group.add_argument("--tune-time-limit", type=float,
                       default=None if service else DEFAULT_TIME_LIMIT_S, metavar="S",
                       help=f"tuning: stop searching after S seconds (default "
                            f"{DEFAULT_TIME_LIMIT_S:g})")


def _base_model_dir(text: str | None) -> Path:
    from lorafold.errors import InvalidRequest
    from lorafold.unlearn.base_models import resolve_base_model

    if not text:
        raise InvalidRequest("a tuned merge needs --base-model", code="base_model_required")
    path = Path(text)
    return path if path.is_dir() else resolve_base_model(text)


def run_tuned_merge(args: argparse.Namespace, request: MergeRequest,
                    progress: Callable[[str, float], None]) -> TunedMerge:
    from lorafold.tune.api import tune_merge
    from lorafold.unlearn.datasets import parse_jsonl

    base_dir = _base_model_dir(args.base_model)
    datasets = []
    for path in args.tune_data:
        with Path(path).open("rb") as handle:
            datasets.append(parse_jsonl(handle, name=Path(path).stem))
    tune = TuneRequest(params=parse_params(args.tune_params), budget=args.tune,
                       time_limit_s=args.tune_time_limit)
    return tune_merge(args.inputs, args.out, request, tune, datasets=datasets,
                      base_model_dir=base_dir, device=args.device, progress=progress)


def _value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{w:.3g}" for w in value) + "]"
    return f"{value:.4g}"


def tuning_lines(tuning: dict[str, Any]) -> list[str]:
    """The tuning summary `lorafold merge` prints."""
    untuned, written = tuning["untuned"], tuning["written"]
    chosen = ", ".join(f"{k}={_value(v)}" for k, v in tuning["chosen"].items())
    return [f"tuned {', '.join(tuning['params'])}: {tuning['candidates_evaluated']} "
            f"candidates, {tuning['weight_steps']} weight steps, {tuning['wall_time_s']}s "
            f"({tuning['stopped']})",
            f"chosen: {chosen or 'the untuned values'}",
            f"validation loss {untuned['loss']:.4f} untuned -> {written['loss']:.4f} "
            f"(token accuracy {untuned['accuracy']:.3f} -> {written['accuracy']:.3f})"]
