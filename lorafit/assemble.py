"""Assemble an adapted model (base + adapter + init), and rebuild one from a saved adapter folder.

The folder's format (what ``RUN/adapter/`` holds) is :mod:`lorafit.adapters.io`'s. Loading refuses
a base model whose fingerprint differs from the one the adapter was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from torch import nn

from lorafit import __version__
from lorafit.adapters import attach, find_targets, load_adapter_state
from lorafit.config import ConfigError, ModelConfig, schema_of, as_dict, to_object
from lorafit.adapters.io import Assembled, read_adapter_config, read_adapter_weights
from lorafit.models import default_targets, fingerprint, head_module_names, load_model, load_tokenizer

def _backbone_names(model: nn.Module, heads: list[str]) -> list[str]:
    return [n for n, _ in model.named_parameters() if not any(n.startswith(h + ".") for h in heads)]


def assemble(model_cfg: ModelConfig, adapter_cfg: Any, init_cfg: Any, head: str, num_labels: int,
             seed: int = 0) -> Assembled:
    """Load the base model with ``head``, attach the adapter to its target layers, run the init."""
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, head, num_labels, seed=seed, tokenizer=tokenizer)
    all_heads = head_module_names(model)
    trained_heads = [] if head == "causal_lm" else all_heads
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
    for name in trained_heads:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)
    meta = {
        "lorafit_version": __version__,
        "task": head,   # the key of the file format: the head
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


def load_adapted(adapter_dir: str | os.PathLike, base_model: Optional[str] = None) -> Assembled:
    """Rebuild base + adapter from a saved adapter folder (``RUN/adapter`` or a checkpoint).

    Args:
        adapter_dir: folder holding ``adapter_config.json`` and ``adapter_model.safetensors``.
        base_model: the base model folder or hub id; defaults to the one recorded at training.

    Raises:
        ConfigError: the base model's weights differ from those the adapter was trained on.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
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
    load_adapter_state(model, read_adapter_weights(adapter_dir))
    return Assembled(model, tokenizer, layers, meta["modules_to_save"], meta)
