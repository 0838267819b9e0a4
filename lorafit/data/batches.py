"""Batches: tokenise a data option's split once, pad micro-batches, count loss terms.

:func:`tokenize` runs once per run (cached under the run folder as a ``datasets.Dataset``);
:func:`collate` pads each micro-batch to its own longest sequence; :func:`count_loss_units` counts
what the step's loss is normalised by (labelled tokens, or examples).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError
from lorafit.console import console

IGNORE_INDEX = -100
"""The label of a token that carries no loss (prompt tokens, padding)."""


def tokenize(data: Any, split: str, tokenizer: PreTrainedTokenizerBase, cache_dir: Optional[Path]):
    """Tokenise a split once; the result is a ``datasets.Dataset`` cached under ``cache_dir``.

    A cached split is read back without reading or tokenising its rows again (a resumed run).
    Conversations (``data=chat`` / ``instruct``) are tokenised by ``datasets.map`` with
    ``data.num_proc`` processes and a progress bar; ``data.overflow`` then drops or keeps the ones
    that were cut, and the run says how many. Other rows are tokenised in Python (their fields can mix
    types Arrow would coerce); texts and pairs longer than ``data.max_length`` are cut, and counted
    in a line too.
    """
    import datasets

    target = Path(cache_dir) / split if cache_dir is not None else None
    if target is not None and (target / "dataset_info.json").is_file():
        return datasets.load_from_disk(str(target)).with_format(None)
    rows = data.rows(split)
    if not rows:
        raise ConfigError(f"The {split} split of data={type(data).__name__} is empty.")
    if hasattr(data, "keep"):                     # conversations: datasets.map, in parallel if asked
        ds = _map_conversations(data, split, rows, tokenizer)
    else:
        ds = datasets.Dataset.from_list([data.encode(row, tokenizer) for row in rows])
        if "truncated" in ds.column_names:
            _report_truncated(data, split, sum(ds["truncated"]), len(ds))
            ds = ds.remove_columns(["truncated"])
    if target is not None:                        # written next to its place, then renamed: never half a cache
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        ds.save_to_disk(str(tmp))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        ds = datasets.load_from_disk(str(target))
    return ds.with_format(None)


def _report_truncated(data: Any, split: str, cut: int, total: int) -> None:
    """Say how many examples ``data.max_length`` cut (RTE at the default 128: about 13 %)."""
    if cut:
        console.print(f"data={data.split_name(split)}: {cut} of {total} {split} examples ({cut / total:.1%}) were "
                      f"longer than data.max_length={data.max_length} tokens and were truncated; raise "
                      f"data.max_length to keep them whole (the model reads up to its own limit)")


def _map_conversations(data: Any, split: str, rows: list[dict], tokenizer: PreTrainedTokenizerBase):
    import datasets

    datasets.enable_progress_bars()
    try:
        ds = datasets.Dataset.from_list(rows).map(
            lambda row: data.encode(row, tokenizer), remove_columns=list(rows[0]), num_proc=data.num_proc,
            desc=f"tokenising {split}")
    finally:
        datasets.disable_progress_bars()
    cut = sum(1 for n in ds["overflow"] if n)
    data.report(split, cut, len(ds))
    if data.overflow == "drop" and cut:
        ds = ds.filter(lambda e: e["overflow"] == 0)
        if len(ds) == 0:
            raise ConfigError(f"Every {split} conversation is longer than data.max_length={data.max_length}, and "
                              f"data.overflow=drop left none. Raise data.max_length or use data.overflow=truncate.")
    return ds.remove_columns(["overflow"])


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


def pack(features: list[dict], max_length: int) -> list[list[dict]]:
    """Group examples into rows of at most ``max_length`` tokens, first fit in the given order (so the
    packing is a function of the step's examples alone)."""
    rows: list[list[dict]] = []
    room: list[int] = []
    for feature in features:
        n = len(feature["input_ids"])
        fit = next((i for i, free in enumerate(room) if free >= n), None)
        if fit is None:
            rows.append([feature])
            room.append(max_length - n)
        else:
            rows[fit].append(feature)
            room[fit] -= n
    return rows


def collate_packed(rows: list[list[dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Packed rows as ``input_ids``, ``labels`` and ``position_ids`` (no attention mask).

    Positions restart at 0 for every example; with no attention mask and no KV cache, transformers
    builds the block-diagonal mask from them (the varlen kernels on flash attention), so no token
    attends across examples. The first token of each example is unlabelled: what predicts it is the
    previous example's last token, a term the unpacked loss never has (its label 0 is dropped by the
    shift anyway). Padding is one more sequence of its own, unlabelled.
    """
    longest = max(sum(len(f["input_ids"]) for f in row) for row in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        row_ids, row_labels, row_positions = [], [], []
        for feature in row:
            n = len(feature["input_ids"])
            row_ids += feature["input_ids"]
            row_labels += [IGNORE_INDEX] + list(feature["labels"][1:])
            row_positions += list(range(n))
        pad = longest - len(row_ids)
        ids.append(row_ids + [pad_token_id] * pad)
        labels.append(row_labels + [IGNORE_INDEX] * pad)
        positions.append(row_positions + list(range(pad)))
    return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "position_ids": torch.tensor(positions)}


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
