"""The named choices and defaults of a merge request, as plain values (no torch).

Defined here once and imported by the modules that use them (plan, methods, rules,
subspaces), so the client, the API schemas and every `--help` can read them without
loading the math.
"""

from __future__ import annotations

from typing import Literal

# The best mean normalised accuracy at r = 16 over bench/merge_quality.py's three regimes:
# ctm + iso 0.554, then mtc + iso and core + iso 0.535, ctm + tsv 0.518, mtc + ta 0.472
# (BENCHMARKS.md, "Merge quality").
DEFAULT_METHOD = "ctm"
DEFAULT_RULE = "iso"

# Output dtype names a request may give, and their safetensors dtype.
OUTPUT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}

# ctm: β = 0 measured best in bench/merge_quality.py (r = 16, mean over the three regimes,
# λ and the rule's knobs tuned at each β): ctm + iso 0.548 at β = 0 against 0.525 / 0.512
# / 0.507 / 0.510 at β = 0.25 / 0.5 / 0.75 / 1; mean over the five rules 0.474 against
# 0.462–0.465.
DEFAULT_BETA = 0.0

# ctm: how the shared subspaces are found (lorafold.merge.subspaces).
SubspaceMode = Literal["hooi", "hosvd"]
SUBSPACE_MODES: tuple[str, ...] = ("hooi", "hosvd")
DEFAULT_SUBSPACE: SubspaceMode = "hooi"

# ties / dare rules (lorafold.merge.rules).
DEFAULT_DENSITY = 0.5
DEFAULT_DROP = 0.3          # the CtM authors' default DARE drop rate

# rank "auto": every input keeps at least this share of its energy in every module, in
# CtM's shared subspaces at the chosen rank (lorafold.merge.auto_rank, docs/planning.md).
DEFAULT_MIN_ENERGY = 0.9

# Serving engines an output can be made to conform to (lorafold.adapters.serving has their
# rules; lorafold.merge.conform applies them to a merge's output).
SERVING_TARGETS: tuple[str, ...] = ("peft", "vllm", "lorax", "tgi")
