"""Merge speed: CtM against merge-then-compress, PEFT's add_weighted_adapter(svd) and the floor.

T = 8 random rank-16 PEFT adapters on Llama-2-7B module shapes (per layer four 4096×4096,
two 11008×4096, one 4096×11008) are written to a temporary directory. In one run, with
torch threads fixed, the script measures

- CtM end to end: `merge_adapters` (open, read, merge, report, write) on every layer, on
  the service's path (the inputs' sha256 known from their upload, not hashed again), and
  once per repetition on the CLI's path (the merge hashes its inputs for the lineage),
  each repetition between two GEMM throughput measurements and after a read of the inputs,
  so that each run is compared with the floor measured around it: read time (page cache
  warm, one read per tensor as the merge reads) + CtM's flop count at the best fp32 GEMM
  rate; each run is paired with one using
  HOSVD subspaces instead of HOOI (order alternating), for HOOI's cost end to end;
- CtM per module on every layer, as the executor runs it: load, `merge_ctm`, merge report,
  and `merge_ctm` with HOSVD subspaces on the same inputs (HOOI's sweeps and cost);
- `mtc` (lorafold's merge-then-compress) and PEFT's `add_weighted_adapter(
  combination_type="svd")` once per module on layer 0's seven modules (a full SVD of a
  dense m×n matrix takes tens of seconds on a few cores), with CtM timed on the same module
  right before and after each, so every ratio is measured side by side;
- peak RSS of a CtM merge in a fresh process, against output + one module's inputs + 500 MB;

then prints a table, the targets met or missed, and writes everything to a JSON file.

    .venv/bin/python bench/merge_speed.py            # full run, ~6.5 minutes on 2 cores
    .venv/bin/python bench/merge_speed.py --quick    # tiny shapes, under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import inspect
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from machine import command_line, machine_info, write_json

from lorafold.adapters.config import PEFT_PREFIX
from lorafold.adapters.reader import LoraAdapter, open_adapter
from lorafold.adapters.safetensors_header import read_header
from lorafold.adapters.tensor_file import TensorFile
from lorafold.merge import MergeRequest, MethodInput, merge_adapters
from lorafold.merge.executor import report_rows
from lorafold.merge.methods import DEFAULT_BETA, merge_cat, merge_ctm, merge_mtc
from lorafold.merge.rules import RULES, RuleParams
from lorafold.merge.subspaces import DEFAULT_SUBSPACE
from lorafold.merge.threads import ThreadChooser, adaptive_threads, module_ops
from lorafold.synthetic import llama_module_shapes, write_random_adapter

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "merge_speed.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MB = 1_000_000
T = TypeVar("T")
BaselineMode = Literal["shapes", "layer"]
Factors = tuple[torch.Tensor, torch.Tensor]
Shapes = Mapping[str, tuple[int, int]]


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and repetitions of one benchmark run."""

    layers: int = 32                # layers CtM runs on (end to end and per module)
    adapters: int = 8               # T
    rank: int = 16                  # rank of every input and of the output
    hidden: int = 4096
    intermediate: int = 11008
    heads: int = 32
    reps: int = 3                   # CtM end-to-end runs (each with its own floor)
    probe_reps: int = 3             # CtM runs before and after each baseline module
    baseline: BaselineMode = "layer"    # mtc/PEFT-svd once each on layer 0: all 7
                                        # modules, or the first module of each shape
    dtype: str = "float32"          # adapter dtype on disk
    threads: int = os.cpu_count() or 1
    gemm_shapes: tuple[tuple[int, int, int], ...] = (
        (11008, 128, 128), (4096, 128, 128), (4096, 4096, 4096))
    gemm_min_flops: float = 2e9     # work per GEMM timing
    rss_allowance_bytes: int = 500 * MB

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        return llama_module_shapes(self.layers, hidden=self.hidden,
                                   intermediate=self.intermediate)


QUICK = BenchConfig(layers=1, hidden=256, intermediate=688, heads=2, reps=1,
                    gemm_shapes=((688, 128, 128), (256, 128, 128), (512, 512, 512)),
                    gemm_min_flops=2e8)


def baseline_modules(shapes: Shapes, mode: BaselineMode) -> list[str]:
    """Layer 0's modules that mtc and PEFT-svd are timed on: one per shape, or all."""
    layer0 = [name for name in shapes if name.startswith("model.layers.0.")]
    if mode == "layer":
        return layer0
    first: dict[tuple[int, int], str] = {}
    for name in layer0:
        first.setdefault(shapes[name], name)
    return list(first.values())


# --------------------------------------------------------------------------- helpers

