"""Assemble an adapted model (base + adapter + init), save its adapter, load it back.

``RUN/adapter/`` (and every checkpoint) holds:

- ``adapter_model.safetensors``: the adapter state of every layer (see ``lorafit.adapters``) and,
  for classification and regression, the new task head;
- ``adapter_config.json``: the validated model/adapter/init configs, the adapted layer names,
  the task, the base model's location and a fingerprint of its weights.

That is everything ``lorafit merge`` and ``lorafit eval`` need; both refuse a base model whose
fingerprint differs from the one the adapter was trained on.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from lorafit import __version__
from lorafit.adapters import adapter_state_dict, attach, find_targets, load_adapter_state
from lorafit.config import ConfigError, ModelConfig, schema_of, as_dict, to_object
from lorafit.files import load_tensors, read_json, recover, staging, swap_in
from lorafit.models import default_targets, fingerprint, head_module_names, load_model, load_tokenizer

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class Assembled:
    """An adapted model and what is needed to save it faithfully."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    layers: dict[str, nn.Module]
    heads: list[str]
    meta: dict[str, Any] = field(default_factory=dict)


def _backbone_names(model: nn.Module, heads: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if not any(n.startswith(h + ".") for h in heads)]


def assemble(model_cfg: ModelConfig, adapter_cfg: Any, init_cfg: Any, task: str, num_labels: int,
             seed: int = 0) -> Assembled:
    """Load the base model, attach the adapter to its target layers, run the init."""
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, task, num_labels, seed=seed, tokenizer=tokenizer)
    all_heads = head_module_names(model)
    trained_heads = [] if task == "causal_lm" else all_heads
    patterns = adapter_cfg.target_modules or default_targets(model)
    targets = find_targets(model, patterns, exclude=all_heads)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"adapter.target_modules={patterns} matches no linear layer of this "
                          f"{model.config.model_type} model. Linear layer names here: {', '.join(linear)}.")
    base_fp = fingerprint(model, _backbone_names(model, all_heads))
    torch.manual_seed(seed)  # adapter factors start the same on every process and every resume
    layers = attach(model, adapter_cfg, targets)
    if init_cfg is not None:
        try:
            init_cfg.apply(layers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    for head in trained_heads:
        for param in model.get_submodule(head).parameters():
            param.requires_grad_(True)
    meta = {
        "lorafit_version": __version__,
        "task": task,
        "num_labels": num_labels,
        "targets": targets,
        "modules_to_save": trained_heads,
        "base_model": model_cfg.name_or_path,
        "base_fingerprint": base_fp,
        "model": as_dict(model_cfg),
        "adapter": as_dict(adapter_cfg),
        "init": as_dict(init_cfg) if init_cfg is not None else None,
    }
    return Assembled(model, tokenizer, layers, trained_heads, meta)


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


def run_folder(adapter_dir: Path) -> Path:
    """The training run an adapter folder belongs to (``RUN`` for ``RUN/adapter`` and for
    ``RUN/checkpoints/step-N/adapter``), or the adapter folder itself if it lies in no run."""
    adapter_dir = Path(adapter_dir)
    for folder in [adapter_dir, *adapter_dir.parents][:5]:
        if (folder / "config.yaml").is_file():
            return folder
    return adapter_dir


def load_adapted(adapter_dir: str | os.PathLike, base_model: Optional[str] = None) -> Assembled:
    """Rebuild base + adapter from a saved adapter folder (``RUN/adapter`` or a checkpoint).

    Args:
        adapter_dir: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model: the base model folder or hub id; defaults to the one recorded at training.

    Raises:
        ConfigError: the base model's weights differ from those the adapter was trained on.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_json(adapter_dir / ADAPTER_CONFIG, "Adapter config")
    missing = [k for k in ("model", "adapter", "targets", "task", "num_labels", "base_model", "base_fingerprint",
                           "modules_to_save") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ConfigError(f"Adapter config {adapter_dir / ADAPTER_CONFIG} lacks {', '.join(missing)}: it was not "
                          f"written by `lorafit train`, or it was edited. Use the run's own adapter folder.")
    model_cfg = to_object(meta["model"], ModelConfig, "model")
    model_cfg.name_or_path = base_model or meta["base_model"]
    model_cfg.build = None
    model_cfg.tokenizer = None if model_cfg.tokenizer is None or base_model else model_cfg.tokenizer
    adapter_node = OmegaConf.create(meta["adapter"])
    adapter_cfg = to_object(adapter_node, schema_of(adapter_node, "adapter"), "adapter")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, meta["task"], meta["num_labels"], tokenizer=tokenizer)
    heads = head_module_names(model)
    found = fingerprint(model, _backbone_names(model, heads))
    if found != meta["base_fingerprint"]:
        raise ConfigError(
            f"The base model '{model_cfg.name_or_path}' is not the one this adapter was trained on "
            f"(weights fingerprint {found}, expected {meta['base_fingerprint']}). Merging or evaluating it "
            f"would silently give a different model. Pass the original base (the run recorded "
            f"'{meta['base_model']}').")
    layers = attach(model, adapter_cfg, meta["targets"])
    load_adapter_state(model, load_tensors(adapter_dir / ADAPTER_WEIGHTS))
    return Assembled(model, tokenizer, layers, meta["modules_to_save"], meta)
