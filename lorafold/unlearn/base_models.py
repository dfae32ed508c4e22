"""Base models: found locally (configured dirs, then the Hugging Face cache), loaded, checked.

A service must not fetch gigabytes because a request named a model, nor let a name walk
out of its model directory, so names are validated, lookups are local, and a download
happens only when the caller passes ``allow_download=True``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorafold.adapters import LoraAdapter, ModuleSpec, open_adapter
from lorafold.adapters.config import model_path
from lorafold.errors import IncompatibleAdapters, InvalidRequest, ModelNotFound

logger = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _check_name(name: str) -> list[str]:
    segments = name.split("/")
    if not name or len(name) > 256 or not all(_SEGMENT.match(s) and ".." not in s
                                              for s in segments):
        raise InvalidRequest(f"base model name {name!r} is not of the form 'name' or "
                             "'org/name' (letters, digits, '.', '_', '-')",
                             code="invalid_base_model_name")
    return segments


def _is_model_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def _from_hf_cache(name: str, *, cache_dir: Path | None, revision: str | None) -> Path | None:
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir,
                                       revision=revision)
    except HFValidationError:
        return None
    if isinstance(found, str):
        return Path(found).parent
    return None


def _download(name: str, *, cache_dir: Path | None, revision: str | None) -> Path:
    from huggingface_hub import snapshot_download

    logger.info("downloading base model %s (allow_download=True)", name)
    try:
        path = snapshot_download(name, revision=revision, cache_dir=cache_dir)
    except Exception as e:  # network, auth, missing repo: all mean "not available"
        raise ModelNotFound(f"base model {name!r} could not be downloaded: {e}") from e
    return Path(str(path))


def resolve_base_model(name: str, *, model_dirs: Sequence[Path] = (), use_hf_cache: bool = True,
                       cache_dir: Path | None = None, revision: str | None = None,
                       allow_download: bool = False) -> Path:
    """The local directory of base model `name`: `<root>/<name>` for the first configured root
    that has it, else its snapshot in the Hugging Face cache, else (only if allowed) a download.
    """
    segments = _check_name(name)
    looked: list[str] = []
    for root in model_dirs:
        candidate = Path(root).joinpath(*segments)
        looked.append(str(candidate))
        if _is_model_dir(candidate):
            logger.debug("base model %s found at %s", name, candidate)
            return candidate
    if use_hf_cache:
        from huggingface_hub import constants

        looked.append(f"Hugging Face cache {cache_dir or constants.HF_HUB_CACHE}")
        snapshot = _from_hf_cache(name, cache_dir=cache_dir, revision=revision)
        if snapshot is not None and _is_model_dir(snapshot):
            return snapshot
    if allow_download:
        return _download(name, cache_dir=cache_dir, revision=revision)
    raise ModelNotFound(f"base model {name!r} is not available locally (looked in: "
                        f"{'; '.join(looked) or 'nowhere: no model directory configured'})",
                        looked=looked)


def load_base_model(model_dir: Path, *, device: torch.device) -> tuple[nn.Module, Any]:
    """Model and tokenizer from a local dir (never remote code); bf16 weights on CUDA."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() \
        else torch.float32
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True,
                                                  trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"base model at {model_dir} has no usable tokenizer: {e}",
                            code="tokenizer_not_found") from e
    try:
        model: nn.Module = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                     local_files_only=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ModelNotFound(f"base model at {model_dir} cannot be loaded: {e}",
                            code="base_model_unreadable") from e
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model, tokenizer


def _module_shape(module: nn.Module, spec: ModuleSpec) -> tuple[str, tuple[int, ...]] | None:
    """(kind, shape as the adapter sees it) of a base module, None if LoRA cannot target it."""
    if isinstance(module, nn.Linear):
        return "linear", (module.out_features, module.in_features)
    if isinstance(module, nn.Embedding):
        return "embedding", (module.embedding_dim, module.num_embeddings)
    if isinstance(module, nn.Conv2d):
        groups_in = module.in_channels * module.kernel_size[0] * module.kernel_size[1]
        return "conv2d", (module.out_channels, groups_in)
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 layer: weight is in×out
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dim() == 2:
            return "linear", (int(weight.shape[1]), int(weight.shape[0]))
    return None


def check_adapter_fits(model: nn.Module, adapter: Path | LoraAdapter) -> None:
    """Every module the adapter targets exists in `model` with the shapes its factors need.

    Checked from the adapter's header before anything is attached, so that a mismatch is a
    clear refusal naming the module rather than a shape error deep inside PEFT.
    """
    if isinstance(adapter, Path):
        with open_adapter(adapter) as opened:
            check_adapter_fits(model, opened)
        return
    for name, spec in adapter.modules.items():
        path = model_path(name)
        try:
            module = model.get_submodule(path)
        except AttributeError as e:
            raise IncompatibleAdapters(f"{name}: the base model has no module {path!r}",
                                       code="adapter_base_mismatch", module=name) from e
        found = _module_shape(module, spec)
        if found is None:
            raise IncompatibleAdapters(f"{name}: base module {path!r} is a "
                                       f"{type(module).__name__}, which LoRA cannot target "
                                       "(supported: Linear, Embedding, Conv2d, Conv1D)",
                                       code="adapter_base_mismatch", module=name)
        kind, shape = found
        if kind != spec.kind or shape != spec.delta_shape:
            raise IncompatibleAdapters(
                f"{name}: the adapter expects a {spec.kind} of shape (out={spec.out_features}, "
                f"in={spec.in_features}) but the base model's {path!r} is a {kind} of shape "
                f"(out={shape[0]}, in={shape[1]})", code="adapter_base_mismatch", module=name)


def check_adapter_fits_model_dir(model_dir: Path, adapter: Path | LoraAdapter) -> None:
    """`check_adapter_fits` against the model's architecture alone: built from its
    config.json on the meta device (no weights read), so an API can refuse a mismatch
    before queuing a job that would load gigabytes to find it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True,
                                            trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise ModelNotFound(f"base model at {model_dir} cannot be loaded: {e}",
                            code="base_model_unreadable") from e
    check_adapter_fits(model, adapter)
