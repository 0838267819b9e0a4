"""The ``task`` group: what a run optimises, as one small protocol the trainer calls unconditionally.

Three options implement :class:`Task`: ``task=supervised`` (:class:`SupervisedTask`, below: the
data's own loss), ``task=reward`` (:class:`lorafit.rlhf.reward.RewardTask`: a pairwise reward model)
and ``task=rl`` (:class:`lorafit.rlhf.rl.RLTask`: a policy against a reward).

Words: the *task* is what is optimised; the *head* is the model's output kind
(``classification``, ``regression``, ``multiple_choice``, ``causal_lm``, ``reward``), decided by the
data option (``data.head``); a *benchmark task* (``data.task=sst2``, ``tasks=[boolq]``) names a dataset.

This module also holds what every head computes: its summed loss (:func:`head_loss`), the forward
pass (:func:`forward_logits`), and the prediction pass and metrics of evaluation (:func:`predict`,
:func:`score`), shared by the trainer, the inits and step rules that need a loss, and ``lorafit eval``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.callbacks import Callback
from lorafit.config import ConfigError
from lorafit.data.batches import IGNORE_INDEX, collate, count_loss_units

Batch = dict[str, torch.Tensor]


class Task(Protocol):
    """What the trainer asks of the ``task`` option, at these moments:

    - ``prepare(cfg)``: once, before anything loads: check that model, data and settings fit;
    - ``callbacks()``: trainer callbacks the task needs (RL's per-step metrics);
    - ``count_units(batch)``: how many terms a micro-batch adds to the loss (the step's loss is the
      sum over micro-batches and processes divided by the global count);
    - ``forward(trainer, batch, model)``: one micro-batch's ``(outputs, summed loss)``, with the graph
      to the trainable parameters; ``outputs`` are the logits a second-order step rule differentiates
      through (``None`` where the loss is not a function of logits of the batch alone);
    - ``evaluate(trainer, dataset)``: the metrics of one evaluation split.
    """

    def prepare(self, cfg: Any) -> None: ...

    def callbacks(self) -> list[Callback]: ...

    def count_units(self, batch: Batch) -> int: ...

    def forward(self, trainer: Any, batch: Batch, model: nn.Module) -> tuple[Optional[torch.Tensor], torch.Tensor]: ...

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]: ...


# ----------------------------------------------------------------------------- what heads compute
def head_loss(logits: torch.Tensor, labels: torch.Tensor, head: str) -> torch.Tensor:
    """The *summed* loss of a batch (the trainer divides by the step's global unit count).

    classification and multiple_choice: cross-entropy per example (over classes or choices);
    regression: squared error per example; causal_lm: next-token cross-entropy per labelled token
    (prompt tokens carry -100).
    """
    if head in ("classification", "multiple_choice"):
        return F.cross_entropy(logits.float(), labels, reduction="sum")
    if head == "regression":
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    # position t predicts label t+1: shift the labels (one ignored label appended), not the logits,
    # whose (batch × length × vocab) copy would cost as much memory traffic as the output layer
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def model_inputs(batch: Batch) -> Batch:
    """What the model's forward takes: the batch without ``labels`` and ``choice_mask``."""
    return {k: v for k, v in batch.items() if k not in ("labels", "choice_mask")}


def forward_logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The model's logits for a batch; padded choices (``choice_mask`` False) get the lowest value.

    A packed batch (``position_ids``, no attention mask) runs without a KV cache: only then does
    transformers derive the block-diagonal mask from the restarting positions.
    """
    extra = {"use_cache": False} if "position_ids" in batch else {}
    logits = model(**model_inputs(batch), **extra).logits
    mask = batch.get("choice_mask")
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), torch.finfo(logits.dtype).min)
    return logits


@torch.no_grad()
def predict(model: nn.Module, dataset: Any, head: str, batch_size: int, pad_token_id: int,
            device: torch.device, accelerator: Optional[Any] = None, progress: Any = None) -> dict[str, Any]:
    """Run ``model`` over ``dataset`` in order.

    With an ``accelerator`` of several processes, each process takes a contiguous share and the
    results are gathered back in file order. The shares are equal (the last padded with repeats of
    its final example, whose results are dropped): under FSDP every forward is a collective, so every
    process must run as many as the others.

    Returns:
        ``{"predictions": [...], "labels": [...]}`` for classification and multiple_choice (class or
        choice ids) and regression (floats); ``{"loss": mean token loss, "tokens": n}`` for causal_lm.
    """
    indices = list(range(len(dataset)))
    real = len(indices)
    if accelerator is not None and accelerator.num_processes > 1:
        share = -(-len(indices) // accelerator.num_processes)
        mine = indices[accelerator.process_index * share:(accelerator.process_index + 1) * share]
        real, indices = len(mine), mine + [mine[-1] if mine else 0] * (share - len(mine))
    was_training = model.training
    model.eval()
    predictions, labels, loss_sum, tokens = [], [], 0.0, 0
    for start in range(0, len(indices), batch_size):
        rows = dataset.select(indices[start:start + batch_size])
        keep = max(0, min(len(rows), real - start))            # the rows that are not padding
        batch = {k: v.to(device) for k, v in collate(list(rows), pad_token_id).items()}
        logits = forward_logits(model, batch)
        if head == "causal_lm":
            batch["labels"][keep:] = IGNORE_INDEX
            loss_sum += float(head_loss(logits, batch["labels"], head))
            tokens += int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        else:
            out = logits.float().squeeze(-1) if head == "regression" else logits.argmax(-1)
            predictions += out[:keep].tolist()
            labels += batch["labels"][:keep].tolist()
        if progress is not None:
            progress(keep)
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        if head == "causal_lm":
            parts = gather_object([(loss_sum, tokens)])
            loss_sum, tokens = sum(p[0] for p in parts), sum(p[1] for p in parts)
        else:
            predictions, labels = gather_object(predictions), gather_object(labels)
    if head == "causal_lm":
        return {"loss": loss_sum / max(tokens, 1), "tokens": tokens}
    return {"predictions": predictions, "labels": labels}


def score(data_cfg: Any, result: dict[str, Any]) -> dict[str, float]:
    """Metrics of one split from :func:`predict`'s result (plus ``n``, the examples scored)."""
    if "loss" in result:
        return {"loss": result["loss"], "perplexity": math.exp(min(result["loss"], 50.0)), "n": result["tokens"]}
    metrics = data_cfg.metrics(result["predictions"], result["labels"])
    metrics["n"] = len(result["labels"])
    return metrics


# ----------------------------------------------------------------------------- task=supervised
@dataclass
class SupervisedTask:
    """``task=supervised`` (the default): minimise the data option's own loss (cross-entropy,
    squared error or next-token loss, :func:`head_loss`)."""

    def prepare(self, cfg: Any) -> None:
        """Refuse data that only a special task can train on (``data=preference``)."""
        if cfg.data.head == "reward":
            raise ConfigError("data=preference holds preference pairs, which train a reward model: add task=reward "
                              "(e.g. `lorafit train task=reward data=preference data.path=FILE`).")

    def callbacks(self) -> list[Callback]:
        return []

    def count_units(self, batch: Batch) -> int:
        return count_loss_units(batch)

    def forward(self, trainer: Any, batch: Batch, model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        logits = forward_logits(model, batch)
        return logits, head_loss(logits, batch["labels"], trainer.head)

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        return evaluate_head(trainer, dataset)


def evaluate_head(trainer: Any, dataset: Any) -> dict[str, float]:
    """The data's own metrics of the trained model on one split (loss and perplexity for causal LMs)."""
    result = predict(trainer.model, dataset, trainer.head, trainer.cfg.data.eval_batch_size, trainer.pad_id,
                     trainer.accelerator.device, trainer.accelerator)
    return score(trainer.cfg.data, result)
