"""The events a method can listen to during training.

Adapters, inits and step rules return callbacks from their config's ``callbacks()``; the trainer
calls every callback at each event, in order. All counting is in optimizer steps
(``trainer.step``), never forward calls. Whatever a callback learns goes into
``state_dict()`` so that a resumed run ends with the same adapter as an uninterrupted one.

Events, in the order they happen:

- ``on_train_start(trainer)``: once, after resume, before the first step (data-driven inits);
- ``extra_loss(trainer) -> Tensor | None``: a regulariser added to each step's loss;
- ``after_backward(trainer)``: gradients of the whole step are accumulated (and synced);
- ``before_optimizer_step(trainer)``: after clipping (gradient transforms, e.g. preconditioning);
- ``take_step(trainer, closure)``: only for the one callback with ``owns_step = True`` (a step
  rule that is no torch optimizer, CTR's trust region): it moves the parameters itself, and may
  re-run the step's forward through ``closure`` (:class:`lorafit.train.trainer.StepClosure`);
- ``after_optimizer_step(trainer)``: before ``zero_grad`` (rank allocators, masks);
- ``on_evaluate(trainer, metrics)`` and ``on_save(trainer, folder)``.

``step_metrics(trainer) -> dict`` is read after every step: a callback that returns numbers (a
trust region's ρ and radius) gets them written into that step's row of ``metrics.jsonl``, and
a row is then written every step, whatever ``log_every`` says.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


class Callback:
    """No-op base: override only the events you need."""

    owns_step: bool = False
    """True for a step rule that replaces the optimizer step (then ``optimizer.build`` returns None)."""
    works_sharded: bool = False
    """True for a callback that touches no whole weight between steps, so that it runs under
    ``hardware=fsdp`` (where every weight is held in shards)."""

    def on_train_start(self, trainer: Any) -> None: ...

    def extra_loss(self, trainer: Any) -> Optional[torch.Tensor]:
        return None

    def after_backward(self, trainer: Any) -> None: ...

    def before_optimizer_step(self, trainer: Any) -> None: ...

    def take_step(self, trainer: Any, closure: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} sets owns_step but has no take_step")

    def after_optimizer_step(self, trainer: Any) -> None: ...

    def on_evaluate(self, trainer: Any, metrics: dict) -> None: ...

    def on_save(self, trainer: Any, folder: Any) -> None: ...

    def step_metrics(self, trainer: Any) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
