"""Prediction passes and metrics, shared by the trainer's evaluation and ``lorafit eval``."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.data.tasks import IGNORE_INDEX, collate


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task: str) -> torch.Tensor:
    """The *summed* loss of a batch (the trainer divides by the step's global unit count).

    classification and multiple_choice: cross-entropy per example (over classes or choices);
    regression: squared error per example; causal_lm: next-token cross-entropy per labelled token
    (prompt tokens carry -100).
    """
    if task in ("classification", "multiple_choice"):
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    if task == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    shifted = logits[:, :-1].float()
    return F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes: the batch without ``labels`` and ``choice_mask``."""
    return {k: v for k, v in batch.items() if k not in ("labels", "choice_mask")}


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits for a batch; padded choices (``choice_mask`` False) get the lowest value."""
    logits = model(**model_inputs(batch)).logits
    mask = batch.get("choice_mask")
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), torch.finfo(logits.dtype).min)
    return logits


@torch.no_grad()
def predict(model: nn.Module, dataset: Any, task: str, batch_size: int, pad_token_id: int,
            device: torch.device, accelerator: Optional[Any] = None, progress: Any = None) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` in order.

    With an ``accelerator`` of several processes, each process takes a contiguous share and the
    results are gathered back in file order.

    Returns:
        ``{"predictions": [...], "labels": [...]}`` for classification and multiple_choice (class or
        choice ids) and regression (floats); ``{"loss": mean token loss, "tokens": n}`` for causal_lm.
    """
    indices = list(range(len(dataset)))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as share:
            indices = list(share)
    was_training = model.training
    model.eval()
    predictions, labels, loss_sum, tokens = [], [], 0.0, 0
    for start in range(0, len(indices), batch_size):
        rows = dataset.select(indices[start:start + batch_size])
        batch = {k: v.to(device) for k, v in collate(list(rows), pad_token_id).items()}
        logits = forward_logits(model, batch)
        if task == "causal_lm":
            loss_sum += float(task_loss(logits, batch["labels"], task))
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        else:
            out = logits.float().squeeze(-1) if task == "regression" else logits.argmax(-1)
            predictions += out.tolist()
            labels += batch["labels"].tolist()
        if progress is not None:
            progress(len(rows))
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        if task == "causal_lm":
            parts = gather_object([(loss_sum, tokens)])
            loss_sum, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
        else:
            predictions, labels = gather_object(predictions), gather_object(labels)
    if task == "causal_lm":
        return {"loss": loss_sum / max(tokens, 1), "tokens": tokens}
    return {"predictions": predictions, "labels": labels}


def score(data_cfg: Any, result: dict[str, Any]) -> dict[str, float]:
    """Metrics of one split from :func:`predict`'s result (plus ``n``, the examples scored)."""
    if "loss" in result:
        return {"loss": result["loss"], "perplexity": math.exp(min(result["loss"], 50.0)), "n": result["tokens"]}
    metrics = data_cfg.metrics(result["predictions"], result["labels"])
    metrics["n"] = len(result["labels"])
    return metrics
