"""`lorafold demo`: a self-contained merge on synthetic adapters, to see lorafold work."""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("demo", help="create synthetic adapters and merge them (no downloads)")
    p.add_argument("--adapters", type=int, default=4, help="number of input adapters")
    p.add_argument("--rank", type=int, default=8, help="input and output rank")
    p.add_argument("--hidden", type=int, default=512, help="model width of the synthetic shapes")
    p.add_argument("--layers", type=int, default=2, help="transformer layers of the shapes")
    p.add_argument("--out", type=Path, help="keep the merged adapter here")
    p.add_argument("--save-inputs", type=Path, metavar="DIR",
                   help="keep the synthetic input adapters in DIR/task0, DIR/task1, ... "
                        "(PEFT directories, e.g. to upload to a running service)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lorafold.merge import MergeRequest, merge_adapters  # torch: here, not for --help
    from lorafold.synthetic import llama_module_shapes, write_random_adapter

    shapes = llama_module_shapes(args.layers, hidden=args.hidden,
                                 intermediate=int(args.hidden * 2.6875))
    with tempfile.TemporaryDirectory(prefix="lorafold-demo-") as tmp:
        root = Path(tmp)
        inputs_root = args.save_inputs or root
        inputs = [write_random_adapter(inputs_root / f"task{i}", shapes, rank=args.rank,
                                       seed=i) for i in range(args.adapters)]
        print(f"{args.adapters} synthetic adapters, rank {args.rank}, {len(shapes)} modules each "
              f"(Llama-style shapes, hidden {args.hidden}), in {inputs_root}")
        print(f"\n{'method':<10} {'time':>8} {'mean energy':>12} {'mean cosine':>12}")
        for method in ("ctm", "core", "mtc"):
            started = time.perf_counter()
            out = args.out if (args.out and method == "ctm") else root / f"merged-{method}"
            result = merge_adapters(inputs, out, MergeRequest(method=method, rank=args.rank))
            elapsed = time.perf_counter() - started
            rows = result.report["inputs"]
            energy = sum(r["mean_energy"] for r in rows) / len(rows)
            cosine = sum(r["mean_cosine"] for r in rows) / len(rows)
            print(f"{method:<10} {elapsed:>7.2f}s {energy:>12.4f} {cosine:>12.4f}")
        print("\nenergy: share of each input's delta inside the merged adapter's subspaces;")
        print("cosine: alignment of the merged delta with each input (means over inputs).")
        if args.out:
            print(f"\nmerged adapter (ctm) written to {args.out.resolve()}")
    return 0