def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """Run `fn` once; its result and wall seconds."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def median_seconds(fn: Callable[[], object], reps: int) -> float:
    """Median wall time of `reps` calls of `fn`."""
    return statistics.median(timed(fn)[1] for _ in range(max(1, reps)))


def shape_label(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


# --------------------------------------------------------------------------- the floor

def gemm_gflops(cfg: BenchConfig) -> dict[str, float]:
    """fp32 torch.matmul GFLOP/s per (m, k, n) of `cfg.gemm_shapes`, median of 3 timings."""
    result = {}
    for m, k, n in cfg.gemm_shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        flops = 2.0 * m * k * n
        inner = max(1, int(cfg.gemm_min_flops / flops))   # calls per timing
        torch.matmul(a, b)

        def run(a: torch.Tensor = a, b: torch.Tensor = b, inner: int = inner) -> None:
            for _ in range(inner):
                torch.matmul(a, b)

        result[f"{m}x{k}@{k}x{n}"] = flops * inner / median_seconds(run, 3) / 1e9
    return result


def read_seconds(paths: Sequence[Path], reps: int) -> float:
    """Median time to read every tensor of every file the way the merge reads them, after a
    warming read: each tensor's bytes into a fresh tensor, in file order (`TensorFile`,
    its sha256 given, so no hashing). One huge read into one buffer, as this floor was
    measured before, ran 4–5× slower here than the kernel's page-cache copies of a few
    hundred KB at a time (`one_call_read_seconds`): it made the floor too generous."""
    files = [(path, read_header(path)) for path in paths]

    def read_all() -> None:
        for path, header in files:
            tensors = TensorFile(path, header.data_start, sha256="0" * 64)
            try:
                for info in sorted(header.tensors.values(), key=lambda t: t.offset):
                    tensors.read(info)
            finally:
                tensors.close()

    read_all()                               # the page cache is warm from here on
    return median_seconds(read_all, reps)


def one_call_read_seconds(paths: Sequence[Path], reps: int) -> float:
    """Median time to read every file in one call into one reused buffer (the old floor)."""
    sizes = [p.stat().st_size for p in paths]
    view = memoryview(bytearray(max(sizes)))

    def read_all() -> None:
        for path, size in zip(paths, sizes, strict=True):
            with path.open("rb", buffering=0) as f:
                done = 0
                while done < size:
                    got = f.readinto(view[done:size])
                    if not got:
                        raise OSError(f"{path}: short read")
                    done += got

    read_all()
    return median_seconds(read_all, reps)


def ctm_flops(m: int, n: int, ranks: Sequence[int], out_rank: int) -> dict[str, float]:
    """CtM's flops on one m×n module, by step, in float32 terms (the floor's reference).

    R = Σ r_t, k = output rank (assumes R ≤ min(m, n)). Householder QR of a p×R matrix
    costs 2pR² − ⅔R³ (geqrf) and forming its thin Q as much again (orgqr), both sides:
    4(m+n)R² − 8/3·R³. Cores K_t = R_B^(t) R_A^(t)ᵀ: Σ 2R²r_t = 2R³. Gram matrices
    Σ K_t K_tᵀ and Σ K_tᵀ K_t: 2·T·2R³. Two symmetric eigendecompositions with vectors:
    2·9R³ (Golub & Van Loan). Coordinates Pᵀ K_t Q: T(2kR² + 2k²R). U_r = Q_B P and
    V_r = Q_A Q: 2(m+n)Rk. Factor back: SVD of k×k ≈ 21k³, then B*, A*: 2(m+n)k².
    Element-wise work (scaling, stacking, the rule) is memory traffic, not counted.

    This is the reference count the floor has always used: the reference algorithm's
    work, not lorafold's. lorafold does the QR step as CholeskyQR from float32 Grams
    (2pR² per side, 5/8 of it as symmetric panels, Q left implicit) and works from R×R
    Grams instead of forming the cores: its large products are about a third of this
    count (T = 8, r = 16: 325 of 969 GFLOP on the 70B-shaped set, 81 of 200 on Llama-2-7B),
    so a ratio to this floor is not a ratio to lorafold's own flops (2.5–3× lower).
    """
    t, big_r, k = len(ranks), sum(ranks), out_rank
    return {
        "qr": 4.0 * (m + n) * big_r**2 - 8.0 / 3.0 * big_r**3,
        "cores": 2.0 * big_r**3,
        "gram": 4.0 * t * big_r**3,
        "eigh": 18.0 * big_r**3,
        "coordinates": t * (2.0 * k * big_r**2 + 2.0 * k**2 * big_r),
        "bases": 2.0 * (m + n) * big_r * k,
        "factor_back": 21.0 * k**3 + 2.0 * (m + n) * k**2,
    }


def module_flops(shape: tuple[int, int], cfg: BenchConfig) -> float:
    return sum(ctm_flops(*shape, [cfg.rank] * cfg.adapters, cfg.rank).values())


# --------------------------------------------------------------------------- CtM

def module_input(adapters: Sequence[LoraAdapter], name: str, rank: int,
                 subspace: str = DEFAULT_SUBSPACE) -> MethodInput:
    """The executor's input for one module: fp32 factors with B scaled, weights 1, rule ta."""
    factors = []
    for adapter in adapters:
        loaded = adapter.load(PEFT_PREFIX + name)
        factors.append((loaded.B.to(torch.float32) * loaded.scale, loaded.A.to(torch.float32)))
    params = RuleParams()
    ta = RULES["ta"].fn

    def rule(stack: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return ta(stack, weights, params, None)

    return MethodInput(factors=factors, weights=torch.ones(len(factors), dtype=torch.float64),
                       rank=rank, rule=rule, subspace=subspace)


@contextlib.contextmanager
def opened(dirs: Sequence[Path]) -> Iterator[list[LoraAdapter]]:
    """The adapters, opened (validated headers, lazy tensors) for the duration."""
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(open_adapter(d)) for d in dirs]


def weight_digests(dirs: Sequence[Path]) -> list[str]:
    """Each input's sha256 of adapter_model.safetensors: what the service holds for a blob
    it verified on upload and hands the merge (lorafold/service/attempts.py)."""
    digests = []
    for d in dirs:
        with (d / "adapter_model.safetensors").open("rb") as f:
            digests.append(hashlib.file_digest(f, "sha256").hexdigest())
    return digests


def ctm_end_to_end(dirs: Sequence[Path], out_dir: Path, rank: int,
                   subspace: str = DEFAULT_SUBSPACE, digests: Sequence[str] | None = None,
                   ) -> Path:
    """`merge_adapters` with method ctm, rule ta, weights 1: open, read, merge, write.

    With `digests` the inputs are opened with their sha256 given, as the service's worker
    opens them (nothing is hashed again); without, they are paths, as the CLI passes them,
    and the merge hashes them on the way (for the lineage)."""
    request = MergeRequest(method="ctm", rule="ta", rank=rank, subspace=subspace,
                           beta=DEFAULT_BETA)
    with contextlib.ExitStack() as stack:
        inputs: list[LoraAdapter | Path] = list(dirs) if digests is None else [
            stack.enter_context(open_adapter(d, label=str(d), sha256=digest))
            for d, digest in zip(dirs, digests, strict=True)]
        return merge_adapters(inputs, out_dir, request, device="cpu").out_dir


