"""Lineage: where an adapter lorafold wrote came from, kept in two places.

`lorafold.json` beside the weights is for people and tools; the same JSON in the
safetensors metadata travels with the weights file when it is copied alone. `remove`
(exact unlearning) re-merges from this record, so it holds everything a merge needs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from lorafold.adapters.source import WEIGHTS_NAME
from lorafold.adapters.writer import LINEAGE_METADATA_KEY, LINEAGE_NAME, _write_json

LINEAGE_FORMAT = 1


def read_lineage(adapter_dir: Path) -> dict[str, Any] | None:
    """The lineage record, from lorafold.json or else the weights' metadata; None if absent."""
    path = adapter_dir / LINEAGE_NAME
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            data = None
        if isinstance(data, dict):
            return data
    weights = adapter_dir / WEIGHTS_NAME
    if weights.exists():
        with safe_open(str(weights), framework="pt") as f:
            meta = f.metadata() or {}
        if LINEAGE_METADATA_KEY in meta:
            data = json.loads(meta[LINEAGE_METADATA_KEY])
            return data if isinstance(data, dict) else None
    return None


def attach_lineage(adapter_dir: Path, lineage: Mapping[str, Any]) -> None:
    """Write `lineage` into lorafold.json and the weights' metadata, each file atomically."""
    weights = adapter_dir / WEIGHTS_NAME
    with safe_open(str(weights), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 - not a dict
    metadata.setdefault("format", "pt")
    metadata[LINEAGE_METADATA_KEY] = json.dumps(lineage, sort_keys=True, default=str)
    tmp_weights = weights.with_name(f".{WEIGHTS_NAME}.tmp")
    save_file(tensors, str(tmp_weights), metadata=metadata)
    os.replace(tmp_weights, weights)
    tmp_json = adapter_dir / f".{LINEAGE_NAME}.tmp"
    _write_json(tmp_json, lineage)
    os.replace(tmp_json, adapter_dir / LINEAGE_NAME)
