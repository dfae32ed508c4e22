"""Broken adapters, one per refusal case, each with the error code lorafold must give.

Shared by the library, CLI and HTTP tests so that every layer is checked against the same
catalogue. Each builder writes into a fresh directory and returns the path to hand over
(a directory or an archive).
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafold.synthetic import write_random_adapter

SHAPES = {"model.layers.0.self_attn.q_proj": (16, 12), "model.layers.0.self_attn.v_proj": (16, 12)}
KEY = "base_model.model.model.layers.0.self_attn.q_proj"


def good_adapter(directory: Path, seed: int = 0) -> Path:
    return write_random_adapter(directory, SHAPES, rank=4, seed=seed)


def _edit_config(directory: Path, **changes: object) -> Path:
    good_adapter(directory)
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
    return directory


def _edit_tensors(directory: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    good_adapter(directory)
    from safetensors.torch import load_file

    tensors = load_file(str(directory / "adapter_model.safetensors"))
    edit(tensors)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    return directory


def pickle_bin(d: Path) -> Path:
    good_adapter(d)
    (d / "adapter_model.safetensors").unlink()
    # Bytes that would run code if unpickled; lorafold must refuse without opening them.
    (d / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'false'\ntR.")
    return d


def truncated(d: Path) -> Path:
    good_adapter(d)
    path = d / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    return d


def malformed(d: Path) -> Path:
    good_adapter(d)
    header = b"{not json at all"
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return d


def header_too_large(d: Path) -> Path:
    good_adapter(d)
    (d / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    return d


def rank_inconsistent_with_r(d: Path) -> Path:
    return _edit_config(d, r=8)


def shapes_inconsistent(d: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{KEY}.lora_B.weight"] = torch.zeros(16, 3)
    return _edit_tensors(d, edit)


def missing_half(d: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        del t[f"{KEY}.lora_B.weight"]
    return _edit_tensors(d, edit)


def nan_values(d: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{KEY}.lora_A.weight"][0, 0] = float("nan")
    return _edit_tensors(d, edit)


def inf_values(d: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{KEY}.lora_B.weight"][1, 1] = float("inf")
    return _edit_tensors(d, edit)


def not_lora(d: Path) -> Path:
    return _edit_config(d, peft_type="IA3")


def dora(d: Path) -> Path:
    return _edit_config(d, use_dora=True)


def dora_tensor(d: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{KEY}.lora_magnitude_vector"] = torch.ones(16)
    return _edit_tensors(d, edit)


def lora_bias(d: Path) -> Path:
    return _edit_config(d, lora_bias=True)


def lora_bias_tensor(d: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{KEY}.lora_B.bias"] = torch.zeros(16)
    return _edit_tensors(d, edit)


def modules_to_save(d: Path) -> Path:
    return _edit_config(d, modules_to_save=["lm_head"])


def missing_config(d: Path) -> Path:
    good_adapter(d)
    (d / "adapter_config.json").unlink()
    return d


def unsupported_dtype(d: Path) -> Path:
    def edit(t: dict[str, torch.Tensor]) -> None:
        t[f"{KEY}.lora_A.weight"] = torch.zeros(4, 12, dtype=torch.int32)
    return _edit_tensors(d, edit)


def archive_escape(d: Path) -> Path:
    good = good_adapter(d / "good")
    path = d / "evil.zip"
    with zipfile.ZipFile(path, "w") as z:
        for f in good.iterdir():
            z.write(f, f.name)
        z.writestr("../../escaped.txt", "outside")
    return path


def tar_link_escape(d: Path) -> Path:
    good = good_adapter(d / "good")
    path = d / "evil.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for f in good.iterdir():
            tar.add(f, arcname=f.name)
        link = tarfile.TarInfo("adapter_link")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link, io.BytesIO(b""))
    return path


CASES: dict[str, tuple[Callable[[Path], Path], str]] = {
    "pickle_bin": (pickle_bin, "pickle_not_supported"),
    "truncated": (truncated, "truncated_safetensors"),
    "malformed": (malformed, "malformed_safetensors"),
    "header_too_large": (header_too_large, "header_too_large"),
    "rank_vs_config": (rank_inconsistent_with_r, "rank_mismatch"),
    "a_b_shapes": (shapes_inconsistent, "shape_mismatch"),
    "missing_half": (missing_half, "missing_pair"),
    "nan": (nan_values, "non_finite"),
    "inf": (inf_values, "non_finite"),
    "not_lora": (not_lora, "unsupported_peft_type"),
    "dora": (dora, "dora_not_supported"),
    "dora_tensor": (dora_tensor, "dora_not_supported"),
    "lora_bias": (lora_bias, "lora_bias_not_supported"),
    "lora_bias_tensor": (lora_bias_tensor, "lora_bias_not_supported"),
    "modules_to_save": (modules_to_save, "modules_to_save_not_supported"),
    "missing_config": (missing_config, "missing_config"),
    "unsupported_dtype": (unsupported_dtype, "unsupported_dtype"),
    "zip_escape": (archive_escape, "archive_path_escape"),
    "tar_link_escape": (tar_link_escape, "archive_path_escape"),
}