@dataclass(frozen=True)
class FloorRun:
    """One end-to-end CtM run (default subspaces, HOOI) and the floor measured around it
    (seconds, GFLOP/s), with a HOSVD run beside it (the order alternates between runs), both
    on the service's path (the inputs' sha256 known), and a HOOI run on the CLI's path (the
    merge hashes its inputs) after them."""

    e2e_s: float
    read_s: float                   # the inputs read as the merge reads them
    one_call_read_s: float          # the same bytes in one read per file (the old floor)
    gflops: float                   # best GEMM rate measured just before or just after
    floor_s: float
    ratio: float
    hosvd_s: float
    hooi_over_hosvd: float
    cli_s: float
    cli_ratio: float


def e2e_against_floor(dirs: Sequence[Path], out_dir: Path, cfg: BenchConfig,
                      flops: float) -> tuple[list[FloorRun], list[dict[str, float]]]:
    """CtM end to end `cfg.reps` times, each after a read of the inputs and between two
    GEMM measurements; also returns every GEMM measurement."""
    files = [d / "adapter_model.safetensors" for d in dirs]
    digests = weight_digests(dirs)
    gemms, runs = [gemm_gflops(cfg)], []
    for rep in range(cfg.reps):
        read_s = read_seconds(files, 1)
        one_call_s = one_call_read_seconds(files, 1)
        seconds = {}
        for mode in (("hooi", "hosvd") if rep % 2 == 0 else ("hosvd", "hooi")):
            _, seconds[mode] = timed(lambda mode=mode: ctm_end_to_end(
                dirs, out_dir / mode, cfg.rank, mode, digests))
        _, seconds["cli"] = timed(lambda: ctm_end_to_end(dirs, out_dir / "cli", cfg.rank))
        gemms.append(gemm_gflops(cfg))
        best = max(*gemms[-2].values(), *gemms[-1].values())
        floor_s = read_s + flops / (best * 1e9)
        runs.append(FloorRun(e2e_s=seconds["hooi"], read_s=read_s, one_call_read_s=one_call_s,
                             gflops=best,
                             floor_s=floor_s, ratio=seconds["hooi"] / floor_s,
                             hosvd_s=seconds["hosvd"],
                             hooi_over_hosvd=seconds["hooi"] / seconds["hosvd"],
                             cli_s=seconds["cli"], cli_ratio=seconds["cli"] / floor_s))
    return runs, gemms


@dataclass(frozen=True)
class ModuleTiming:
    """One module's CtM timings in seconds (one run each; medians are taken by shape)."""

    name: str
    shape: str
    load_s: float
    ctm_s: float
    report_s: float
    out_rank: int
    hosvd_s: float                  # merge_ctm with HOSVD subspaces on the same inputs
    sweeps: int                     # HOOI sweeps this module took


def time_ctm_modules(dirs: Sequence[Path], shapes: Shapes, rank: int) -> list[ModuleTiming]:
    """CtM on every module, as the executor runs it: load, `merge_ctm`, merge report.

    Each module runs once; the modules of one shape (4·layers, 2·layers, layers of them)
    are the repetitions its median is taken over.
    """
    timings = []
    with opened(dirs) as adapters, adaptive_threads():
        for name in sorted(shapes):
            with module_ops():
                inp, load_s = timed(partial(module_input, adapters, name, rank))
                ctm, ctm_s = timed(partial(merge_ctm, inp))
                _, report_s = timed(partial(report_rows, ctm, inp.factors))
                _, hosvd_s = timed(partial(merge_ctm, replace(inp, subspace="hosvd")))
            assert ctm.subspaces is not None
            timings.append(ModuleTiming(name=name, shape=shape_label(shapes[name]),
                                        load_s=load_s, ctm_s=ctm_s, report_s=report_s,
                                        out_rank=int(ctm.b.shape[1]), hosvd_s=hosvd_s,
                                        sweeps=ctm.subspaces.sweeps))
    return timings


def output_ranks(out_dir: Path) -> dict[str, int]:
    """Config r and the largest factor rank stored in a written adapter."""
    with open_adapter(out_dir) as adapter:
        return {"config_r": adapter.config.r,
                "max_module_rank": max(m.rank for m in adapter.modules.values())}


# --------------------------------------------------------------------------- side by side

@dataclass(frozen=True)
class Paired:
    """A baseline's seconds on one module, and CtM's on the same module around it."""

    seconds: float
    ctm_s: float                    # median of CtM runs just before and just after
    ratio: float


class CtmProbe:
    """Times `merge_ctm` on a module right before and right after a baseline runs on it."""

    def __init__(self, adapters: Sequence[LoraAdapter], rank: int, reps: int) -> None:
        self.adapters, self.rank, self.reps = adapters, rank, reps
        self.learnt: dict[str, ThreadChooser] = {}      # the executor's thread policy, kept
                                                        # across probes as across modules

    def runs(self, name: str) -> list[float]:
        inp = module_input(self.adapters, name, self.rank)
        with adaptive_threads(self.learnt):
            return [self.once(inp) for _ in range(self.reps)]

    @staticmethod
    def once(inp: MethodInput) -> float:
        with module_ops():
            return timed(lambda: merge_ctm(inp))[1]

    def around(self, name: str, fn: Callable[[], T]) -> tuple[T, Paired]:
        before = self.runs(name)
        result, seconds = timed(fn)
        ctm_s = statistics.median(before + self.runs(name))
        return result, Paired(seconds=seconds, ctm_s=ctm_s, ratio=seconds / ctm_s)


