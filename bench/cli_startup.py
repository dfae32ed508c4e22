"""Start-up time of the light CLI commands, against the `import httpx` floor.

    .venv/bin/python bench/cli_startup.py              # 10 runs of each command
    .venv/bin/python bench/cli_startup.py --runs 30 --out /tmp/cli.json

Each command is a fresh interpreter (`python -m lorafold ...`), timed from spawn to exit.
The commands run round-robin (after one warm-up round, which fills the page cache and
the .pyc files), so a change in machine load touches them all alike; the table gives the
median, min and max over `--runs` rounds. `lorafold client list` goes to a port where
nothing listens: it must fail fast with a clear connection error (checked), and the time
to that error is what a user waits for before any network round trip.

Target (the issue): `lorafold client list` within 0.3 s of `python -c "import httpx"`.

`lorafold merge (small)` merges three tiny adapters (two 64×48 modules, rank 4) written to
a temporary directory: the start-up a pipeline pays per offline merge. With
`--baseline-tree DIR` every command also runs from another checkout (PYTHONPATH=DIR, e.g.
the main branch), interleaved with this one, so before/after are measured side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from machine import machine_info

TARGET_S = 0.3
FLOOR = "import httpx"
CLIENT = "lorafold client list"


def free_port() -> int:
    """A local port nobody listens on (bound once by us, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Command:
    name: str
    argv: list[str]
    expect_rc: int
    expect_stderr: str = ""   # a phrase the command must print on stderr
    tree: str | None = None   # PYTHONPATH to run it with (None: as this process has it)


TREE = str(Path(__file__).resolve().parents[1])
MERGE_SHAPES = {"model.layers.0.self_attn.q_proj": (64, 48), "model.layers.0.mlp.up_proj": (64, 48)}


def small_inputs(root: Path) -> list[str]:
    from lorafold.synthetic import write_random_adapter

    return [str(write_random_adapter(root / f"a{i}", MERGE_SHAPES, rank=4, seed=i))
            for i in range(3)]


def commands(port: int, inputs: list[str], out: Path) -> list[Command]:
    py = sys.executable
    return [
        Command("python -c pass", [py, "-c", "pass"], 0),
        Command(FLOOR, [py, "-c", "import httpx"], 0),
        Command(CLIENT, [py, "-m", "lorafold", "client", "--url", f"http://127.0.0.1:{port}",
                         "--api-key", "bench", "list"], 2, "error: unreachable: cannot reach"),
        Command("lorafold --help", [py, "-m", "lorafold", "--help"], 0),
        Command("lorafold merge --help", [py, "-m", "lorafold", "merge", "--help"], 0),
        Command("lorafold merge (small)", [py, "-m", "lorafold", "merge", *inputs, "--rank",
                                           "4", "--out", str(out), "--quiet"], 0),
    ]


def with_baseline(todo: list[Command], tree: str | None) -> list[Command]:
    """Each lorafold command twice: from this tree and from `tree` (labelled)."""
    if tree is None:
        return todo
    out = []
    for c in todo:
        out.append(replace(c, tree=TREE))
        if "lorafold" in c.name:
            out.append(replace(c, name=f"{c.name} [baseline]", tree=tree))
    return out


def run_once(command: Command, env: dict[str, str]) -> tuple[float, str]:
    """Wall time of one run; the command's last stderr line, after checking its outcome."""
    if command.tree is not None:
        env = {**env, "PYTHONPATH": command.tree}
    started = time.perf_counter()
    done = subprocess.run(command.argv, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != command.expect_rc or command.expect_stderr not in done.stderr:
        raise SystemExit(f"{command.name}: exit {done.returncode} (expected "
                         f"{command.expect_rc}), stderr:\n{done.stderr}")
    lines = done.stderr.strip().splitlines()
    return elapsed, lines[-1] if lines else ""


def measure(runs: int, baseline_tree: str | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="lorafold-cli-") as tmp:
        inputs = small_inputs(Path(tmp))
        return measure_commands(with_baseline(
            commands(free_port(), inputs, Path(tmp) / "merged"), baseline_tree), runs)


def measure_commands(todo: list[Command], runs: int) -> dict[str, Any]:
    env = dict(os.environ)  # --url and --api-key below override LORAFOLD_URL / _API_KEY
    samples: dict[str, list[float]] = {c.name: [] for c in todo}
    messages: dict[str, str] = {}
    for c in todo:  # warm-up round, not counted
        run_once(c, env)
    for _ in range(runs):
        for c in todo:
            elapsed, message = run_once(c, env)
            samples[c.name].append(elapsed)
            messages[c.name] = message
    floor = statistics.median(samples[FLOOR])
    rows = []
    for c in todo:
        values = samples[c.name]
        median = statistics.median(values)
        rows.append({"command": c.name, "tree": c.tree,
                     "argv": [Path(a).name if a == sys.executable else a for a in c.argv],
                     "median_s": round(median, 4), "min_s": round(min(values), 4),
                     "max_s": round(max(values), 4), "over_floor_s": round(median - floor, 4),
                     "samples_s": [round(v, 4) for v in values],
                     **({"stderr": messages[c.name]} if c.expect_stderr else {})})
    over = statistics.median(samples[CLIENT]) - floor
    return {"runs": runs, "commands": rows,
            "target": {"what": f"`{CLIENT}` median minus `{FLOOR}` median",
                       "limit_s": TARGET_S, "measured_s": round(over, 4),
                       "met": over <= TARGET_S}}


def print_table(result: dict[str, Any]) -> None:
    print(f"{'command':<36} {'median':>8} {'min':>8} {'max':>8} {'vs floor':>9}")
    for row in result["commands"]:
        print(f"{row['command']:<36} {row['median_s']:>7.3f}s {row['min_s']:>7.3f}s "
              f"{row['max_s']:>7.3f}s {row['over_floor_s']:>+8.3f}s")
    target = result["target"]
    print(f"\n{CLIENT}: {target['measured_s']:+.3f}s over the `{FLOOR}` floor "
          f"(target ≤ {target['limit_s']}s: {'met' if target['met'] else 'NOT met'}); "
          f"medians of {result['runs']} runs")
    client = next(r for r in result["commands"] if r["command"] == CLIENT)
    print(f"its error: {client['stderr']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="rounds counted (default 10)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "cli_startup.json",
                        help="results JSON (default bench/results/cli_startup.json)")
    parser.add_argument("--baseline-tree", help="also run every lorafold command from this "
                                                "checkout (PYTHONPATH), interleaved")
    args = parser.parse_args()
    load_before = os.getloadavg()
    result = measure(args.runs, args.baseline_tree)
    machine = {**machine_info(torch.get_num_threads(), libraries=("httpx",)),
               "load_average_before": [round(x, 2) for x in load_before],
               "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, **result}, indent=2) + "\n",
                        encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
