"""Whole-model scale: CtM end to end on a simulated Llama-70B-shaped adapter set.

T = 8 random rank-16 bf16 PEFT adapters with Llama-2/3-70B module shapes (80 layers, hidden
8192, MLP 28672, grouped-query k/v 8192→1024; ~3.3 GB of factors in all) are written to a
temporary directory (deleted at the end), then merged with `merge_adapters` (ctm, rule ta,
rank 16) in a fresh process, on the service's path (the inputs opened with the sha256 their
upload verified, as the worker opens them), then again on the CLI's path (paths: the merge
hashes its inputs for the lineage). Each process reports its wall time and peak RSS
(VmHWM, the kernel's high-water mark of its address space; not getrusage's ru_maxrss,
which a child started with fork + exec inherits from its parent). The floor beside it: the
inputs read the way the merge reads them + CtM's flops at the best fp32 GEMM rate measured
just before and after (as bench/merge_speed.py computes it).

The memory bound it checks (the pipeline's, lorafold/merge/executor.py): the process after
its imports + three modules' inputs (as stored and upcast to fp32: two merging side by
side, one read ahead) + three modules' outputs in fp32 + an allowance — however many
layers the model has.

    .venv/bin/python bench/merge_70b.py              # full size: ~3.3 GB on disk, minutes
    .venv/bin/python bench/merge_70b.py --quick      # 2 tiny layers: seconds (CI smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from machine import command_line, machine_info, write_json
from merge_speed import (
    BenchConfig,
    ctm_end_to_end,
    ctm_flops,
    gemm_gflops,
    proc_status,
    read_seconds,
    weight_digests,
)

from lorafold.adapters.reader import open_adapter
from lorafold.synthetic import write_random_adapter

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "merge_70b.json"
MB = 1_000_000
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ScaleConfig:
    layers: int = 80
    hidden: int = 8192
    intermediate: int = 28672
    kv: int = 1024                  # grouped-query attention: k/v project 8192 -> 1024
    adapters: int = 8
    rank: int = 16
    dtype: str = "bfloat16"
    threads: int = os.cpu_count() or 1
    allowance_bytes: int = 300 * MB
    gemm_shapes: tuple[tuple[int, int, int], ...] = ((28672, 128, 128), (8192, 128, 128),
                                                     (4096, 4096, 4096))
    gemm_min_flops: float = 2e9

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """Module name -> (out, in), as in a Llama-70B model."""
        dims = {"q_proj": ("self_attn", self.hidden, self.hidden),
                "k_proj": ("self_attn", self.kv, self.hidden),
                "v_proj": ("self_attn", self.kv, self.hidden),
                "o_proj": ("self_attn", self.hidden, self.hidden),
                "gate_proj": ("mlp", self.intermediate, self.hidden),
                "up_proj": ("mlp", self.intermediate, self.hidden),
                "down_proj": ("mlp", self.hidden, self.intermediate)}
        return {f"model.layers.{layer}.{dims[name][0]}.{name}": dims[name][1:]
                for layer in range(self.layers) for name in MODULES}


QUICK = ScaleConfig(layers=2, hidden=256, intermediate=896, kv=32,
                    gemm_shapes=((896, 128, 128), (256, 256, 256)), gemm_min_flops=2e8)


def memory_bound(cfg: ScaleConfig, baseline_rss: int) -> dict[str, int]:
    """The pipeline's bound: baseline + 3 modules' inputs (stored + fp32) + 3 outputs (fp32)."""
    shapes = cfg.module_shapes().values()
    stored = torch.empty((), dtype=getattr(torch, cfg.dtype)).element_size()
    widest = max(m + n for m, n in shapes)
    inputs = 3 * cfg.adapters * cfg.rank * widest * (stored + 4)
    outputs = 3 * cfg.rank * widest * 4
    return {"baseline": baseline_rss, "three_modules_inputs": inputs,
            "three_modules_outputs": outputs, "allowance": cfg.allowance_bytes,
            "limit": baseline_rss + inputs + outputs + cfg.allowance_bytes}


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """Body of the measuring process: one merge; its wall time and peak RSS."""
    torch.set_num_threads(int(spec["threads"]))
    baseline = proc_status()["VmRSS"]
    started = time.perf_counter()
    out = ctm_end_to_end([Path(d) for d in spec["dirs"]], Path(spec["out"]), int(spec["rank"]),
                         digests=spec["digests"])
    wall = time.perf_counter() - started
    peak = proc_status()["VmHWM"]
    with open_adapter(out) as written:
        modules = len(written.modules)
    return {"wall_s": wall, "baseline_rss": baseline, "peak_rss": peak, "modules": modules,
            "output_bytes": (out / "adapter_model.safetensors").stat().st_size}


def run_child(dirs: list[Path], out: Path, cfg: ScaleConfig,
              digests: list[str] | None) -> dict[str, Any]:
    spec = {"dirs": [str(d) for d in dirs], "out": str(out), "rank": cfg.rank,
            "threads": cfg.threads, "digests": digests}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child",
                           json.dumps(spec)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"merge process failed ({done.returncode}): {done.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def run_benchmark(cfg: ScaleConfig, command: str, workdir: Path | None = None,
                  reps: int = 1) -> dict[str, Any]:
    load_before = os.getloadavg()
    torch.set_num_threads(cfg.threads)
    shapes = cfg.module_shapes()
    flops = sum(sum(ctm_flops(m, n, [cfg.rank] * cfg.adapters, cfg.rank).values())
                for m, n in shapes.values())
    gemm_cfg = replace(BenchConfig(), gemm_shapes=cfg.gemm_shapes,
                       gemm_min_flops=cfg.gemm_min_flops)
    with tempfile.TemporaryDirectory(prefix="lorafold-70b-", dir=workdir) as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        dirs = [write_random_adapter(root / f"adapter{i}", shapes, rank=cfg.rank, seed=i,
                                     dtype=getattr(torch, cfg.dtype))
                for i in range(cfg.adapters)]
        write_s = time.perf_counter() - started
        files = [d / "adapter_model.safetensors" for d in dirs]
        input_bytes = sum(f.stat().st_size for f in files)
        digests = weight_digests(dirs)
        runs = []
        for rep in range(reps):
            read_s = read_seconds(files, 1)
            before = gemm_gflops(gemm_cfg)
            merged = run_child(dirs, root / f"out{rep}", cfg, digests)
            cli = run_child(dirs, root / f"cli{rep}", cfg, None)
            after = gemm_gflops(gemm_cfg)
            best = max(*before.values(), *after.values())
            floor_s = read_s + flops / (best * 1e9)
            runs.append({**merged, "read_s": read_s, "gflops_best": best,
                         "floor_s": floor_s, "ratio": merged["wall_s"] / floor_s,
                         "cli_wall_s": cli["wall_s"], "cli_ratio": cli["wall_s"] / floor_s,
                         "cli_peak_rss": cli["peak_rss"], "loadavg_after": os.getloadavg()[0]})
    wall = statistics.median(r["wall_s"] for r in runs)
    peak = max(max(r["peak_rss"], r["cli_peak_rss"]) for r in runs)
    bound = memory_bound(cfg, min(r["baseline_rss"] for r in runs))
    return {
        "command": command, "config": asdict(cfg),
        "machine": {**machine_info(cfg.threads, ("safetensors",)),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "modules": len(shapes), "input_bytes": input_bytes, "write_inputs_s": write_s,
        "flops": flops, "runs": runs, "wall_s": wall,
        "floor_s": statistics.median(r["floor_s"] for r in runs),
        "ratio": statistics.median(r["ratio"] for r in runs),
        "cli_wall_s": statistics.median(r["cli_wall_s"] for r in runs),
        "cli_ratio": statistics.median(r["cli_ratio"] for r in runs),
        "peak_rss": peak, "memory_bound": bound, "within_bound": peak <= bound["limit"],
    }


def render(result: dict[str, Any]) -> str:
    cfg, bound = result["config"], result["memory_bound"]
    machine = result["machine"]
    lines = [
        f"command: {result['command']}",
        f"machine: {machine['cpu_model']}, {machine['cores']} cores, torch {machine['torch']} "
        f"({cfg['threads']} threads); load average {machine['loadavg_before'][0]:.1f} before, "
        f"{machine['loadavg_after'][0]:.1f} after",
        f"inputs: T={cfg['adapters']} rank-{cfg['rank']} {cfg['dtype']} adapters, "
        f"{cfg['layers']} layers x 7 modules ({result['modules']}), hidden {cfg['hidden']}, "
        f"MLP {cfg['intermediate']}, k/v {cfg['kv']}: {result['input_bytes'] / MB:,.0f} MB "
        f"(written in {result['write_inputs_s']:.0f} s)",
    ]
    for i, run in enumerate(result["runs"]):
        lines.append(f"run {i}: merge_adapters {run['wall_s']:.1f} s (service path; CLI path, "
                     f"hashing, {run['cli_wall_s']:.1f} s = {run['cli_ratio']:.2f}x); floor "
                     f"{run['floor_s']:.1f} s "
                     f"(read {run['read_s']:.2f} s + {result['flops'] / 1e9:,.0f} GFLOP at "
                     f"{run['gflops_best']:.0f} GFLOP/s) -> {run['ratio']:.2f}x; peak RSS "
                     f"{run['peak_rss'] / MB:,.0f} MB (after imports "
                     f"{run['baseline_rss'] / MB:,.0f} MB); load after {run['loadavg_after']:.1f}")
    lines.append(f"end to end / floor: {result['ratio']:.2f} (median, service path; CLI path "
                 f"{result['cli_ratio']:.2f}); peak RSS "
                 f"{result['peak_rss'] / MB:,.0f} MB vs bound {bound['limit'] / MB:,.0f} MB "
                 f"(baseline {bound['baseline'] / MB:,.0f} + 3 modules' inputs "
                 f"{bound['three_modules_inputs'] / MB:,.1f} + 3 outputs "
                 f"{bound['three_modules_outputs'] / MB:,.1f} + {bound['allowance'] / MB:,.0f}): "
                 f"{'within' if result['within_bound'] else 'OVER'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 tiny layers: a smoke run")
    parser.add_argument("--layers", type=int, help="layers (default 80; quick 2)")
    parser.add_argument("--reps", type=int, default=1, help="merges measured (default 1)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--workdir", type=Path, help="where the temporary inputs go")
    parser.add_argument("--out", type=Path, help=f"JSON output (default bench/results/"
                                                 f"{DEFAULT_OUT.name}; none with --quick)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return None
    cfg = QUICK if args.quick else ScaleConfig()
    cfg = replace(cfg, **{k: v for k, v in (("layers", args.layers), ("threads", args.threads))
                          if v is not None})
    command = command_line(__file__, argv)
    result = run_benchmark(cfg, command, args.workdir, max(1, args.reps))
    print(render(result))
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        write_json(result, out)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