def time_mtc_modules(adapters: Sequence[LoraAdapter], probe: CtmProbe, names: Sequence[str],
                     rank: int, check: str) -> tuple[dict[str, Paired], dict[str, Factors]]:
    """`merge_mtc` once per module of `names`, paired with CtM; CtM's, mtc's and the exact
    (`cat`) factors of module `check`, each with delta = B @ A."""
    paired: dict[str, Paired] = {}
    kept: dict[str, Factors] = {}
    for name in names:
        inp = module_input(adapters, name, rank)
        mtc, paired[name] = probe.around(name, partial(merge_mtc, inp))
        if name == check:
            kept = {"ctm": merge_ctm(inp).factors, "mtc": mtc.factors,
                    "exact": merge_cat(inp).factors}
        del mtc
    return paired, kept


@dataclass(frozen=True)
class PeftTiming:
    load_s: float                   # PeftModel.from_pretrained + add/load_adapter × (T−1)
    total_s: float                  # add_weighted_adapter(..., "svd") on all its modules
    modules: dict[str, Paired]      # per-module time inside add_weighted_adapter, paired
    check: Factors                  # merged (B, A) of the check module, scale applied


def peft_svd(dirs: Sequence[Path], cfg: BenchConfig, modules: Sequence[str], check: str,
             probe: CtmProbe) -> PeftTiming:
    """Time PEFT's add_weighted_adapter(combination_type="svd", svd_rank=r), PEFT defaults.

    The base is a one-layer Llama with the real dims, created on the meta device and left
    uninitialised (`to_empty`): only the LoRA factors enter the merge. The same adapter
    files are loaded with PeftModel.from_pretrained / load_adapter, their configs' target
    modules narrowed to the leaf names of `modules` (layer 0), so PEFT merges exactly those;
    keys of other modules have no target and PEFT skips them. Per-module times come from
    wrapping the method PEFT calls once per module; CtM runs on that module around it.
    """
    from peft import LoraConfig, PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                         num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
                         num_hidden_layers=1, vocab_size=128, max_position_embeddings=128)
    with torch.device("meta"):
        base = LlamaForCausalLM(config)
    base = base.to_empty(device="cpu")
    names = [f"t{i}" for i in range(len(dirs))]
    leaves = sorted({module.rsplit(".", 1)[-1] for module in modules})

    def narrowed(path: Path) -> Any:
        return replace(LoraConfig.from_pretrained(str(path)), target_modules=leaves)

    def load() -> Any:
        model = PeftModel.from_pretrained(base, str(dirs[0]), adapter_name=names[0],
                                          config=narrowed(dirs[0]))
        for name, path in zip(names[1:], dirs[1:], strict=True):
            model.add_adapter(name, narrowed(path))
            model.load_adapter(str(path), adapter_name=name)
        return model

    model, load_s = timed(load)
    lora = model.base_model
    module_names = {id(module): name for name, module in lora.model.named_modules()}
    original = lora._svd_generalized_task_arithmetic_weighted_adapter
    signature = inspect.signature(original)
    per_module: dict[str, Paired] = {}

    def timed_call(*args: Any, **kwargs: Any) -> Any:
        name = module_names[id(signature.bind(*args, **kwargs).arguments["target"])]
        result, per_module[name] = probe.around(name, lambda: original(*args, **kwargs))
        return result

    lora._svd_generalized_task_arithmetic_weighted_adapter = timed_call
    _, total_s = timed(lambda: model.add_weighted_adapter(
        names, [1.0] * len(names), "merged", combination_type="svd", svd_rank=cfg.rank))
    target = lora.model.get_submodule(check)
    merged_b = target.lora_B["merged"].weight.detach().clone() * target.scaling["merged"]
    merged_a = target.lora_A["merged"].weight.detach().clone()
    return PeftTiming(load_s=load_s, total_s=total_s, modules=per_module,
                      check=(merged_b, merged_a))


def relative_difference(x: Factors, y: Factors) -> float:
    """‖B_x A_x − B_y A_y‖_F / ‖B_y A_y‖_F (dense; used on one module only)."""
    dx, dy = (b.double() @ a.double() for b, a in (x, y))
    return float(torch.linalg.matrix_norm(dx - dy) / torch.linalg.matrix_norm(dy))


# --------------------------------------------------------------------------- peak RSS

def proc_status() -> dict[str, int]:
    """VmRSS and VmHWM (peak) of this process in bytes, from Linux /proc."""
    fields = {}
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def rss_child(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Body of the RSS subprocess: one CtM merge; RSS after imports and the kernel's peak."""
    torch.set_num_threads(int(spec["threads"]))
    before = proc_status()
    _, seconds = timed(lambda: ctm_end_to_end([Path(d) for d in spec["dirs"]],
                                              Path(spec["out"]), int(spec["rank"])))
    return {"baseline_rss": before["VmRSS"], "peak_rss": proc_status()["VmHWM"],
            "merge_s": seconds}


def measure_rss(dirs: Sequence[Path], out_dir: Path, cfg: BenchConfig,
                interval: float = 0.005) -> dict[str, Any]:
    """Peak RSS of a CtM merge in a fresh process (which imports torch and lorafold only).

    The child reports its VmHWM (the kernel's exact peak); the parent samples it with
    psutil every `interval` s, which splits the peak into anonymous memory and file-backed
    pages (psutil's `shared`: shared libraries and any memory-mapped file; lorafold reads its
    inputs with plain reads, so they no longer count here).
    """
    import psutil

    spec = {"dirs": [str(d) for d in dirs], "out": str(out_dir), "rank": cfg.rank,
            "threads": cfg.threads}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--rss-child",
                             json.dumps(spec)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    peaks = {"sampled_peak_rss": 0, "sampled_peak_anon": 0, "sampled_peak_file": 0}
    child = psutil.Process(proc.pid)
    while proc.poll() is None:
        with contextlib.suppress(psutil.Error):
            info = child.memory_info()
            for key, value in (("sampled_peak_rss", info.rss),
                               ("sampled_peak_anon", info.rss - info.shared),
                               ("sampled_peak_file", info.shared)):
                peaks[key] = max(peaks[key], value)
        time.sleep(interval)
    stdout, stderr = proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"RSS subprocess failed ({proc.returncode}): {stderr[-2000:]}")
    return {**json.loads(stdout.strip().splitlines()[-1]), **peaks}


