"""`lorafold merge`: merge adapters offline, with a progress bar and a short summary.

Only torch-free modules are imported here; the merge code is imported by `run`, so that
`lorafold --help` and `lorafold merge --help` stay fast.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lorafold.errors import InvalidRequest
from lorafold.merge.options import (
    DEFAULT_BETA,
    DEFAULT_DENSITY,
    DEFAULT_DROP,
    DEFAULT_METHOD,
    DEFAULT_MIN_ENERGY,
    DEFAULT_RULE,
    DEFAULT_SUBSPACE,
    OUTPUT_DTYPES,
    SERVING_TARGETS,
    SUBSPACE_MODES,
)
from lorafold.tune.cli import add_tune_options, run_tuned_merge, tuning_lines

BETA_HELP = (f"ctm: β ∈ [0, 1] rescaling of the inputs before the shared subspaces are chosen: "
             f"1 = as they are, 0 = all at the mean norm (default {DEFAULT_BETA})")
SUBSPACE_HELP = ("ctm: how the shared subspaces are found: hooi (HOSVD start, then HOOI "
                 f"sweeps) or hosvd (default {DEFAULT_SUBSPACE})")
DENSITY_HELP = f"ties/dare_ties: fraction of entries kept by the trim (default {DEFAULT_DENSITY})"
DROP_HELP = f"dare/dare_ties: drop rate in [0, 1) (default {DEFAULT_DROP})"
# Method and rule names are not argparse `choices`: listing them would import the
# registries (and torch) for every `--help`. The core refuses a wrong name, listing them.
METHOD_HELP = f"merge method, see docs/merging.md (default {DEFAULT_METHOD})"
RULE_HELP = f"merge rule, see docs/merging.md (default {DEFAULT_RULE}; cat takes only ta)"
TARGET_HELP = ("make the output load in this serving engine: explicit target modules, "
               "rank within its limits, every module type in every layer (lorax, tgi), "
               "float16 unless --dtype; the result carries its preflight (docs/serving.md)")
BASE_MODEL_NAME_HELP = "write this as the output's base_model_name_or_path (e.g. ORG/NAME)"


# "merge  38%|███▊      | 00:02": the stage, then how far it is (tqdm's set_description
# would append ": " to the stage, and the bar its own).
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {elapsed}"


def parse_weights(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError as e:
        raise InvalidRequest(f"--weights must be comma-separated numbers, got {text!r}",
                             code="invalid_parameter") from e


RANK_HELP = ("output rank r (not for cat), or auto[:E] (ctm): the smallest rank at which "
             f"every input keeps >= E of its energy in every module (default E "
             f"{DEFAULT_MIN_ENERGY}; docs/planning.md)")


def parse_rank(text: str) -> tuple[int | None, float | None]:
    """`--rank`: an integer, or auto / auto:E → (None, E)."""
    word, _, energy = text.partition(":")
    if word == "auto":
        try:
            return None, float(energy) if energy else DEFAULT_MIN_ENERGY
        except ValueError:
            raise argparse.ArgumentTypeError(f"auto:E needs a number E, got {text!r}") from None
    try:
        return int(text), None
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or auto[:E], got {text!r}") \
            from None


def add_merge_options(p: argparse.ArgumentParser, *, method_default: str | None) -> None:
    """The options of a merge request, shared by `lorafold merge` and `lorafold client
    merge` (the client leaves `--method` unset: the service applies its default)."""
    p.add_argument("--rank", type=parse_rank, default=(None, None), metavar="R|auto[:E]",
                   help=RANK_HELP)
    p.add_argument("--method", default=method_default, help=METHOD_HELP)
    p.add_argument("--rule", help=RULE_HELP)
    p.add_argument("--weights", help="comma-separated weight per input (default 1 each)")
    p.add_argument("--density", type=float, help=DENSITY_HELP)
    p.add_argument("--drop", type=float, help=DROP_HELP)
    p.add_argument("--scale", type=float, default=1.0,
                   help="global scale λ on the merged delta (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for dare's random drop (default 0)")
    p.add_argument("--beta", type=float, help=BETA_HELP)
    p.add_argument("--subspace", choices=SUBSPACE_MODES, help=SUBSPACE_HELP)
    p.add_argument("--force", action="store_true", help="merge adapters of different base models")
    p.add_argument("--dtype", choices=list(OUTPUT_DTYPES),
                   help="output dtype (default: the first input's)")
    p.add_argument("--target", choices=SERVING_TARGETS, help=TARGET_HELP)
    p.add_argument("--base-model-name", help=BASE_MODEL_NAME_HELP)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("merge", help="merge LoRA adapters into one",
                       description="Merge PEFT LoRA adapters (directories, .zip or .tar.gz) "
                                   "into one rank-r LoRA.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="adapter dir or archive")
    p.add_argument("--out", required=True, type=Path, help="output adapter directory")
    add_merge_options(p, method_default=DEFAULT_METHOD)
    p.add_argument("--device", default="auto",
                   help="auto (cuda if present), cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_tune_options(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from lorafold.merge import MergeRequest, merge_adapters

    rank, min_energy = args.rank
    request = MergeRequest(method=args.method, rule=args.rule, rank=rank, min_energy=min_energy,
                           weights=parse_weights(args.weights), density=args.density,
                           drop=args.drop, scale=args.scale, seed=args.seed, beta=args.beta,
                           subspace=args.subspace, force=args.force, dtype=args.dtype,
                           target=args.target, base_model_name=args.base_model_name)
    bar: tqdm | None = None

    def progress(stage: str, fraction: float) -> None:
        # Created on the first report, so input errors print one clean line and no bar.
        nonlocal bar
        if args.quiet:
            return
        if bar is None:
            bar = tqdm(total=100, unit="%", desc=stage, bar_format=BAR_FORMAT)
        bar.set_description_str(stage, refresh=False)
        bar.n = round(fraction * 100)
        bar.refresh()

    tuning = None
    try:
        if args.tune_data:  # a tuned merge: search on validation data, then write the best
            tuned = run_tuned_merge(args, request, progress)
            result, tuning = tuned.result, tuned.tuning
        else:
            result = merge_adapters(args.inputs, args.out, request, device=args.device,
                                    progress=progress)
        progress("write", 1.0)  # the writer reports its start only; this is its end
    finally:
        if bar is not None:
            bar.close()
    if args.json:
        print(json.dumps(result.report, indent=2))
        return 0
    rank = result.lineage["parameters"]["output_rank"]
    print(f"wrote {result.out_dir} ({args.method}/{request.rule_name}, rank {rank}, "
          f"{len(result.report['modules'])} modules, {result.wall_time_s:.2f}s)")
    subspaces = result.report.get("subspaces")
    if subspaces:  # ctm: how well the shared subspaces hold the (rescaled) inputs
        start = ("" if subspaces["mode"] == "hosvd"
                 else f" ({subspaces['mean_start_energy']:.4f} at the HOSVD start)")
        print(f"subspaces: {subspaces['mode']}, max {subspaces['max_sweeps']} sweeps, "
              f"mean captured energy {subspaces['mean_energy']:.4f}{start}")
    for line in tuning_lines(tuning) if tuning is not None else ():
        print(line)
    print(f"{'input':<48} {'modules':>7} {'energy':>8} {'cosine':>8}")
    for row in result.report["inputs"]:
        energy = "-" if row["mean_energy"] is None else f"{row['mean_energy']:.4f}"
        cosine = "-" if row["mean_cosine"] is None else f"{row['mean_cosine']:.4f}"
        print(f"{row['input'][-48:]:<48} {row['modules']:>7} {energy:>8} {cosine:>8}")
    return 0
