"""The adapter folder format: what ``RUN/adapter/`` and every ``checkpoints/step-N/adapter/`` hold.

- ``adapter_model.safetensors``: the adapter state of every layer (everything registered on an
  adapter layer except ``base.*``, see :mod:`lorafit.adapters`) and, for classification and
  regression, the trained head;
- ``adapter_config.json``: the validated model/adapter/init configs, the adapted layer names, the
  head (key ``task``), the base model's location and a fingerprint of its weights.

That is everything ``lorafit merge`` and ``lorafit eval`` need (:func:`lorafit.assemble.load_adapted`
rebuilds the model from it). The config is written last, so its presence marks a complete folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorafit.adapters import adapter_state_dict
from lorafit.config import ConfigError
from lorafit.files import load_tensors, read_json, recover, staging, swap_in

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
META_KEYS = ("model", "adapter", "targets", "task", "num_labels", "base_model", "base_fingerprint", "modules_to_save")


@dataclass
class Assembled:
    """An adapted model and what is needed to save it faithfully."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: dict[str, nn.Module]
    heads: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def save_adapter(folder: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write the adapter recoverably: into a hidden sibling (the config last), then swap it in.

    Raises:
        ConfigError: a tensor holds NaN or inf (a diverged run must not leave a final adapter).
    """
    folder = Path(folder)
    recover(folder, ADAPTER_CONFIG)
    state = {k: v.contiguous() for k, v in adapter_state_dict(model, meta["modules_to_save"]).items()}
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ConfigError(f"The adapter holds NaN or inf values ({len(bad)} tensors, first: {bad[0]}), so it was not "
                          f"written to {folder}. Training diverged: lower optimizer.lr (or turn on max_grad_norm) "
                          f"and train again.")
    tmp, _ = staging(folder)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / ADAPTER_WEIGHTS))
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))   # last: its presence marks a complete folder
    swap_in(tmp, folder)


def find_adapter_dir(path: str | os.PathLike) -> Optional[Path]:
    """``path`` itself if it holds an adapter, else ``path/adapter``; None if neither does."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    return None


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter folder's ``adapter_config.json``, checked to hold what loading needs."""
    meta = read_json(Path(adapter_dir) / ADAPTER_CONFIG, "Adapter config")
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ConfigError(f"Adapter config {Path(adapter_dir) / ADAPTER_CONFIG} lacks {', '.join(missing)}: it was "
                          f"not written by `lorafit train`, or it was edited. Use the run's own adapter folder.")
    return meta


def read_adapter_weights(adapter_dir: Path, what: str = "Adapter file") -> dict[str, torch.Tensor]:
    """The adapter folder's tensors (a damaged file is named in the error)."""
    return load_tensors(Path(adapter_dir) / ADAPTER_WEIGHTS, what)


def run_folder(adapter_dir: Path) -> Path:
    """The training run an adapter folder belongs to (``RUN`` for ``RUN/adapter`` and for
    ``RUN/checkpoints/step-N/adapter``), or the adapter folder itself if it lies in no run."""
    adapter_dir = Path(adapter_dir)
    for folder in [adapter_dir, *adapter_dir.parents][:5]:
        if (folder / "config.yaml").is_file():
            return folder
    return adapter_dir
