"""Assemble an adapted model (base + adapter + init), and rebuild one from a saved adapter folder.

The folder's format (what ``RUN/adapter/`` holds) is :mod:`lorafit.adapters.io`'s. Loading refuses
a base model whose fingerprint differs from the one the adapter was trained on.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from lorafit import __version__
from lorafit.adapters import attach, find_targets, load_adapter_state
from lorafit.config import ConfigError, ModelConfig, schema_of, as_dict, to_object
from lorafit.adapters.io import Assembled, read_adapter_config, read_adapter_weights
from lorafit.adapters.peft_import import start_from_peft
from lorafit.adapters.tokens import add_token_rows
from lorafit.models import (DTYPES, base_fingerprint, default_targets, head_module_names, load_model,
                            load_tokenizer, resolve_dtype)


def adapter_seed(seed: int) -> int:
    """The seed of the adapter factors' random stream, derived from ``seed`` and independent of it.

    ``load_model`` draws the new head (and a built model) right after ``torch.manual_seed(seed)``; had
    ``attach`` been seeded with ``seed`` too, layer 0's first factor would reuse the head's random
    numbers (their entries correlated at −0.34 on MiniLM), where a plain PEFT script draws them
    from one continuing stream. NumPy's ``SeedSequence`` spawns a well-mixed, reproducible seed.
    """
    return int(np.random.SeedSequence([seed, 0x10AF17]).generate_state(1)[0])


def _fingerprint(model: nn.Module, heads: list[str], source: str, dtype: torch.dtype) -> str:
    """The fingerprint of the base's backbone weights (heads excluded), unquantised, in ``dtype``."""
    names = [n for n, _ in model.named_parameters() if not any(n.startswith(h + ".") for h in heads)]
    return base_fingerprint(model, names, source, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def assemble(model_cfg: ModelConfig, adapter_cfg: Any, init_cfg: Any, head: str, num_labels: int,
             seed: int = 0, device: Any = None, data: Any = None) -> Assembled:
    """Load the base model with ``head`` (quantised onto ``device`` if asked), attach the adapter to its
    target layers, run the init. ``data.configure(tokenizer)`` sets a chat template; the special tokens it
    adds get trainable rows (:mod:`lorafit.adapters.tokens`)."""
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, head, num_labels, seed=seed, tokenizer=tokenizer, device=device)
    added = data.configure(tokenizer) if data is not None else []     # after the base is built or loaded
    dtype = resolve_dtype(model_cfg, model.config)
    all_heads = head_module_names(model)
    trained_heads = [] if head == "causal_lm" else all_heads
    patterns = adapter_cfg.target_modules or default_targets(model)
    targets = find_targets(model, patterns, exclude=all_heads)
    if not targets:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"adapter.target_modules={patterns} matches no linear layer of this "
                          f"{model.config.model_type} model. Linear layer names here: {', '.join(linear)}.")
    base_fp = _fingerprint(model, all_heads, "" if model_cfg.build is not None else model_cfg.name_or_path, dtype)
    torch.manual_seed(adapter_seed(seed))  # the same factors on every process and every resume
    layers = attach(model, adapter_cfg, targets)
    if getattr(adapter_cfg, "from_pretrained", None):
        if getattr(init_cfg, "rewrites_base", False):
            raise ConfigError(f"init={type(init_cfg).__name__} rewrites W0, and adapter.from_pretrained="
                              f"{adapter_cfg.from_pretrained} holds factors trained on the original W0. Drop the init "
                              f"(the folder's factors replace it).")
        start_from_peft(model, adapter_cfg.from_pretrained, adapter_cfg, targets)
    elif init_cfg is not None:
        try:
            init_cfg.apply(layers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
    add_token_rows(model, tokenizer, added)
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
        "dtype": dtype_name(dtype),      # model.dtype as resolved: what the fingerprint and a merge use
        "model": as_dict(model_cfg),
        "adapter": as_dict(adapter_cfg),
        "init": as_dict(init_cfg) if init_cfg is not None else None,
        "added_tokens": {token: tokenizer.convert_tokens_to_ids(token) for token in added},
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return Assembled(model, tokenizer, layers, trained_heads, meta)


def load_adapted(adapter_dir: str | os.PathLike, base_model: Optional[str] = None, quantization: Optional[str] = None,
                 dtype: Optional[str] = None, device: Any = None) -> Assembled:
    """Rebuild base + adapter from a saved adapter folder (``RUN/adapter`` or a checkpoint).

    Args:
        adapter_dir: a lorafit adapter folder (``lorafit_adapter.json``, ``lorafit_adapter.safetensors``; or
            an earlier version's names), or a PEFT adapter folder (see :mod:`lorafit.adapters.peft_import`).
        base_model: the base model folder or hub id; defaults to the one recorded at training.
        quantization: override ``model.quantization`` (``none``: a QLoRA adapter on its full-precision
            base, as ``lorafit merge`` loads it).
        dtype: override ``model.dtype`` (the base's storage dtype).
        device: where a quantised base is loaded.

    Raises:
        ConfigError: the base model's weights differ from those the adapter was trained on.
    """
    adapter_dir = Path(adapter_dir)
    meta = read_adapter_config(adapter_dir)
    model_cfg = to_object(meta["model"], ModelConfig, "model")
    model_cfg.name_or_path = base_model or meta["base_model"]
    model_cfg.build = None
    model_cfg.tokenizer = None if model_cfg.tokenizer is None or base_model else model_cfg.tokenizer
    trained_dtype = DTYPES[meta["dtype"]] if "dtype" in meta else None
    if quantization is not None:
        model_cfg.quantization = quantization
    if dtype is not None:
        model_cfg.dtype = dtype
    elif trained_dtype is not None:
        model_cfg.dtype = meta["dtype"]
    options = dict(meta["adapter"])
    if "rank_pattern" in options:            # AdaLoRA's masks, under their name until 0.1
        options["kept_triplets"] = options.pop("rank_pattern")
    adapter_node = OmegaConf.create(options)
    adapter_cfg = to_object(adapter_node, schema_of(adapter_node, "adapter"), "adapter")
    tokenizer = load_tokenizer(model_cfg)
    model = load_model(model_cfg, meta["task"], meta["num_labels"], tokenizer=tokenizer, device=device)
    added = replay_tokenizer(tokenizer, meta)
    heads = head_module_names(model)
    found = meta["base_fingerprint"] and _fingerprint(model, heads, model_cfg.name_or_path,
                                                      trained_dtype or resolve_dtype(model_cfg, model.config))
    if found != meta["base_fingerprint"]:     # a PEFT folder records none: its base is trusted, as PEFT does
        raise ConfigError(
            f"The base model '{model_cfg.name_or_path}' is not the one this adapter was trained on "
            f"(weights fingerprint {found}, expected {meta['base_fingerprint']}). Merging or evaluating it "
            f"would silently give a different model. Pass the original base (the run recorded "
            f"'{meta['base_model']}').")
    layers = attach(model, adapter_cfg, meta["targets"])
    add_token_rows(model, tokenizer, added)
    load_adapter_state(model, read_adapter_weights(adapter_dir))
    return Assembled(model, tokenizer, layers, meta["modules_to_save"], meta)


def replay_tokenizer(tokenizer: Any, meta: dict[str, Any]) -> list[str]:
    """Give the tokenizer the run's chat template and added tokens (at the ids they had); returns the tokens.

    Raises:
        ConfigError: an added token lands on another id (the tokenizer is not the run's).
    """
    if meta.get("chat_template"):
        tokenizer.chat_template = meta["chat_template"]
    added = dict(meta.get("added_tokens") or {})
    if added:
        tokenizer.add_tokens(list(added), special_tokens=True)
        moved = {t: i for t, i in added.items() if tokenizer.convert_tokens_to_ids(t) != i}
        if moved:
            raise ConfigError(f"The run added the tokens {added} to its tokenizer, but on this tokenizer "
                              f"({tokenizer.name_or_path}) they land on other ids ({moved} expected). Use the "
                              f"tokenizer the run was trained with.")
    return list(added)
