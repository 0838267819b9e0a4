"""Plain optimizers: AdamW (default) and SGD, with a linear/cosine/constant schedule and warm-up."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import get_scheduler

from lorafit.config import check_choice, check_range

SCHEDULES = ("linear", "cosine", "constant")


@dataclass
class Schedule:
    """Learning rate and its schedule, shared by every optimizer option.

    Attributes:
        lr: peak learning rate. Default: 5e-4 (AdamW) / 1e-2 (SGD).
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay on every trainable tensor.
        scheduler: ``linear`` decay to 0, ``cosine`` decay to 0, or ``constant`` — after warm-up.
        warmup_steps: linear warm-up steps; if 0, ``warmup_ratio`` × total steps, rounded to the nearest
            step (transformers' ``Trainer`` rounds up: 0.06 × 50 is 3 in both, 0.06 × 20 is 1 here, 2 there).
    """

    lr: float = 5e-4
    weight_decay: float = 0.0
    scheduler: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_range("optimizer.lr", self.lr, 0, low_inclusive=False)
        check_range("optimizer.weight_decay", self.weight_decay, 0)
        check_choice("optimizer.scheduler", self.scheduler, SCHEDULES)
        check_range("optimizer.warmup_steps", self.warmup_steps, 0)
        check_range("optimizer.warmup_ratio", self.warmup_ratio, 0, 1)

    def param_groups(self, named_params: list[tuple[str, nn.Parameter]]) -> list[dict]:
        """One group at ``lr``, plus one per distinct ``param.lorafit_lr`` an adapter asked for
        (e.g. RoSA's ``sparse_lr``); the schedule scales every group alike."""
        groups: dict[float, list[nn.Parameter]] = {}
        for _, param in named_params:
            groups.setdefault(getattr(param, "lorafit_lr", self.lr), []).append(param)
        return [{"params": params, "lr": lr} for lr, params in groups.items()]

    def make_scheduler(self, optimizer: torch.optim.Optimizer, total_steps: int):
        warmup = self.warmup_steps or int(round(self.warmup_ratio * total_steps))
        name = "constant_with_warmup" if self.scheduler == "constant" else self.scheduler
        return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


@dataclass
class AdamWConfig(Schedule):
    """``optimizer=adamw`` (torch.optim.AdamW)."""

    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    def state_copies(self) -> int:
        """fp32 values of optimizer state per trainable value (two moments)."""
        return 2

    def build(self, named_params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.param_groups(named_params), lr=self.lr, betas=(self.beta1, self.beta2),
                                 eps=self.eps, weight_decay=self.weight_decay)


@dataclass
class SGDConfig(Schedule):
    """``optimizer=sgd`` (torch.optim.SGD)."""

    lr: float = 1e-2
    momentum: float = 0.0

    def state_copies(self) -> int:
        """fp32 values of optimizer state per trainable value (the momentum buffer, if any)."""
        return 1 if self.momentum else 0

    def build(self, named_params: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.param_groups(named_params), lr=self.lr, momentum=self.momentum,
                               weight_decay=self.weight_decay)
