"""Load a model to score: a run folder (its adapter applied, not merged), a merged folder or any
Hugging Face model folder — one function, :func:`load_for_scoring`, for every suite.

The *head* decides the auto class of a plain folder (``classification``/``regression``:
``AutoModelForSequenceClassification``; ``multiple_choice``: ``AutoModelForMultipleChoice``;
``causal_lm``: ``AutoModelForCausalLM``); a run folder must have been trained with that head.
:func:`natural_head` says which head a folder has when the suite may choose (commonsense's
``protocol=auto``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from lorafit.adapters.io import find_adapter_dir, read_adapter_config
from lorafit.assemble import load_adapted
from lorafit.config import ConfigError
from lorafit.console import console
from lorafit.models import from_pretrained

FIX = "Give a Hugging Face model folder (config.json, weights, tokenizer files), a run folder or a merged folder."


@dataclass
class Scored:
    """A model ready to score, and what it is (``adapter (unmerged)`` or ``plain``)."""

    model: nn.Module
    tokenizer: PreTrainedTokenizerBase
    kind: str


def _config(path: str) -> Any:
    from transformers import AutoConfig

    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"'{path}' is neither a lorafit run folder (adapter/lorafit_adapter.json), a PEFT adapter "
                          f"nor a Hugging Face model folder (config.json). Give a run folder, a merged folder or a "
                          f"base model.")
    return from_pretrained(AutoConfig.from_pretrained, path, "a model config", FIX)


def _architecture(config: Any) -> tuple[bool, bool, bool]:
    """(the model type has a multiple-choice head, the folder's head is one, it is a causal LM)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES

    architectures = config.architectures or []
    has_mc = config.model_type in MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES
    trained_mc = any(a.endswith("ForMultipleChoice") for a in architectures)
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures) or not has_mc
    return has_mc, trained_mc, causal


def natural_head(path: str) -> str:
    """The head a folder was made for: a run's own; for a plain folder ``multiple_choice`` if it holds a
    multiple-choice head (or cannot be a causal LM), else ``causal_lm``."""
    adapter_dir = find_adapter_dir(path)
    if adapter_dir is not None:
        return read_adapter_config(adapter_dir)["task"]
    _, trained_mc, causal = _architecture(_config(path))
    return "multiple_choice" if trained_mc or not causal else "causal_lm"


def load_for_scoring(path: str, head: str, num_labels: int = 0, wanted: str = "") -> Scored:
    """The model of ``path`` with ``head``, in eval mode.

    Args:
        path: a run folder (or its adapter/, or a checkpoint), a merged folder or a base model folder.
        head: the head the scoring needs.
        num_labels: classification only: the number of classes.
        wanted: how the caller names what needs ``head`` (e.g. ``protocol=loglik``), for messages.

    Raises:
        ConfigError: a folder that is no model, a run trained with another head, or an architecture
            without that head.
    """
    from transformers import (AutoModelForCausalLM, AutoModelForMultipleChoice, AutoModelForSequenceClassification,
                              AutoTokenizer)

    wanted = wanted or f"a {head} model"
    adapter_dir = find_adapter_dir(path)
    if adapter_dir is not None:
        assembled = load_adapted(adapter_dir)
        trained = assembled.meta["task"]
        if trained != head:
            raise ConfigError(f"{wanted} needs a {head} model, but {path} was trained as {trained}. Evaluate it on "
                              f"matching data (or with the matching protocol).")
        return Scored(assembled.model.eval(), assembled.tokenizer, "adapter (unmerged)")
    config = _config(path)
    has_mc, trained_mc, causal = _architecture(config)
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, path, "a tokenizer", FIX)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if head == "causal_lm":
        if not causal:
            raise ConfigError(f"{wanted} needs a causal language model; {path} is a {config.model_type} encoder. "
                              f"Use protocol=mc_head.")
        model = from_pretrained(AutoModelForCausalLM.from_pretrained, path, "the model", FIX)
    elif head == "multiple_choice":
        if not has_mc:
            raise ConfigError(f"{wanted} needs an encoder with a multiple-choice head; {path} is a "
                              f"{config.model_type} model without one. Use protocol=loglik or protocol=generate.")
        if not trained_mc:
            console.print(f"[yellow]warning:[/] {path} has no trained multiple-choice head; a new random head is "
                          f"used, so scores are near chance. Fine-tune one with `lorafit train data=commonsense`.")
        model = from_pretrained(AutoModelForMultipleChoice.from_pretrained, path, "the model", FIX)
    else:
        expected = 1 if head in ("regression", "reward") else num_labels
        has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        if not has_head or config.num_labels != expected:
            console.print(f"[yellow]warning:[/] {path} has no trained {expected}-label classification head; "
                          f"a new random head is used, so scores are near chance.")
        model = from_pretrained(AutoModelForSequenceClassification.from_pretrained, path, "the model", FIX,
                                num_labels=expected, ignore_mismatched_sizes=True,
                                **({"problem_type": "regression"} if head == "regression" else {}))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return Scored(model.eval(), tokenizer, "plain")
