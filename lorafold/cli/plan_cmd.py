"""`lorafold plan`: which adapters to fold together, into how many, at what rank.

The planner (and torch) is imported by `run`, matplotlib only for `--png`, so that
`lorafold --help` and `lorafold plan --help` stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lorafold.errors import InvalidRequest
from lorafold.merge.options import DEFAULT_MIN_ENERGY

if TYPE_CHECKING:
    from lorafold.merge.grouping import GroupPlan

# Stated here for --help without importing the planner; tests check them against
# grouping.RANK_CAP_FACTOR and grouping.DEFAULT_MIN_SIMILARITY.
RANK_CAP_HELP = ("rank auto: the largest rank a group may need (default 4 × the largest "
                 "input rank)")
MIN_SIMILARITY_HELP = ("do not fold groups whose mean pairwise cosine is below this "
                       "(default 0)")
RANK_HELP = ("auto: each group at the auto rank of its members (docs/planning.md); or R: "
             "every group at rank R, each member keeping >= E at R (default auto)")


def parse_rank(text: str) -> int | None:
    """`--rank`: an integer, or auto → None."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto, got {text!r}") from None


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("plan", help="plan which adapters to merge together, and at what rank",
                       description="Group adapters by similarity so that each group's CtM "
                                   "merge keeps >= E of every member's energy in every module "
                                   "(docs/planning.md, \"Planner\").")
    p.add_argument("inputs", nargs="+", metavar="ADAPTER", help="adapter dir or archive")
    p.add_argument("--rank", type=parse_rank, default=None, metavar="R|auto", help=RANK_HELP)
    p.add_argument("--min-energy", type=float, default=DEFAULT_MIN_ENERGY, metavar="E",
                   help="the share of its energy every member keeps in every module")
    p.add_argument("--max-rank", type=int, metavar="R", help=RANK_CAP_HELP)
    p.add_argument("--max-groups", type=int, metavar="K",
                   help="stop once at most K adapters would remain (groups + left alone); "
                        "says so if the constraint does not allow K")
    p.add_argument("--min-similarity", type=float, metavar="S", help=MIN_SIMILARITY_HELP)
    p.add_argument("--force", action="store_true", help="plan adapters of different base models")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--png", type=Path, metavar="FILE",
                   help="draw the similarity heatmap with the groups outlined and each "
                        "member's energy (needs matplotlib)")
    p.add_argument("--apply", type=Path, metavar="OUTDIR",
                   help="merge each group (ctm, its rank, the default rule) into OUTDIR/<group>")
    p.add_argument("--device", default="auto",
                   help="--apply: auto (cuda if present), cpu, cuda or cuda:N")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    figure = _figure_class() if args.png is not None else None

    from lorafold.adapters import open_adapter
    from lorafold.merge import MergeRequest, merge_adapters
    from lorafold.merge.grouping import DEFAULT_MIN_SIMILARITY, plan_groups

    with contextlib.ExitStack() as stack:
        adapters = [stack.enter_context(open_adapter(path, label=path)) for path in args.inputs]
        plan = plan_groups(adapters, rank=args.rank, energy=args.min_energy,
                           max_rank=args.max_rank, max_groups=args.max_groups,
                           min_similarity=(DEFAULT_MIN_SIMILARITY if args.min_similarity is None
                                           else args.min_similarity),
                           force=args.force)
        if figure is not None:
            draw(plan, args.png, figure)
        applied = []
        for group in plan.groups if args.apply is not None else ():
            result = merge_adapters([adapters[t] for t in group.indices], args.apply / group.name,
                                    MergeRequest(method="ctm", rank=group.rank, force=args.force),
                                    device=args.device)
            applied.append((group, result.out_dir))
    if args.json:
        out = plan.to_dict()
        if args.apply is not None:
            out["applied"] = [{"group": g.name, "out_dir": str(d)} for g, d in applied]
        if args.png is not None:
            out["png"] = str(args.png)
        print(json.dumps(out, indent=2))
        return 0
    print_table(plan)
    if args.png is not None:
        print(f"drew {args.png}")
    if args.apply is not None and not plan.groups:
        print("nothing to merge")
    for group, out_dir in applied:
        print(f"wrote {out_dir} ({group.name}: {len(group.members)} adapters, "
              f"rank {group.rank})")
    return 0