def rss_limit(shapes: Shapes, cfg: BenchConfig) -> dict[str, int]:
    """Output + one module's inputs (the largest) + allowance, in bytes of the adapter dtype."""
    itemsize = DTYPES[cfg.dtype].itemsize
    output = sum(cfg.rank * (m + n) for m, n in shapes.values()) * itemsize
    one_module = max(cfg.adapters * cfg.rank * (m + n) for m, n in shapes.values()) * itemsize
    return {"output": output, "one_module_inputs": one_module,
            "allowance": cfg.rss_allowance_bytes,
            "limit": output + one_module + cfg.rss_allowance_bytes}


# --------------------------------------------------------------------------- analysis

def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


@dataclass
class ShapeRow:
    """Per-module medians (ms) for one weight shape; baseline ratios are side by side."""

    shape: str
    per_layer: int
    samples: int                    # CtM modules of this shape (all layers)
    ctm_ms: float
    ctm_load_ms: float
    ctm_report_ms: float
    mtc_ms: float | None
    mtc_ctm_ms: float | None        # CtM around the mtc runs
    peft_svd_ms: float | None
    peft_ctm_ms: float | None       # CtM around the PEFT runs
    flops: float
    floor_ms: float
    mtc_over_ctm: float | None = field(init=False)
    peft_over_ctm: float | None = field(init=False)
    ctm_over_floor: float = field(init=False)

    def __post_init__(self) -> None:
        self.mtc_over_ctm = ratio(self.mtc_ms, self.mtc_ctm_ms)
        self.peft_over_ctm = ratio(self.peft_svd_ms, self.peft_ctm_ms)
        self.ctm_over_floor = (self.ctm_load_ms + self.ctm_ms) / self.floor_ms


def paired_ms(paired: Mapping[str, Paired], names: Sequence[str],
              attr: str) -> float | None:
    return median_or_none([getattr(paired[n], attr) * 1e3 for n in names if n in paired])


def shape_rows(timings: Sequence[ModuleTiming], mtc: Mapping[str, Paired],
               peft: Mapping[str, Paired], shapes: Shapes, cfg: BenchConfig,
               read_bytes_per_s: float, gflops: float) -> list[ShapeRow]:
    """Group per-module timings by shape; the floor per module uses its own input bytes."""
    itemsize = DTYPES[cfg.dtype].itemsize
    rows = []
    for shape in dict.fromkeys(shapes.values()):
        label = shape_label(shape)
        group = [t for t in timings if t.shape == label]
        names = [t.name for t in group]
        flops = module_flops(shape, cfg)
        read_s = cfg.adapters * cfg.rank * sum(shape) * itemsize / read_bytes_per_s
        rows.append(ShapeRow(
            shape=label, per_layer=len(group) // cfg.layers, samples=len(group),
            ctm_ms=statistics.median(t.ctm_s for t in group) * 1e3,
            ctm_load_ms=statistics.median(t.load_s for t in group) * 1e3,
            ctm_report_ms=statistics.median(t.report_s for t in group) * 1e3,
            mtc_ms=paired_ms(mtc, names, "seconds"), mtc_ctm_ms=paired_ms(mtc, names, "ctm_s"),
            peft_svd_ms=paired_ms(peft, names, "seconds"),
            peft_ctm_ms=paired_ms(peft, names, "ctm_s"),
            flops=flops, floor_ms=(read_s + flops / (gflops * 1e9)) * 1e3))
    return rows


def layer_totals(rows: Sequence[ShapeRow]) -> dict[str, float | None]:
    """Per-layer sums of the shape medians (each times its modules per layer), and ratios."""
    def total(attr: str) -> float | None:
        values = [getattr(r, attr) for r in rows]
        if any(v is None for v in values):
            return None
        return sum(v * r.per_layer for v, r in zip(values, rows, strict=True))

    out = {attr: total(attr) for attr in (
        "ctm_ms", "ctm_load_ms", "ctm_report_ms", "mtc_ms", "mtc_ctm_ms", "peft_svd_ms",
        "peft_ctm_ms", "flops", "floor_ms")}
    out["mtc_over_ctm"] = ratio(out["mtc_ms"], out["mtc_ctm_ms"])
    out["peft_over_ctm"] = ratio(out["peft_svd_ms"], out["peft_ctm_ms"])
    load_and_ctm = [out["ctm_ms"], out["ctm_load_ms"]]
    out["ctm_over_floor"] = ratio(sum(v for v in load_and_ctm if v is not None),
                                  out["floor_ms"])
    return out


