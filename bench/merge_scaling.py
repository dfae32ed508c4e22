"""How one module's merge time grows with R = Σ r_t: ctm (HOOI and HOSVD), core and mtc.

One 4096×4096 module, output rank 16, seeded random factors (flat spectra: HOOI's slowest
case). The sweep covers T ∈ {8, 16, 32, 64} at r = 16, T = 8 at r ∈ {32, 64, 128}, and
R = 2,048 and 4,096 (T = 8, r = 256 and 512; R = 4,096 is n). At every point each method runs
`reps` times, the methods alternating within a rep, and the median is kept; the algebra
before issue 14 (bench/ctm_reference.py) runs beside the current one on the same inputs.
A least-squares fit of t ≈ a + b·(m+n)R² + c·R³ per method (non-negative coefficients)
gives the cost model; results go to bench/results/merge_scaling.json and a log-log plot.

`--quick` runs a 256×256 module in seconds (the smoke test uses it); nothing is written.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import ctm_reference
import torch
from machine import command_line, machine_info

from lorafold.merge.methods import METHODS, MethodInput, MethodOutput
from lorafold.merge.rules import RULES, RuleParams

RESULTS = Path(__file__).resolve().parent / "results"
Factors = list[tuple[torch.Tensor, torch.Tensor]]
Method = Callable[[MethodInput], MethodOutput]


@dataclass(frozen=True)
class ScalingConfig:
    m: int
    n: int
    out_rank: int
    points: tuple[tuple[int, int], ...]          # (T, r): T inputs of rank r
    reps: int
    threads: int
    reference_max_r: int                          # time the old algebra up to this R
    core_max_r: int                               # time `core` (both versions) up to this R
    mtc_points: tuple[tuple[int, int], ...]       # (T, r) where mtc runs (seconds per run,
                                                  # and T dense m×n deltas in memory)


FULL = ScalingConfig(
    m=4096, n=4096, out_rank=16,
    points=((8, 16), (16, 16), (32, 16), (64, 16), (8, 32), (8, 64), (8, 128), (8, 256),
            (8, 512)),
    reps=3, threads=torch.get_num_threads(), reference_max_r=4096, core_max_r=2048,
    mtc_points=((8, 16), (8, 128), (8, 512)))
QUICK = ScalingConfig(m=256, n=256, out_rank=8, points=((4, 8), (8, 8), (4, 32), (4, 64)),
                      reps=1, threads=torch.get_num_threads(), reference_max_r=256,
                      core_max_r=256, mtc_points=((4, 8), (4, 64)))

# (label, function, subspace, which algebra); mtc has no old version: its code is unchanged.
METHOD_ROWS: tuple[tuple[str, Method, str, str], ...] = (
    ("ctm-hooi", METHODS["ctm"].fn, "hooi", "new"),
    ("ctm-hosvd", METHODS["ctm"].fn, "hosvd", "new"),
    ("core", METHODS["core"].fn, "hooi", "new"),
    ("mtc", METHODS["mtc"].fn, "hooi", "new"),
    ("ctm-hooi", ctm_reference.merge_ctm, "hooi", "old"),
    ("ctm-hosvd", ctm_reference.merge_ctm, "hosvd", "old"),
    ("core", ctm_reference.merge_core, "hooi", "old"),
)


def make_factors(m: int, n: int, count: int, rank: int, seed: int) -> Factors:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(m, rank, generator=g) / rank**0.5, torch.randn(rank, n, generator=g)
             / n**0.5) for _ in range(count)]


def method_input(factors: Factors, rank: int, subspace: str) -> MethodInput:
    spec = RULES["ta"]

    def apply(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return spec.fn(stack, weights, RuleParams(), torch.Generator().manual_seed(0))

    return MethodInput(factors=factors, weights=torch.ones(len(factors), dtype=torch.float64),
                       rank=rank, rule=apply, subspace=subspace)


def load() -> float:
    return os.getloadavg()[0]


def wanted(label: str, version: str, point: tuple[int, int], cfg: ScalingConfig) -> bool:
    big_r = point[0] * point[1]
    if version == "old" and big_r > cfg.reference_max_r:
        return False
    if label == "mtc":
        return point in cfg.mtc_points
    return not (label == "core" and big_r > cfg.core_max_r)


def dense(out: MethodOutput) -> torch.Tensor:
    return out.b.double() @ out.a.double()


def run_point(count: int, rank: int, cfg: ScalingConfig) -> dict[str, Any]:
    """Every method at one (T, r), alternating, `reps` times; medians and agreement."""
    factors = make_factors(cfg.m, cfg.n, count, rank, seed=count * 1000 + rank)
    big_r = count * rank
    rows = [row for row in METHOD_ROWS if wanted(row[0], row[3], (count, rank), cfg)]
    times: dict[str, list[float]] = {f"{label}/{version}": [] for label, _, _, version in rows}
    outputs: dict[str, MethodOutput] = {}
    loads = [load()]
    for _ in range(cfg.reps):
        for label, fn, subspace, version in rows:
            inp = method_input(factors, cfg.out_rank, subspace)
            started = time.perf_counter()
            outputs[f"{label}/{version}"] = fn(inp)
            times[f"{label}/{version}"].append(time.perf_counter() - started)
        loads.append(load())
    medians = {key: statistics.median(values) for key, values in times.items()}
    point: dict[str, Any] = {"T": count, "r": rank, "R": big_r, "seconds": medians,
                             "runs": times, "load_average": loads}
    point["agreement"] = agreement(outputs)
    point["energy"] = {key: out.subspaces.energy for key, out in outputs.items()
                       if out.subspaces is not None}
    point["sweeps"] = {key: out.subspaces.sweeps for key, out in outputs.items()
                       if out.subspaces is not None}
    print(f"T={count:3d} r={rank:4d} R={big_r:5d}  " + "  ".join(
        f"{key} {value:.3f}s" for key, value in medians.items()) + f"  load {loads[-1]:.1f}",
        flush=True)
    return point


def agreement(outputs: dict[str, MethodOutput]) -> dict[str, float]:
    """Relative Frobenius gaps of the merged deltas: new against old, core against mtc
    (equal with ta), ctm-HOOI against mtc (CtM's own approximation, for scale)."""
    pairs = [("ctm-hosvd/new", "ctm-hosvd/old"), ("ctm-hooi/new", "ctm-hooi/old"),
             ("core/new", "core/old"), ("core/new", "mtc/new"), ("ctm-hooi/new", "mtc/new")]
    gaps: dict[str, float] = {}
    reference = {key: dense(out) for key, out in outputs.items()}
    for a, b in pairs:
        if a in reference and b in reference:
            gaps[f"{a} vs {b}"] = float((reference[a] - reference[b]).norm()
                                        / reference[b].norm())
    return gaps


def fit_cost(points: Sequence[dict[str, Any]], key: str, m: int, n: int) -> dict[str, Any] | None:
    """t ≈ a + b·(m+n)R² + c·R³, non-negative least squares on relative errors."""
    from scipy.optimize import nnls

    rows = [(p["R"], p["seconds"][key]) for p in points if key in p["seconds"]]
    if len(rows) < 3:
        return None
    design = torch.tensor([[1.0, (m + n) * r**2, float(r) ** 3] for r, _ in rows],
                          dtype=torch.float64)
    seconds = torch.tensor([t for _, t in rows], dtype=torch.float64)
    weight = 1.0 / seconds                         # fit relative error, not absolute
    scale = design.abs().amax(dim=0)
    coef, _ = nnls((design / scale * weight.unsqueeze(1)).numpy(), (seconds * weight).numpy())
    a, b, c = (torch.from_numpy(coef) / scale).tolist()
    fitted = (design @ torch.tensor([a, b, c], dtype=torch.float64)).tolist()
    return {"a_s": a, "b_s_per_flop_unit": b, "c_s_per_r3": c,
            "gemm_rate_equiv": (1.0 / b if b > 0 else None),
            "r3_rate_equiv": (1.0 / c if c > 0 else None),
            "max_relative_error": max(abs(f - t) / t for f, t in zip(fitted, seconds.tolist(),
                                                                     strict=True))}


def targets(points: Sequence[dict[str, Any]], cfg: ScalingConfig) -> list[dict[str, Any]]:
    """Issue 14's targets, on the current algebra (only at the full 4096×4096 size)."""
    by = {(p["T"], p["r"]): p["seconds"] for p in points}
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float | None) -> None:
        if value is not None and limit is not None:
            out.append({"name": name, "value_s": value, "limit_s": limit,
                        "met": value <= limit})

    for mode in ("hooi", "hosvd"):
        add(f"ctm-{mode} T=64 r=16 <= 0.3 s", by.get((64, 16), {}).get(f"ctm-{mode}/new"), 0.3)
        add(f"ctm-{mode} T=8 r=128 <= 0.5 s", by.get((8, 128), {}).get(f"ctm-{mode}/new"), 0.5)
        full: dict[str, float] = next((p["seconds"] for p in points if p["R"] >= cfg.n), {})
        add(f"ctm-{mode} R=n <= mtc", full.get(f"ctm-{mode}/new"), full.get("mtc/new"))
    return out


