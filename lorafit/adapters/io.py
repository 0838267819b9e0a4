"""The adapter folder format: what ``RUN/adapter/`` and every ``checkpoints/step-N/adapter/`` hold.

- ``lorafit_adapter.safetensors``: the adapter state of every layer (everything registered on an
  adapter layer except ``base.*``, see :mod:`lorafit.adapters`) and, for classification and
  regression, the trained head;
- ``lorafit_adapter.json``: the validated model/adapter/init configs, the adapted layer names, the
  head (key ``task``), the base model's location and a fingerprint of its weights.

That is everything ``lorafit merge`` and ``lorafit eval`` need (:func:`lorafit.assemble.load_adapted`
rebuilds the model from it). The config is written last, so its presence marks a complete folder.
The names are lorafit's own, so that no tool mistakes the folder for a PEFT adapter (``lorafit
export`` writes those). Folders written by earlier versions (PEFT's file names, lorafit's schema) and
PEFT adapter folders (:mod:`lorafit.adapters.peft_import`) are read too.
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
from lorafit.adapters.peft_import import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_folder, peft_meta, peft_state
from lorafit.files import load_tensors, read_json, recover, staging, swap_in

ADAPTER_WEIGHTS = "lorafit_adapter.safetensors"
ADAPTER_CONFIG = "lorafit_adapter.json"
LEGACY_WEIGHTS, LEGACY_CONFIG = PEFT_WEIGHTS, PEFT_CONFIG
"""What lorafit wrote before its format had names of its own (PEFT's names, lorafit's schema)."""
META_KEYS = ("model", "adapter", "targets", "task", "num_labels", "base_model", "base_fingerprint", "modules_to_save")


@dataclass
class Assembled:
    """An adapted model and what is needed to save it faithfully."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: dict[str, nn.Module]
    heads: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def save_adapter(folder: Path, model: nn.Module, meta: dict[str, Any],
                 state: Optional[dict[str, torch.Tensor]] = None) -> None:
    """Write the adapter recoverably: into a hidden sibling (the config last), then swap it in.
    ``state`` is the model's adapter state when the caller gathered it already (a sharded model).

    Raises:
        ConfigError: a tensor holds NaN or inf (a diverged run must not leave a final adapter).
    """
    folder = Path(folder)
    recover(folder, ADAPTER_CONFIG)
    state = state if state is not None else adapter_state_dict(model, meta["modules_to_save"])
    state = {k: v.contiguous() for k, v in state.items()}
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
    """``path`` itself if it holds an adapter (lorafit's, an earlier version's or PEFT's), else
    ``path/adapter``; None if neither does."""
    path = Path(path)
    for candidate in (path, path / "adapter"):
        if (candidate / ADAPTER_CONFIG).is_file() or (candidate / LEGACY_CONFIG).is_file():
            return candidate
    return None


def adapter_files(adapter_dir: Path) -> tuple[Path, Path]:
    """The folder's (config, weights): lorafit's names, else an earlier version's."""
    adapter_dir = Path(adapter_dir)
    if (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / LEGACY_CONFIG).is_file():
        return adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    return adapter_dir / LEGACY_CONFIG, adapter_dir / LEGACY_WEIGHTS


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """The adapter folder's config, checked to hold what loading needs (a PEFT folder's, translated)."""
    config, _ = adapter_files(adapter_dir)
    if config.name == LEGACY_CONFIG and is_peft_folder(adapter_dir):
        return peft_meta(Path(adapter_dir))
    meta = read_json(config, "Adapter config")
    missing = [k for k in META_KEYS if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ConfigError(f"Adapter config {config} lacks {', '.join(missing)}: it was not written by `lorafit "
                          f"train`, or it was edited. Use the run's own adapter folder.")
    return meta


def read_adapter_weights(adapter_dir: Path, what: str = "Adapter file") -> dict[str, torch.Tensor]:
    """The adapter folder's tensors under lorafit's keys (a damaged file is named in the error)."""
    config, weights = adapter_files(adapter_dir)
    if config.name == LEGACY_CONFIG and is_peft_folder(adapter_dir):
        return peft_state(Path(adapter_dir))
    return load_tensors(weights, what)


def run_folder(adapter_dir: Path) -> Path:
    """The training run an adapter folder belongs to (``RUN`` for ``RUN/adapter`` and for
    ``RUN/checkpoints/step-N/adapter``), or the adapter folder itself if it lies in no run."""
    adapter_dir = Path(adapter_dir)
    for folder in [adapter_dir, *adapter_dir.parents][:5]:
        if (folder / "config.yaml").is_file():
            return folder
    return adapter_dir