def floor_summary(runs: Sequence[FloorRun], gemms: Sequence[Mapping[str, float]],
                  read_bytes: int, flops: float, layers: int,
                  ctm_layer_ms: float | None) -> dict[str, Any]:
    """Medians over the end-to-end runs of each one's floor and ratio to it."""
    best = max(max(g.values()) for g in gemms)
    read_s = statistics.median(r.read_s for r in runs)
    floor_s = statistics.median(r.floor_s for r in runs)
    return {
        "runs": [asdict(r) for r in runs], "gemm_gflops": list(gemms), "gflops_best": best,
        "read_s": read_s, "read_bytes": read_bytes, "read_gb_per_s": read_bytes / read_s / 1e9,
        "one_call_read_s": statistics.median(r.one_call_read_s for r in runs),
        "flops": flops, "floor_s": floor_s, "floor_per_layer_s": floor_s / layers,
        "e2e_over_floor": statistics.median(r.ratio for r in runs),
        "cli_e2e_over_floor": statistics.median(r.cli_ratio for r in runs),
        "hooi_over_hosvd": statistics.median(r.hooi_over_hosvd for r in runs),
        "ctm_compute_over_flop_floor": ratio(ctm_layer_ms, flops / layers / best / 1e6),
    }


def target(name: str, measured: float | None, threshold: float, *, at_most: bool,
           note: str) -> dict[str, Any]:
    """One pass/fail line; a missing measurement fails."""
    met = measured is not None and (measured <= threshold if at_most else measured >= threshold)
    return {"name": name, "measured": measured, "threshold": threshold,
            "comparison": "<=" if at_most else ">=", "met": met, "note": note}


def evaluate_targets(rows: Sequence[ShapeRow], layer: Mapping[str, float | None],
                     e2e_layer_s: float, floor: Mapping[str, Any],
                     rss: Mapping[str, Any], limit: Mapping[str, int]) -> list[dict[str, Any]]:
    """The targets: ≥100× PEFT-svd, ≤2× the floor (issue 14), peak RSS within the formula."""
    worst = min((r.peft_over_ctm for r in rows if r.peft_over_ctm is not None), default=None)
    return [
        target("PEFT-svd / CtM compute, worst shape", worst, 100.0, at_most=False,
               note="per module, CtM timed on the same module around each PEFT module"),
        target("PEFT-svd / CtM end to end, per layer",
               ratio(layer["peft_svd_ms"], e2e_layer_s * 1e3), 100.0, at_most=False,
               note="PEFT's per-layer compute vs merge_adapters wall time per layer"),
        target("CtM end to end / floor", floor["e2e_over_floor"], 2.0, at_most=True,
               note="median over runs, the service's path (inputs' sha256 known); floor = "
                    "read + CtM flops at the best GEMM rate measured around each run"),
        target("CtM end to end, HOOI / HOSVD", floor["hooi_over_hosvd"], 1.3, at_most=True,
               note="median over runs of the paired ratio (the two run back to back, order "
                    "alternating)"),
        target("CtM peak RSS (bytes)", float(rss["peak_rss"]), float(limit["limit"]),
               at_most=True, note="VmHWM of a fresh process running merge_adapters"),
    ]


# --------------------------------------------------------------------------- output

def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def table_line(label: str, count: int, row: Mapping[str, Any]) -> str:
    return (f"{label:<12}{count:>8}{fmt(row['ctm_ms']):>9}{fmt(row['ctm_load_ms']):>9}"
            f"{fmt(row['ctm_report_ms']):>10}{fmt(row['mtc_ms'], 0):>11}"
            f"{fmt(row['peft_svd_ms'], 0):>13}{fmt(row['mtc_over_ctm'], 0):>9}"
            f"{fmt(row['peft_over_ctm'], 0):>10}{fmt(row['floor_ms'], 2):>10}"
            f"{fmt(row['ctm_over_floor'], 1):>16}")


