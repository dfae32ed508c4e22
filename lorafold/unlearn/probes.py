"""Robustness probes for an unlearned adapter: does the forgotten knowledge come back cheaply?

Unlearning that only hides knowledge is undone by cheap attacks, so a finished job may run
two of them on the adapter it wrote (both optional, both bounded in time):

- relearning (Hu et al. 2024, arXiv 2406.13356; Lynch et al. 2024, arXiv 2402.16835): a
  few fine-tuning steps on one half of the forget set. The other half is never shown, so
  accuracy gained there means the facts were hidden, not removed.
- quantization (Zhang et al. 2024, arXiv 2410.16454): round-to-nearest quantization of the
  weights with the adapter folded in. An unlearning change smaller than the quantization
  step is rounded away and the original answers return.

Both leave the model as they found it (weights, requires_grad flags, train/eval modes) and
return plain JSON-ready dicts. Accuracy is token accuracy on completion tokens
(`lorafold.unlearn.metrics`). `run_probes` runs the ones a job's hyperparameters turn on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from lorafold.errors import InvalidAdapter, InvalidRequest, NumericalError
from lorafold.unlearn.datasets import (
    Batch,
    Encoded,
    TextDataset,
    Tokenizer,
    encode,
    make_batches,
    pad_id_of,
)
from lorafold.unlearn.metrics import autocast_for, logits_of, measure, model_device, token_stats

if TYPE_CHECKING:
    from lorafold.unlearn.hyperparams import Hyperparams

logger = logging.getLogger(__name__)

EVAL_BATCH_SIZE = 16
DEFAULT_GROUP_SIZE = 128


# --- quantization -------------------------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Symmetric round-to-nearest with one absmax scale per group of `group_size` inputs.

    Groups run along the last (input) dimension: a row narrower than `group_size` is one
    group, and when the width is not a multiple of it the last group is shorter. Levels are
    -(2^(bits-1) - 1) .. 2^(bits-1) - 1 times the scale (symmetric, so zero stays exact).
    The math is fp32; the result has the input's dtype and shape.
    """
    if bits < 2:
        raise ValueError(f"bits must be at least 2, got {bits}")
    if group_size < 1:
        raise ValueError(f"group_size must be positive, got {group_size}")
    qmax = 2 ** (bits - 1) - 1
    width = weight.shape[-1]
    padded = F.pad(weight.float(), (0, (-width) % group_size))  # zeros leave absmax alone
    groups = padded.reshape(*weight.shape[:-1], -1, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero groups stay 0
    quantized = torch.round(groups / scale).clamp(-qmax, qmax) * scale
    return quantized.reshape(padded.shape)[..., :width].to(weight.dtype)


def _lora_layers(model: nn.Module) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _check_foldable(layer: Any) -> None:
    """W + get_delta_weight is the whole adapter only for plain, unmerged LoRA."""
    if layer.merged:
        raise InvalidAdapter("quantization probe: the adapter is merged into the weights; "
                             "unmerge it first", code="unsupported_adapter")
    for name in layer.active_adapters:
        if layer.use_dora.get(name) or name in getattr(layer, "lora_variant", {}) \
                or getattr(layer, "lora_bias", {}).get(name):
            raise InvalidAdapter(f"quantization probe: adapter {name!r} uses DoRA, another "
                                 "LoRA variant or lora_bias; only plain LoRA can be folded",
                                 code="unsupported_adapter")


def _quantization_targets(model: nn.Module) -> list[tuple[nn.Linear, Any]]:
    """Every nn.Linear of the model but the output head, each with its LoRA wrapper or None.

    The LoRA factors (lora_A, lora_B, ...) are nn.Linear too; they are the adapter, folded
    into the weight they wrap, so they are not targets themselves.
    """
    head = model.get_output_embeddings()  # type: ignore[operator]
    head_weight = getattr(head, "weight", None)
    wrappers: dict[int, Any] = {}
    factors: set[int] = set()
    for layer in _lora_layers(model):
        _check_foldable(layer)
        wrappers[id(layer.get_base_layer())] = layer
        for attr in layer.adapter_layer_names:
            factors.update(id(m) for m in getattr(layer, attr).modules())
    return [(m, wrappers.get(id(m))) for m in model.modules()
            if isinstance(m, nn.Linear) and id(m) not in factors and m.weight is not head_weight]


def _folded_weight(linear: nn.Linear, layer: Any) -> torch.Tensor:
    """W + ΔW of the active adapters (fp32): the weight the layer's forward amounts to."""
    weight = linear.weight.float()
    if layer is None or layer.disable_adapters:
        return weight
    for name in layer.active_adapters:
        if name in layer.lora_A:
            weight = weight + layer.get_delta_weight(name).float()
    return weight


@torch.no_grad()
def _quantize_folded(targets: Sequence[tuple[nn.Linear, Any]], bits: int,
                     group_size: int) -> None:
    """Overwrite each target weight with quantize(W + ΔW); the adapter must then be disabled."""
    for linear, layer in targets:
        linear.weight.copy_(quantize_rtn(_folded_weight(linear, layer), bits, group_size))


# --- shared plumbing ----------------------------------------------------------------------


@contextmanager
def _left_as_found(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; every module's mode and every requires_grad flag restored on exit.

    PEFT's adapter switches (disable_adapter included) set requires_grad on the active
    adapter, even one loaded with is_trainable=False, hence the flags are restored too.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


def _cpu_copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to("cpu", copy=True) for t in tensors]


@torch.no_grad()
def _copy_back(tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    for tensor, value in zip(tensors, saved, strict=True):
        tensor.copy_(value)


def _eval_batches(tokenizer: Tokenizer, dataset: TextDataset, max_length: int) -> list[Batch]:
    return make_batches(encode(tokenizer, dataset, max_length=max_length),
                        batch_size=EVAL_BATCH_SIZE, pad_id=pad_id_of(tokenizer))


# --- quantization probe -------------------------------------------------------------------


def _accuracies(model: nn.Module, sets: Mapping[str, list[Batch]]) -> dict[str, float]:
    return {f"{name}_accuracy": measure(model, batches).accuracy for name, batches in sets.items()}


def quantization_probe(model: Any, tokenizer: Tokenizer, forget: TextDataset,
                       retain: TextDataset | None = None, *, bits: Sequence[int] = (8, 4),
                       group_size: int = DEFAULT_GROUP_SIZE, time_limit_s: float = 120.0,
                       max_length: int = 512) -> dict[str, Any]:
    """Forget (and retain) accuracy after RTN quantization of W + ΔW, per bit width.

    `model` is a PeftModel whose active adapter is the one to probe. Every nn.Linear but the
    output head is quantized (see `quantize_rtn`; layers narrower than `group_size` get one
    group per row), always from the full-precision weights, which are kept on the CPU and
    put back after each bit width. Retain accuracy shows the quantized model still works.
    Bit widths not started within `time_limit_s` are skipped and ``timed_out`` is true.
    Layers of other types (Conv1D, already-quantized bitsandbytes layers) are left as they
    are; a merged adapter, DoRA or lora_bias is refused (InvalidAdapter), as W + ΔW would
    not be what the adapter computes.

    Returns ``{"group_size", "timed_out", "full_precision": {"forget_accuracy",
    "retain_accuracy"?}, "bits": {"8": {...}, "4": {...}}}``.
    """
    start = time.monotonic()
    for b in bits:
        if b < 2:
            raise InvalidRequest(f"quantization probe: bits must be at least 2, got {b}")
    if group_size < 1:
        raise InvalidRequest(f"quantization probe: group_size must be positive, got {group_size}")
    sets = {"forget": _eval_batches(tokenizer, forget, max_length)}
    if retain is not None and len(retain):
        sets["retain"] = _eval_batches(tokenizer, retain, max_length)
    report: dict[str, Any] = {"group_size": group_size, "timed_out": False, "bits": {}}
    with _left_as_found(model):
        targets = _quantization_targets(model)
        report["full_precision"] = _accuracies(model, sets)
        weights = [linear.weight for linear, _ in targets]
        saved = _cpu_copies(weights)
        for b in bits:
            if time.monotonic() - start >= time_limit_s:
                report["timed_out"] = True
                logger.warning("quantization probe: time limit of %.0f s reached; skipped "
                               "%d-bit and later", time_limit_s, b)
                break
            try:
                _quantize_folded(targets, b, group_size)
                with model.disable_adapter():  # its delta is in the weights now
                    report["bits"][str(b)] = _accuracies(model, sets)
            finally:
                _copy_back(weights, saved)
    return report


# --- relearning probe ---------------------------------------------------------------------


def split_for_relearning(forget: TextDataset, *,
                         seed: int) -> tuple[TextDataset, TextDataset]:
    """(relearn, untouched): a seeded half of the examples, and the rest in dataset order.

    The relearn half gets the smaller share when the count is odd.
    """
    if len(forget) < 2:
        raise InvalidRequest("relearning probe: the forget set needs at least 2 examples, "
                             f"got {len(forget)}")
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(seed)).tolist()
    half = len(forget) // 2

    def subset(indices: list[int], name: str) -> TextDataset:
        return TextDataset([forget[i] for i in sorted(indices)], name=name)

    return subset(order[:half], "relearn"), subset(order[half:], "untouched")


def _active_lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The factors of the active adapter(s), whatever their requires_grad says now."""
    params: list[nn.Parameter] = []
    for layer in _lora_layers(model):
        for attr in layer.adapter_layer_names:
            container = getattr(layer, attr)
            for name in layer.active_adapters:
                if name in container:
                    entry = container[name]
                    params.extend(entry.parameters() if isinstance(entry, nn.Module)
                                  else [entry])
    if not params:
        raise InvalidAdapter("relearning probe: the model has no active LoRA adapter",
                             code="unsupported_adapter")
    return params


def _set_only_trainable(model: nn.Module, params: Sequence[nn.Parameter]) -> None:
    for param in model.parameters():
        param.requires_grad_(False)
    for param in params:
        param.requires_grad_(True)


def _epochs(items: Sequence[Encoded], *, batch_size: int, pad_id: int,
            generator: torch.Generator) -> Iterator[Batch]:
    """Endless reshuffled epochs, reproducible from the generator's seed."""
    while True:
        yield from make_batches(items, batch_size=batch_size, pad_id=pad_id, generator=generator)


def _relearn(model: nn.Module, params: Sequence[nn.Parameter], batches: Iterator[Batch], *,
             steps: int, lr: float, deadline: float) -> int:
    """Up to `steps` AdamW steps on completion-token NLL; stops at `deadline` (monotonic)."""
    device = model_device(model)
    _set_only_trainable(model, params)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    done = 0
    try:
        while done < steps and time.monotonic() < deadline:
            batch = next(batches).to(device)
            with autocast_for(device):
                loss = token_stats(logits_of(model, batch), batch.labels).nll.mean()
            if not torch.isfinite(loss):
                raise NumericalError(f"relearning probe: loss became {float(loss.detach())} "
                                     f"at step {done + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
    return done


def _accuracy_and_nll(model: nn.Module, batches: list[Batch]) -> dict[str, float]:
    metrics = measure(model, batches)
    return {"accuracy": metrics.accuracy, "nll": metrics.mean_nll}


def relearning_probe(model: Any, tokenizer: Tokenizer, forget: TextDataset, *, steps: int,
                     lr: float = 1e-3, batch_size: int = 8, seed: int = 0,
                     time_limit_s: float = 120.0, max_length: int = 512) -> dict[str, Any]:
    """Accuracy and NLL on the untouched half of `forget`, before and after relearning.

    The active adapter's LoRA factors are fine-tuned (AdamW, no weight decay, eval mode so
    the steps are deterministic) on the relearn half only (`split_for_relearning`), then
    restored with their requires_grad flags. A model that never learned the untouched facts
    gains nothing there; one that only hid them gets them back. Stops early at
    `time_limit_s` with ``timed_out`` true and ``steps`` the number done.

    Returns ``{"steps", "timed_out", "relearn_examples", "untouched_examples",
    "before": {"accuracy", "nll"}, "after": {...}, "recovered_accuracy"}`` where
    ``recovered_accuracy`` is after minus before.
    """
    start = time.monotonic()
    if steps < 0 or batch_size < 1 or lr <= 0:
        raise InvalidRequest("relearning probe: steps must be >= 0, batch_size >= 1, lr > 0; "
                             f"got {steps}, {batch_size}, {lr}")
    relearn, untouched = split_for_relearning(forget, seed=seed)
    untouched_batches = _eval_batches(tokenizer, untouched, max_length)
    batches = _epochs(encode(tokenizer, relearn, max_length=max_length), batch_size=batch_size,
                      pad_id=pad_id_of(tokenizer), generator=torch.Generator().manual_seed(seed))
    with _left_as_found(model):
        params = _active_lora_parameters(model)
        saved = _cpu_copies(params)
        try:
            before = _accuracy_and_nll(model, untouched_batches)
            done = _relearn(model, params, batches, steps=steps, lr=lr,
                            deadline=start + time_limit_s)
            after = _accuracy_and_nll(model, untouched_batches)
        finally:
            _copy_back(params, saved)
    timed_out = done < steps
    if timed_out:
        logger.warning("relearning probe: time limit of %.0f s reached after %d of %d steps",
                       time_limit_s, done, steps)
    return {"steps": done, "timed_out": timed_out, "relearn_examples": len(relearn),
            "untouched_examples": len(untouched), "before": before, "after": after,
            "recovered_accuracy": after["accuracy"] - before["accuracy"]}


# --- what a job runs ----------------------------------------------------------------------


def run_probes(model: Any, tokenizer: Tokenizer, sets: Mapping[str, TextDataset],
               hp: Hyperparams) -> dict[str, Any]:
    """The probes `hp` turns on, keyed ``relearning`` and ``quantization``.

    The relearning probe keeps its own learning rate (an attacker's, not the job's) and
    is reported as skipped, not failed, when the forget set is too small to split.
    """
    forget = sets["forget"]
    probes: dict[str, Any] = {}
    if hp.relearn_probe_steps and len(forget) < 2:
        probes["relearning"] = {"skipped": "the forget set has fewer than 2 examples"}
    elif hp.relearn_probe_steps:
        probes["relearning"] = relearning_probe(
            model, tokenizer, forget, steps=hp.relearn_probe_steps, batch_size=hp.batch_size,
            seed=hp.seed, time_limit_s=hp.probe_time_limit_s, max_length=hp.max_length)
    if hp.quantization_probe:
        probes["quantization"] = quantization_probe(
            model, tokenizer, forget, sets.get("retain"), time_limit_s=hp.probe_time_limit_s,
            max_length=hp.max_length)
    return probes
