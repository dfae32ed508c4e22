"""`lorafold unlearn`: remove constituents from a merge, negate an adapter, or (with a base
model and data) run LoRA unlearning — offline, the same code the service runs.

The unlearning code (torch, transformers) is imported by the handlers, not for `--help`."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafold.cli.hyperparams_option import parse_hyperparams
from lorafold.errors import InvalidRequest

if TYPE_CHECKING:
    from lorafold.adapters.reader import LoraAdapter
    from lorafold.unlearn.datasets import TextDataset


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("unlearn", help="remove a constituent, negate an adapter, or unlearn data")
    modes = p.add_subparsers(dest="mode", required=True, metavar="MODE")

    rm = modes.add_parser("remove", help="exactly remove constituents from a lorafold merge")
    rm.add_argument("merged", type=Path, help="adapter produced by `lorafold merge`")
    rm.add_argument("--remove", action="append", required=True, metavar="LABEL_OR_SHA256",
                    help="constituent to drop (its label in the lineage, or its sha256)")
    rm.add_argument("--inputs", nargs="+", type=Path, required=True,
                    help="the original input adapters (matched to the lineage by sha256)")
    rm.add_argument("--out", type=Path, required=True)
    rm.add_argument("--device", default="auto")
    rm.set_defaults(handler=run_remove)

    neg = modes.add_parser("negate", help="target − λ·forget, re-compressed with CtM")
    neg.add_argument("target", type=Path)
    neg.add_argument("forget", type=Path)
    neg.add_argument("--strength", type=float, default=1.0, help="λ (default 1)")
    neg.add_argument("--rank", type=int, help="output rank (default: the target's r)")
    neg.add_argument("--out", type=Path, required=True)
    neg.add_argument("--device", default="auto")
    neg.set_defaults(handler=run_negate)

    data = modes.add_parser("data", help="unlearn a forget set from an adapter (needs its base)")
    data.add_argument("--base-model", required=True,
                      help="a local model directory, or a name found under --model-dir or in the "
                           "local Hugging Face cache (never downloaded)")
    data.add_argument("--model-dir", type=Path, action="append", default=[],
                      help="root directory holding base models as <root>/<name> (repeatable)")
    data.add_argument("--adapter", type=Path, required=True, help="the adapter to unlearn from")
    data.add_argument("--forget", type=Path, required=True,
                      help="JSONL: {text} or {prompt, completion} per line")
    data.add_argument("--retain", type=Path, help="JSONL of what must be kept")
    data.add_argument("--holdout", type=Path,
                      help="JSONL never trained on: enables gold-free stopping and the MIA AUC")
    # Not argparse `choices` (the registry imports torch): a wrong name is refused, with
    # the list, before any model is loaded.
    data.add_argument("--method", default="feature_alignment",
                      help="see docs/unlearning.md; default feature_alignment: the unlearning "
                           "benchmark's best on retain and forget-loss distribution "
                           "(BENCHMARKS.md)")
    data.add_argument("--max-steps", type=int, help="override the method's default step budget")
    data.add_argument("--lr", type=float, help="override the method's default learning rate")
    data.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE",
                      help="any hyperparameter, the value in JSON (repeatable), e.g. "
                           "--hp output_rank=8 --hp quantization_probe=true "
                           "--hp layers=[1,2]; see docs/unlearning.md")
    data.add_argument("--out", type=Path, required=True)
    data.add_argument("--device", default="auto")
    data.set_defaults(handler=run_data)


def _summary(result_lineage: Mapping[str, Any], out: Path) -> None:
    print(f"wrote {out}")
    print(json.dumps({k: result_lineage[k] for k in ("kind", "parameters", "inputs")
                      if k in result_lineage}, indent=2))


def run_remove(args: argparse.Namespace) -> int:
    from lorafold.adapters.reader import open_adapter
    from lorafold.unlearn.adapter_ops import remove_constituents

    with contextlib.ExitStack() as stack:
        by_sha: dict[str, LoraAdapter] = {}
        for path in args.inputs:
            adapter = stack.enter_context(open_adapter(path, label=str(path)))
            by_sha[adapter.sha256] = adapter

        def resolve(entry: Mapping[str, Any]) -> LoraAdapter:
            try:
                adapter = by_sha[entry["sha256"]]
            except KeyError:
                raise InvalidRequest(f"constituent {entry['label']} (sha256 {entry['sha256']})"
                                     " is not among --inputs", code="constituent_missing") from None
            adapter.label = entry["label"]
            return adapter

        result = remove_constituents(args.merged, args.remove, args.out, resolve=resolve,
                                     device=args.device)
    _summary(result.lineage, result.out_dir)
    return 0


def _dataset(path: Path | None) -> TextDataset | None:
    from lorafold.unlearn.datasets import parse_jsonl

    if path is None:
        return None
    with path.open("rb") as f:
        return parse_jsonl(f, name=path.name)


def run_data(args: argparse.Namespace) -> int:
    from lorafold.unlearn.base_models import resolve_base_model
    from lorafold.unlearn.objectives import resolve_hyperparams
    from lorafold.unlearn.run import unlearn

    base = args.base_model
    base_dir = Path(base) if Path(base).is_dir() else resolve_base_model(
        base, model_dirs=args.model_dir)
    overrides = parse_hyperparams(args.hp) or {}
    overrides.update({k: v for k, v in (("max_steps", args.max_steps), ("lr", args.lr))
                      if v is not None})
    forget = _dataset(args.forget)
    assert forget is not None
    result = unlearn(base_model_dir=base_dir, adapter_dir=args.adapter, forget=forget,
                     retain=_dataset(args.retain), holdout=_dataset(args.holdout),
                     method=args.method, out_dir=args.out,
                     hyperparams=resolve_hyperparams(args.method, overrides or None),
                     device=args.device)
    print(f"wrote {result.out_dir}")
    print(json.dumps(result.metrics, indent=2, default=str))
    return 0


def run_negate(args: argparse.Namespace) -> int:
    from lorafold.unlearn.adapter_ops import negate_adapter

    result = negate_adapter(args.target, args.forget, args.out, strength=args.strength,
                            rank=args.rank, device=args.device)
    _summary(result.lineage, result.out_dir)
    return 0