def warm_up() -> None:
    """Run every method once on a small module, untimed: the first call of a solver pays
    for imports (scipy's LAPACK) and one-off allocations."""
    factors = make_factors(64, 64, 2, 8, seed=0)
    for _, fn, subspace, _ in METHOD_ROWS:
        fn(method_input(factors, 4, subspace))


def run_benchmark(cfg: ScalingConfig, command: str) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    warm_up()
    load_before = load()
    points = [run_point(count, rank, cfg) for count, rank in cfg.points]
    keys = sorted({key for p in points for key in p["seconds"]})
    return {
        "command": command, "config": asdict(cfg),
        "machine": machine_info(cfg.threads, ("scipy",)),
        "load_average": {"before": load_before, "after": load()},
        "points": points,
        "fits": {key: fit_cost(points, key, cfg.m, cfg.n) for key in keys},
        "targets": targets(points, cfg) if (cfg.m, cfg.n) == (FULL.m, FULL.n) else [],
        "wall_s": time.perf_counter() - started,
    }


def render(result: dict[str, Any]) -> str:
    points = result["points"]
    keys = sorted({key for p in points for key in p["seconds"]})
    lines = ["| T | r | R | " + " | ".join(keys) + " | load |",
             "|---|---|---|" + "---|" * (len(keys) + 1)]
    for p in points:
        cells = [f"{p['seconds'][k]:.3f}" if k in p["seconds"] else "–" for k in keys]
        lines.append(f"| {p['T']} | {p['r']} | {p['R']} | " + " | ".join(cells)
                     + f" | {p['load_average'][-1]:.1f} |")
    lines.append("")
    for key, fit in result["fits"].items():
        if fit is not None:
            lines.append(f"fit {key}: t ≈ {fit['a_s'] * 1e3:.1f} ms + (m+n)R²/"
                         f"{(fit['gemm_rate_equiv'] or float('inf')):.3g} + R³/"
                         f"{(fit['r3_rate_equiv'] or float('inf')):.3g} s "
                         f"(worst point off by {fit['max_relative_error']:.0%})")
    for t in result["targets"]:
        lines.append(f"{'MET' if t['met'] else 'MISSED'}: {t['name']} "
                     f"({t['value_s']:.3f} s against {t['limit_s']:.3f} s)")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds against R, log-log: one colour per method, solid = current algebra, dashed
    = before issue 14, points measured, lines the fitted cost model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    colours = {"ctm-hooi": "tab:blue", "ctm-hosvd": "tab:green", "core": "tab:orange",
               "mtc": "tab:red"}
    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    big_rs = sorted({p["R"] for p in result["points"]})
    grid = torch.logspace(torch.log10(torch.tensor(float(big_rs[0]))),
                          torch.log10(torch.tensor(float(big_rs[-1]))), 50).tolist()
    for key, fit in result["fits"].items():
        label, version = key.split("/")
        style = "-" if version == "new" else "--"
        xs = [p["R"] for p in result["points"] if key in p["seconds"]]
        ys = [p["seconds"][key] for p in result["points"] if key in p["seconds"]]
        ax.scatter(xs, ys, color=colours[label], marker="o" if version == "new" else "x", s=18)
        if fit is not None:
            model = [fit["a_s"] + fit["b_s_per_flop_unit"] * (cfg["m"] + cfg["n"]) * r**2
                     + fit["c_s_per_r3"] * r**3 for r in grid]
            ax.plot(grid, model, style, color=colours[label], linewidth=1.1,
                    label=f"{label} ({'current' if version == 'new' else 'before #14'})")
    for t in result["targets"]:
        if "<=" in t["name"] and "mtc" not in t["name"]:
            ax.axhline(t["limit_s"], color="grey", linewidth=0.6, linestyle=":")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("R = Σ r_t")
    ax.set_ylabel("seconds per module (median)")
    ax.set_title(f"{cfg['m']}×{cfg['n']} module, output rank {cfg['out_rank']}; load "
                 f"{result['load_average']['before']:.1f}–{result['load_average']['after']:.1f}",
                 fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a 256×256 module in seconds; prints the table, writes nothing")
    parser.add_argument("--points", help="comma-separated Txr points to run (T inputs of rank "
                        "r), e.g. 64x16,8x128 (default: the whole sweep)")
    parser.add_argument("--reps", type=int, help="runs per method and point (median kept)")
    parser.add_argument("--threads", type=int, help="torch threads (default: all)")
    parser.add_argument("--reference-max-r", type=int,
                        help="time the pre-issue-14 algebra only up to this R")
    parser.add_argument("--core-max-r", type=int, help="time `core` only up to this R")
    parser.add_argument("--out-dir", type=Path, default=RESULTS,
                        help="where merge_scaling.{json,png} go (full run only)")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> ScalingConfig:
    cfg = QUICK if args.quick else FULL
    if args.points:
        try:
            points = tuple((int(t), int(r)) for t, r in
                           (p.split("x") for p in args.points.split(",")))
        except ValueError:
            raise SystemExit(f"--points wants Txr pairs, got {args.points!r}") from None
        cfg = replace(cfg, points=points)
    if args.reps is not None:
        if args.reps < 1:
            raise SystemExit("--reps must be at least 1")
        cfg = replace(cfg, reps=args.reps)
    if args.threads is not None:
        cfg = replace(cfg, threads=max(1, args.threads))
    if args.reference_max_r is not None:
        cfg = replace(cfg, reference_max_r=args.reference_max_r)
    if args.core_max_r is not None:
        cfg = replace(cfg, core_max_r=args.core_max_r)
    return cfg


def write_outputs(result: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "merge_scaling.json").write_text(json.dumps(result, indent=1) + "\n")
    plot(result, out_dir / "merge_scaling.png")
    print(f"wrote {out_dir}/merge_scaling.{{json,png}}")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = config_from(args)
    command = command_line("bench/merge_scaling.py", argv)
    result = run_benchmark(cfg, command)
    print(render(result))
    print(f"wall time {result['wall_s']:.0f}s; load average {result['load_average']}")
    if not args.quick:
        write_outputs(result, args.out_dir)


if __name__ == "__main__":
    main()
