"""`lorafold unlearn`: remove constituents from a merge, negate an adapter, or (with a base
model and data) run LoRA unlearning — offline, the same code the service runs."""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafold.adapters.reader import LoraAdapter, open_adapter
from lorafold.errors import InvalidRequest
from lorafold.unlearn.adapter_ops import negate_adapter, remove_constituents


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


def _summary(result_lineage: Mapping[str, Any], out: Path) -> None:
    print(f"wrote {out}")
    print(json.dumps({k: result_lineage[k] for k in ("kind", "parameters", "inputs")
                      if k in result_lineage}, indent=2))


def run_remove(args: argparse.Namespace) -> int:
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


def run_negate(args: argparse.Namespace) -> int:
    result = negate_adapter(args.target, args.forget, args.out, strength=args.strength,
                            rank=args.rank, device=args.device)
    _summary(result.lineage, result.out_dir)
    return 0
