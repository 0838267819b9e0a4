"""Batches: tokenise a data option's split once, pad micro-batches, count loss terms.

:func:`tokenize` runs once per run (cached under the run folder as a ``datasets.Dataset``);
:func:`collate` pads each micro-batch to its own longest sequence; :func:`count_loss_units` counts
what the step's loss is normalised by (labelled tokens, or examples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError

IGNORE_INDEX = -100
"""The label of a token that carries no loss (prompt tokens, padding)."""


def tokenize(data: Any, split: str, tokenizer: PreTrainedTokenizerBase, cache_dir: Optional[Path]):
    """Tokenise a split once; the result is a ``datasets.Dataset`` cached under ``cache_dir``."""
    import datasets

    rows = data.rows(split)
    if not rows:
        raise ConfigError(f"The {split} split of data={type(data).__name__} is empty.")
    # Tokenise row by row in Python and hand the result to `datasets` for the on-disk cache:
    # the rows themselves may hold mixed types (labels int or float) that Arrow would coerce.
    encoded = [data.encode(row, tokenizer) for row in rows]
    ds = datasets.Dataset.from_list(encoded)
    if cache_dir is not None:
        target = Path(cache_dir) / f"{split}"
        if not target.exists():
            ds.save_to_disk(str(target))
        ds = datasets.load_from_disk(str(target))
    return ds.with_format(None)


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a micro-batch to its longest sequence (right padding; labels padded with -100).

    Multiple-choice features (``input_ids`` a list of token lists, one per choice) go to
    :func:`collate_choices`.
    """
    if features[0]["input_ids"] and isinstance(features[0]["input_ids"][0], list):
        return collate_choices(features, pad_token_id)
    longest = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.tensor([v + [pad] * (longest - len(v)) for v in values])
        else:
            batch[key] = torch.tensor(values)
    return batch


def collate_choices(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Multiple choice: pad to ``(batch, choices, longest)``, plus ``choice_mask`` ``(batch, choices)``.

    An example with fewer choices than the batch's most (ARC has 3 to 5) repeats its first choice
    to fill the row; ``choice_mask`` marks those copies False, and
    :func:`lorafit.task.forward_logits` gives them the lowest logit.
    """
    n_choices = max(len(f["input_ids"]) for f in features)
    longest = max(len(seq) for f in features for seq in f["input_ids"])
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        if key == "labels":
            batch[key] = torch.tensor([f[key] for f in features])
            continue
        pad = pad_token_id if key == "input_ids" else 0
        rows = [f[key] + [f[key][0]] * (n_choices - len(f[key])) for f in features]
        batch[key] = torch.tensor([[seq + [pad] * (longest - len(seq)) for seq in row] for row in rows])
    batch["choice_mask"] = torch.tensor([[j < len(f["input_ids"]) for j in range(n_choices)] for f in features])
    return batch


def count_loss_units(batch: dict[str, torch.Tensor]) -> int:
    """How many terms a batch adds to the loss: tokens with a label (LM) or examples."""
    labels = batch["labels"]
    if labels.dim() > 1:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int(labels.shape[0])