def print_table(plan: GroupPlan) -> None:
    mode = (f"rank auto, cap {plan.max_rank}" if plan.rank is None else f"rank {plan.rank}")
    print(f"{len(plan.labels)} adapters -> {plan.adapters_after}: {len(plan.groups)} "
          f"group{'s' if len(plan.groups) != 1 else ''}, {len(plan.left_alone)} left alone "
          f"({mode}, min energy {plan.min_energy})")
    for group in plan.groups:
        print(f"{group.name}  rank {group.rank}  {len(group.members)} members  "
              f"{group.parameters:,} parameters")
        width = max(len("member"), *(len(m) for m in group.members))
        print(f"  {'member':<{width}} {'energy':>8}  worst module")
        for e in group.energies:
            print(f"  {e.input:<{width}} {e.energy:>8.4f}  {e.module}")
        print(f"  worst: {group.worst.module} ({group.worst.input}, {group.worst.energy:.4f})")
    if plan.left_alone:
        print(f"left alone: {', '.join(plan.left_alone)}")
    before, after = plan.parameters_before, plan.parameters_after
    print(f"parameters: {before:,} before -> {after:,} after "
          f"({100 * after / before if before else 100:.1f}%)")
    if plan.refused:
        print(f"refused: {len(plan.refused)} union{'s' if len(plan.refused) != 1 else ''} "
              "(--json lists why)")
    for note in plan.notes:
        print(f"note: {note}")


def _figure_class() -> Any:
    """matplotlib's Figure (an optional dependency: the `bench` extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise InvalidRequest("--png needs matplotlib, which is not installed: pip install "
                             "matplotlib", code="missing_dependency") from e
    return Figure


def draw(plan: GroupPlan, path: Path, figure_class: Any) -> None:
    """The cosine heatmap, rows and columns ordered group by group with each group outlined,
    beside each row's energy in its group (left-alone adapters have none)."""
    from matplotlib.patches import Rectangle

    order = [t for g in plan.groups for t in g.indices]
    order += [t for t in range(len(plan.labels)) if t not in order]
    energy = {e.input: e.energy for g in plan.groups for e in g.energies}
    names = [plan.labels[t] for t in order]
    size = len(order)
    fig = figure_class(figsize=(6 + 0.3 * size, 2 + 0.4 * size), layout="constrained")
    heat, bars = fig.subplots(1, 2, width_ratios=[3, 2])
    image = heat.imshow([[plan.cosine[i][j] for j in order] for i in order],
                        vmin=-1, vmax=1, cmap="RdBu_r")
    fig.colorbar(image, ax=heat, label="cosine")
    heat.set_xticks(range(size), [n[-24:] for n in names], rotation=90)
    heat.set_yticks(range(size), [n[-24:] for n in names])
    start = 0
    for group in plan.groups:
        width = len(group.indices)
        heat.add_patch(Rectangle((start - 0.5, start - 0.5), width, width, fill=False,
                                 edgecolor="black", linewidth=2))
        heat.text(start - 0.4, start - 0.3, f"{group.name} (r {group.rank})", fontsize=7,
                  va="top")
        start += width
    heat.set_title("similarity, groups outlined")
    bars.barh(range(size), [energy.get(n, 0.0) for n in names], color="tab:blue")
    for row, name in enumerate(names):
        if name not in energy:
            bars.text(0.02, row, "left alone", va="center", fontsize=8, color="gray")
    bars.axvline(plan.min_energy, color="black", linestyle="--", linewidth=1)
    bars.set_xlim(0, 1)
    bars.set_ylim(size - 0.5, -0.5)
    bars.set_yticks(range(size), [])
    bars.set_xlabel("energy kept (min over modules)")
    bars.set_title(f"per member, E = {plan.min_energy}")
    fig.savefig(path, format="png")
