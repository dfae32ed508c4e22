"""`lorafold inspect`: what an adapter is, and whether lorafold accepts it.

The adapter code (and torch) is imported by `run`, not for `--help`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafold.errors import LorafoldError
from lorafold.merge.options import SERVING_TARGETS

if TYPE_CHECKING:
    from lorafold.adapters.serving import Preflight


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("inspect", help="show an adapter's config, modules and validation verdict")
    p.add_argument("adapter", type=Path, help="adapter dir or archive")
    p.add_argument("--modules", action="store_true", help="list every module")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--target", choices=SERVING_TARGETS,
                   help="also check that this serving engine will load it, exit 1 if not "
                        "(the rules: docs/serving.md)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lorafold.adapters import open_adapter
    from lorafold.adapters.serving import preflight

    verdict: Preflight | None = None
    try:
        with open_adapter(args.adapter) as adapter:
            adapter.validate()
            info = adapter.summary()
            info["valid"] = True
            modules = [{"name": m.name, "kind": m.kind, "rank": m.rank,
                        "shape": list(m.delta_shape), "scale": m.scale, "dtype": m.dtype}
                       for m in adapter.modules.values()]
            if args.target:
                verdict = preflight(adapter, args.target)
    except LorafoldError as e:
        if args.json:
            print(json.dumps({"valid": False, "error": e.to_dict()}, indent=2))
        else:
            print(f"INVALID  {e.code}: {e.message}", file=sys.stderr)
        return 2
    status = 0 if verdict is None or verdict.ok else 1
    if args.json:
        extra: dict[str, Any] = {"modules": modules} if args.modules else {}
        if verdict is not None:
            extra["preflight"] = verdict.to_dict()
        print(json.dumps({**info, **extra}, indent=2))
        return status
    print(f"VALID  {args.adapter}")
    for key in ("base_model", "r", "alpha", "use_rslora", "ranks", "layer_kinds",
                "target_modules", "fan_in_fan_out", "module_count", "parameters", "dtype",
                "size_bytes", "sha256"):
        print(f"  {key:<15} {info[key]}")
    if args.modules:
        for m in modules:
            print(f"  {m['name']}  {m['kind']}  r={m['rank']}  {m['shape']}  scale={m['scale']:g}")
    if verdict is not None:
        _print_preflight(verdict)
    return status


def _print_preflight(verdict: Preflight) -> None:
    print(f"{'LOADS' if verdict.ok else 'WOULD NOT LOAD'} in {verdict.target}")
    for check in verdict.checks:
        mark = "ok  " if check.ok else ("warn" if check.severity == "warning" else "FAIL")
        print(f"  {mark} {check.rule:<18} {check.message}")
        if not check.ok and check.fix:
            print(f"       fix: {check.fix}")
