"""Load a base model and its tokenizer; default adapter targets per architecture.

Heads (the model's output kind): ``classification`` and ``regression``
(``AutoModelForSequenceClassification``, encoders and decoders alike), ``multiple_choice``
(``AutoModelForMultipleChoice``, encoders; inputs batch × choices × seq), ``causal_lm``
(``AutoModelForCausalLM``) and ``reward`` (a one-label sequence classifier: the scalar reward model
of ``lorafit.rlhf``). The data config decides the head and the number of labels; the model config
decides which weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMultipleChoice,
                          AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)

from lorafit.config import ConfigError, ModelConfig

HEADS = ("classification", "regression", "causal_lm", "multiple_choice", "reward")
AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "multiple_choice": AutoModelForMultipleChoice}

# Adapter targets when the user names none: the attention and MLP projections of each family.
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_targets(model: PreTrainedModel) -> list[str]:
    """The default target-module names for ``model``'s architecture (``all-linear`` if unknown)."""
    return DEFAULT_TARGETS.get(model.config.model_type, ["all-linear"])


def head_module_names(model: PreTrainedModel) -> list[str]:
    """Top-level modules outside the backbone (e.g. ``classifier``, ``score``, ``lm_head``)."""
    prefix = model.base_model_prefix
    return [name for name, _ in model.named_children() if name != prefix]


def _override_dropout(config: PretrainedConfig, p: float) -> None:
    """Set every dropout probability in ``config`` (hidden, attention, classifier ...) to ``p``."""
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key) and isinstance(value, (float, int)) and not isinstance(value, bool):
            setattr(config, key, p)


def from_pretrained(load: Callable[..., Any], source: str, what: str, fix: str, **kwargs: Any) -> Any:
    """``load(source, **kwargs)`` (a ``from_pretrained``), with a missing, offline or damaged folder or
    hub id turned into one paragraph naming it."""
    from safetensors import SafetensorError

    try:
        return load(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"Could not load {what} from '{source}': {reason} {fix}") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.name_or_path
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, "a tokenizer",
                                "Set model.tokenizer (or model.name_or_path) to a folder holding tokenizer files, "
                                "or a hub id if this machine has a network.", trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def load_model(cfg: ModelConfig, head: str, num_labels: int = 2, seed: int = 0,
               tokenizer: PreTrainedTokenizerBase | None = None) -> PreTrainedModel:
    """Build the base model with ``head``; new heads are initialised from ``seed``.

    A model with ``cfg.build`` set is built from that config dict with random weights (tests,
    ``model=tiny_llama``); otherwise weights come from ``cfg.name_or_path``.
    """
    if head not in HEADS:
        raise ConfigError(f"Unknown head {head!r}; allowed: {', '.join(HEADS)}.")
    auto_cls = AUTO_CLASSES.get(head, AutoModelForSequenceClassification)
    # reward (lorafit.rlhf): a sequence classifier with one label, the scalar reward.
    extra = {} if head in AUTO_CLASSES else {"num_labels": 1 if head in ("regression", "reward") else num_labels}
    if head == "regression":
        extra["problem_type"] = "regression"
    torch.manual_seed(seed)  # new heads (and built models) get reproducible weights
    if cfg.build is not None:
        build = dict(cfg.build)
        model_type = build.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.build needs a 'model_type' key (e.g. llama) next to the sizes.")
        if tokenizer is not None:
            build.setdefault("vocab_size", len(tokenizer))
            build.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = AutoConfig.for_model(model_type, **build, **extra)
        if cfg.dropout is not None:
            _override_dropout(config, cfg.dropout)
        model = auto_cls.from_config(config)
    else:
        fix = ("Give a local Hugging Face folder (config.json and weights) or a hub id on a machine with a "
               "network in model.name_or_path.")
        config = from_pretrained(AutoConfig.from_pretrained, cfg.name_or_path, "a model config", fix,
                                 trust_remote_code=cfg.trust_remote_code, **extra)
        if cfg.dropout is not None:
            _override_dropout(config, cfg.dropout)
        model = from_pretrained(auto_cls.from_pretrained, cfg.name_or_path, "the model weights", fix, config=config,
                                dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code)
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def fingerprint(model: nn.Module, names: Iterable[str] | None = None) -> str:
    """A fingerprint of the base weights that changes if any single weight changes.

    Per tensor: its name, its shape and an exact integer checksum of its fp32 bit patterns (the
    float32 values viewed as int32, summed in int64). Integer sums are exact and independent of
    reduction order, so the fingerprint is deterministic across thread counts and devices, yet any
    changed bit changes it. Adapter and head tensors are excluded by passing ``names`` (the base
    parameters to hash).
    """
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(names if names is not None else params):
        bits = params[name].detach().float().contiguous().view(torch.int32)
        checksum = int(bits.to(torch.int64).sum())
        digest.update(f"{name}{tuple(bits.shape)}{checksum}".encode())
    return digest.hexdigest()[:16]


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write a (built, randomly initialised) base model so merge and eval can find it later."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