def render(result: Mapping[str, Any]) -> str:
    """The plain-text report printed to stdout."""
    cfg, machine, lines = result["config"], result["machine"], []
    lines.append(f"command: {result['command']}")
    lines.append(f"machine: {machine['cpu_model']}, {machine['cores']} cores, torch "
                 f"{machine['torch']} ({machine['torch_threads']} threads), peft "
                 f"{machine.get('peft', '-')}, transformers {machine.get('transformers', '-')}; "
                 f"load average {machine['loadavg_before'][0]:.1f} before, "
                 f"{machine['loadavg_after'][0]:.1f} after")
    lines.append(f"inputs: T={cfg['adapters']} random adapters, rank {cfg['rank']}, "
                 f"{cfg['dtype']} safetensors in a temp dir (page cache warm); CtM on "
                 f"{cfg['layers']} layers x 7 modules; mtc and PEFT-svd once each on "
                 f"{', '.join(result['baseline'])}")
    if (cfg["hidden"], cfg["intermediate"]) != (4096, 11008):
        lines.append("NOTE: not Llama-2-7B shapes (a smoke run): timings and targets say "
                     "nothing about the real sizes")
    header = (f"{'shape':<12}{'n/layer':>8}{'CtM ms':>9}{'load ms':>9}{'report ms':>10}"
              f"{'mtc ms':>11}{'PEFT-svd ms':>13}{'mtc/CtM':>9}{'PEFT/CtM':>10}"
              f"{'floor ms':>10}{'(CtM+load)/fl':>16}")
    lines += ["", header, "-" * len(header)]
    lines += [table_line(r["shape"], r["per_layer"], r) for r in result["shapes"]]
    lines.append(table_line("layer", 7, result["per_layer"]))
    lines.append("CtM/load/report: per-module medians over all layers (merge_ctm compute; "
                 "reading + fp32 upcast of the inputs; merge report). mtc/CtM, PEFT/CtM: CtM "
                 "timed on the same module just before and after each baseline run.")
    e2e, peft, floor = result["ctm_end_to_end"], result["peft"], result["floor"]
    lines.append("")
    lines.append(f"CtM end to end (merge_adapters, {cfg['layers']} layers): median "
                 f"{e2e['median_s']:.2f} s of {[round(s, 2) for s in e2e['runs_s']]} = "
                 f"{e2e['per_layer_s'] * 1e3:.0f} ms/layer, {e2e['per_module_ms']:.1f} ms/module")
    lines.append(f"PEFT: loading {cfg['adapters']} adapters {peft['load_s']:.1f} s; "
                 f"add_weighted_adapter(svd) {peft['total_s']:.1f} s for {peft['modules']} "
                 f"modules (PEFT defaults: svd_full_matrices=True)")
    rates = ", ".join(f"{r['gflops']:.0f}" for r in floor["runs"])
    ratios = ", ".join(f"{r['ratio']:.2f}" for r in floor["runs"])
    lines.append(f"floor: read {floor['read_bytes'] / MB:.1f} MB in {floor['read_s'] * 1e3:.1f} "
                 f"ms ({floor['read_gb_per_s']:.2f} GB/s, page cache warm, read as the merge "
                 f"reads: one read per tensor; one read per file took "
                 f"{floor['one_call_read_s'] * 1e3:.1f} ms) + "
                 f"{floor['flops'] / 1e9:.1f} GFLOP at the best GEMM rate around each run "
                 f"({rates} GFLOP/s) = "
                 f"{floor['floor_s'] * 1e3:.0f} ms ({floor['floor_per_layer_s'] * 1e3:.1f} "
                 f"ms/layer)")
    modules = result["modules"]
    compute = statistics.median(t["ctm_s"] / t["hosvd_s"] for t in modules)
    sweeps = [t["sweeps"] for t in modules]
    lines.append(f"CtM options: rule ta, β {result['ctm_beta']:g} (the default), weights 1")
    lines.append(f"HOOI / HOSVD: end to end {fmt(floor['hooi_over_hosvd'], 2)} (per run: "
                 + ", ".join(f"{r['hooi_over_hosvd']:.2f}" for r in floor["runs"])
                 + f"); merge_ctm per module, median {compute:.2f}; HOOI sweeps per module "
                 f"median {statistics.median(sweeps):.0f}, max {max(sweeps)}")
    lines.append(f"CtM end to end / floor: {fmt(floor['e2e_over_floor'], 2)} (per run: "
                 f"{ratios}; the service's path, sha256 known); on the CLI's path (the merge "
                 f"hashes its inputs) {fmt(floor['cli_e2e_over_floor'], 2)} (per run: "
                 + ", ".join(f"{r['cli_ratio']:.2f}" for r in floor["runs"])
                 + "); CtM compute / "
                 f"flop floor at {floor['gflops_best']:.0f} GFLOP/s: "
                 f"{fmt(floor['ctm_compute_over_flop_floor'], 2)}")
    rss, limit = result["rss"], result["rss_limit"]
    lines.append(f"peak RSS (CtM merge, fresh process): {rss['peak_rss'] / MB:.0f} MB; after "
                 f"imports {rss['baseline_rss'] / MB:.0f} MB; sampled peaks: anonymous "
                 f"{rss['sampled_peak_anon'] / MB:.0f} MB, file-backed (libraries, mapped files) "
                 f"{rss['sampled_peak_file'] / MB:.0f} MB. Limit {limit['limit'] / MB:.0f} MB = "
                 f"output {limit['output'] / MB:.1f} + one module's inputs "
                 f"{limit['one_module_inputs'] / MB:.1f} + {limit['allowance'] / MB:.0f}")
    corr = result["correctness"]
    lines.append(f"correctness: output r={corr['config_r']}, max module rank "
                 f"{corr['max_module_rank']} (<= {cfg['rank']}); on {corr['module']}: "
                 f"|dCtM-dPEFT|/|dPEFT| = {corr['ctm_vs_peft']:.3f}, |dmtc-dPEFT|/|dPEFT| = "
                 f"{corr['mtc_vs_peft']:.1e}; error to sum of deltas: CtM "
                 f"{corr['ctm_vs_exact']:.4f}, mtc {corr['mtc_vs_exact']:.4f}")
    lines.append("")
    for t in result["targets"]:
        threshold = fmt(t["threshold"], 1 if t["threshold"] < 10 else 0)
        lines.append(f"{'MET   ' if t['met'] else 'MISSED'} {t['name']}: "
                     f"{fmt(t['measured'], 2)} {t['comparison']} {threshold} ({t['note']})")
    stages = ", ".join(f"{k} {v:.0f} s (load {result['stage_load_after'][k]:.1f})"
                       for k, v in result["stage_seconds"].items())
    lines.append(f"wall time {result['wall_time_s']:.0f} s; stages: {stages}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver

def write_inputs(root: Path, shapes: Shapes, cfg: BenchConfig) -> list[Path]:
    """T random PEFT adapters (seeds 0..T−1) under `root`."""
    return [write_random_adapter(root / f"adapter{i}", shapes, rank=cfg.rank, seed=i,
                                 dtype=DTYPES[cfg.dtype]) for i in range(cfg.adapters)]


class Stages:
    """Runs the benchmark's stages, recording each one's wall seconds and the 1-minute load
    average at its end (this process alone adds about `threads` while it computes)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.load_after: dict[str, float] = {}

    def run(self, name: str, fn: Callable[[], T]) -> T:
        result, self.seconds[name] = timed(fn)
        self.load_after[name] = os.getloadavg()[0]
        return result


def run_benchmark(cfg: BenchConfig, command: str, workdir: Path | None = None) -> dict[str, Any]:
    """Run every measurement (in this order) and return the JSON-ready result."""
    started, load_before = time.perf_counter(), os.getloadavg()
    torch.set_num_threads(cfg.threads)
    shapes = cfg.module_shapes()
    baseline = baseline_modules(shapes, cfg.baseline)
    # The deltas are compared on the smallest baseline module (layer 0's q_proj).
    check = min(baseline, key=lambda name: shapes[name][0] * shapes[name][1])
    total_flops = sum(module_flops(shape, cfg) for shape in shapes.values())
    stages = Stages()
    with tempfile.TemporaryDirectory(prefix="lorafold-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        dirs = stages.run("write_inputs", lambda: write_inputs(root / "inputs", shapes, cfg))
        read_bytes = sum((d / "adapter_model.safetensors").stat().st_size for d in dirs)
        runs, gemms = stages.run("ctm_end_to_end_and_floor", lambda: e2e_against_floor(
            dirs, root / "ctm", cfg, total_flops))
        timings = stages.run("ctm_per_module", lambda: time_ctm_modules(dirs, shapes, cfg.rank))
        with opened(dirs) as adapters:
            probe = CtmProbe(adapters, cfg.rank, cfg.probe_reps)
            mtc, kept = stages.run("mtc_per_module", lambda: time_mtc_modules(
                adapters, probe, baseline, cfg.rank, check))
            peft = stages.run("peft_svd", lambda: peft_svd(dirs, cfg, baseline, check, probe))
        gc.collect()                        # free the PEFT model before the RSS run
        rss = stages.run("rss_subprocess", lambda: measure_rss(dirs, root / "rss", cfg))
        ranks = output_ranks(root / "rss")
    floor_read_s = statistics.median(r.read_s for r in runs)
    rows = shape_rows(timings, mtc, peft.modules, shapes, cfg, read_bytes / floor_read_s,
                      max(max(g.values()) for g in gemms))
    layer = layer_totals(rows)
    floor = floor_summary(runs, gemms, read_bytes, total_flops, cfg.layers, layer["ctm_ms"])
    e2e_s = statistics.median(r.e2e_s for r in runs)
    e2e: dict[str, Any] = {"median_s": e2e_s, "runs_s": [r.e2e_s for r in runs],
                           "per_layer_s": e2e_s / cfg.layers,
                           "per_module_ms": e2e_s / len(shapes) * 1e3}
    limit = rss_limit(shapes, cfg)
    correctness = {**ranks, "module": check,
                   "all_module_ranks_ok": all(t.out_rank <= cfg.rank for t in timings),
                   "ctm_vs_peft": relative_difference(kept["ctm"], peft.check),
                   "mtc_vs_peft": relative_difference(kept["mtc"], peft.check),
                   "ctm_vs_exact": relative_difference(kept["ctm"], kept["exact"]),
                   "mtc_vs_exact": relative_difference(kept["mtc"], kept["exact"])}
    result: dict[str, Any] = {
        "command": command, "config": asdict(cfg), "ctm_beta": DEFAULT_BETA,
        "machine": {**machine_info(cfg.threads, ("transformers", "peft", "safetensors")),
                    "loadavg_before": load_before, "loadavg_after": os.getloadavg()},
        "flop_formula": inspect.getdoc(ctm_flops),
        "flops_by_step": {shape_label(s): ctm_flops(*s, [cfg.rank] * cfg.adapters, cfg.rank)
                          for s in dict.fromkeys(shapes.values())},
        "baseline": baseline, "shapes": [asdict(r) for r in rows], "per_layer": layer,
        "ctm_end_to_end": e2e, "floor": floor,
        "mtc": {name: asdict(p) for name, p in mtc.items()},
        "peft": {"load_s": peft.load_s, "total_s": peft.total_s, "modules": len(peft.modules),
                 "per_module": {name: asdict(p) for name, p in peft.modules.items()},
                 "svd_full_matrices": True},
        "rss": rss, "rss_limit": limit, "correctness": correctness,
        "modules": [asdict(t) for t in timings],
    }
    result["targets"] = evaluate_targets(rows, layer, e2e["per_layer_s"], floor, rss, limit)
    result["stage_seconds"] = stages.seconds
    result["stage_load_after"] = stages.load_after
    result["wall_time_s"] = time.perf_counter() - started
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--layers", type=int, help="layers CtM runs on (default 32; quick 1)")
    parser.add_argument("--reps", type=int, help="CtM end-to-end repetitions (default 3)")
    parser.add_argument("--baseline", choices=("shapes", "layer"),
                        help="modules of layer 0 that mtc and PEFT-svd are timed on, once "
                             "each: all 7 (default) or one per shape")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="adapter dtype on disk")
    parser.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    parser.add_argument("--out", type=Path,
                        help=f"JSON output (default bench/results/{DEFAULT_OUT.name}; "
                             "none with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes (256/688), 1 layer, 1 repetition: a smoke run")
    parser.add_argument("--rss-child", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> BenchConfig:
    cfg = QUICK if args.quick else BenchConfig()
    overrides = {key: getattr(args, key) for key in
                 ("layers", "reps", "baseline", "dtype", "threads")
                 if getattr(args, key) is not None}
    cfg = replace(cfg, **overrides)
    if cfg.layers < 1 or cfg.reps < 1 or cfg.threads < 1:
        raise SystemExit("--layers, --reps and --threads must be at least 1")
    return cfg


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence transformers' and PEFT's info chatter; warnings still show."""
    levels = {name: logging.getLogger(name).level for name in ("transformers", "peft")}
    for name in levels:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if args.rss_child:
        print(json.dumps(rss_child(json.loads(args.rss_child))))
        return None
    cfg = config_from(args)
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} cores before the run: "
              "other processes will slow parts of it unevenly", file=sys.stderr)
    command = command_line(__file__, argv)
    with quiet_libraries():
        result = run_benchmark(cfg, command)
    print(render(result))
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_OUT)
    if out is not None:
        write_json(result, out)
        print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
