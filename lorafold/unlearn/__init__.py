"""Data-driven LoRA unlearning: forget a set of examples, keep the rest, report the evidence.

Entry point: `unlearn(...)` (lorafold.unlearn.run). Methods are declared once in
`METHODS` (lorafold.unlearn.objectives); data sets are parsed by `parse_jsonl`.
"""

from lorafold.unlearn.base_models import check_adapter_fits, load_base_model, resolve_base_model
from lorafold.unlearn.datasets import Example, TextDataset, parse_jsonl
from lorafold.unlearn.hyperparams import Hyperparams
from lorafold.unlearn.metrics import evaluate, mia_auc
from lorafold.unlearn.objectives import METHODS, get_method, resolve_hyperparams
from lorafold.unlearn.run import UnlearnResult, check_unlearn_request, unlearn

__all__ = [
    "METHODS",
    "Example",
    "Hyperparams",
    "TextDataset",
    "UnlearnResult",
    "check_adapter_fits",
    "check_unlearn_request",
    "evaluate",
    "get_method",
    "load_base_model",
    "mia_auc",
    "parse_jsonl",
    "resolve_base_model",
    "resolve_hyperparams",
    "unlearn",
]
