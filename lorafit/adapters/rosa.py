"""RoSA: robust adaptation = low-rank + sparse (Nikdan et al., 2024, arXiv 2401.04679).

    ΔW = s·B A + S,     S sparse with a fixed mask of k = ⌊density · out · in⌋ entries

Schedule ``wl{N}`` (the paper's "warm-up LoRA"), counted in optimizer steps:

1. steps 0 … N−1: plain LoRA (S is off);
2. the next ``spa_num_grads`` steps: LoRA still trains, and the dense gradient of every target
   weight W0 is collected as the mean of the per-step squared gradients (the empirical diagonal
   Fisher); the base weights get ``requires_grad`` for those steps only, and each gradient is
   freed as soon as it has been added;
3. then, per layer, the mask = the top-k entries of that score; from there on LoRA + sparse train
   together (the sparse values may use their own learning rate, ``sparse_lr``; the paper used
   2e-4 for S against 7e-4 for LoRA).

Storage is sparse: a buffer of the k flat indices and a parameter of the k values, both of fixed
size from the start (so d is in the optimizer from step 0 and every checkpoint has one shape).
While the mask is not chosen the values are multiplied by 0 (``sparse_on``), so they receive an
exact zero gradient and stay 0 (the sparse product still runs, on placeholder indices: no
data-dependent branch, no device sync); at the switch their optimizer state is cleared. The forward adds
``S x`` with ``torch.sparse.mm`` on a COO matrix built from (indices, values); S is never dense.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from lorafit.adapters import adapter_layers
from lorafit.adapters.lora import LoRAConfig, LoRALinear
from lorafit.callbacks import Callback
from lorafit.config import ConfigError, check_choice, check_range
from lorafit.quant import WeightGradients, is_quantized


@dataclass
class RoSAConfig(LoRAConfig):
    """``adapter=rosa``: LoRA's keys plus

    Attributes:
        density: fraction d of each target weight's entries in the sparse part. Default: 0.005.
        schedule: ``wl{N}``: N optimizer steps of LoRA alone before the gradients are collected. Default: wl64.
        spa_num_grads: steps over which the squared dense gradients are averaged. Default: 1.
        sparse_lr: learning rate of the sparse values (null: the optimizer's lr). Default: null.
        fisher: what is squared: ``step`` (each optimizer step's gradient, however the step is split
            into micro-batches and processes: 1 process = N processes = gradient accumulation) or
            ``micro_batch`` (each micro-batch's gradient, summed: the authors' collector; it differs
            from ``step`` under gradient accumulation or several processes). Default: step.
    """

    roles: ClassVar[tuple[str, ...]] = ("A", "B", "delta")

    density: float = 0.005
    schedule: str = "wl64"
    spa_num_grads: int = 1
    sparse_lr: Optional[float] = None
    fisher: str = "step"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_choice("adapter.fisher", self.fisher, ["step", "micro_batch"])
        check_range("adapter.density", self.density, 0, 1, low_inclusive=False)
        check_range("adapter.spa_num_grads", self.spa_num_grads, 1)
        if self.sparse_lr is not None:
            check_range("adapter.sparse_lr", self.sparse_lr, 0, low_inclusive=False)
        if not re.fullmatch(r"wl\d+", self.schedule):
            raise ConfigError(f"adapter.schedule='{self.schedule}' is not a RoSA schedule. Use wl<N>, e.g. wl64: "
                              f"N optimizer steps of LoRA alone before the sparse mask is chosen.")

    @property
    def warmup(self) -> int:
        return int(self.schedule[2:])

    def check(self, name: str, layer: nn.Module) -> Optional[str]:
        problem = super().check(name, layer)
        if problem is None and int(self.density * layer.out_features * layer.in_features) == 0:
            problem = (f"{name} has {layer.out_features * layer.in_features} weights; adapter.density={self.density} "
                       f"keeps none of them")
        return problem

    def wrap(self, layer: nn.Linear) -> "RoSALinear":
        return RoSALinear(layer, r=self.r, scaling=self.scaling, dropout=self.dropout, density=self.density,
                          sparse_lr=self.sparse_lr)

    def callbacks(self) -> list[Callback]:
        return [SparseMaskSchedule(self.warmup, self.spa_num_grads, self.fisher == "micro_batch")]


class RoSALinear(LoRALinear):
    """LoRA plus a sparse ``S`` stored as (flat indices, values)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0, density: float = 0.005,
                 sparse_lr: Optional[float] = None) -> None:
        super().__init__(base, r, scaling, dropout)
        k = int(density * base.out_features * base.in_features)   # not weight.numel(): 4-bit weights are packed
        device = base.weight.device
        # Distinct, sorted placeholder indices until the mask is chosen (values are 0 and switched off).
        self.register_buffer("sparse_index", torch.arange(k, dtype=torch.int64, device=device))
        self.register_buffer("sparse_on", torch.zeros((), device=device))       # 0 until the mask exists
        self.sparse_values = nn.Parameter(torch.zeros(k, device=device))
        self.sparse_values.lorafit_role = "delta"   # entries of ΔW itself, not a factor
        if sparse_lr is not None:
            self.sparse_values.lorafit_lr = sparse_lr   # read by the optimizer's parameter groups

    def sparse_matrix(self) -> torch.Tensor:
        """S as a (coalesced) sparse COO tensor, differentiable in ``sparse_values``."""
        rows = torch.div(self.sparse_index, self.base.in_features, rounding_mode="floor")
        cols = self.sparse_index % self.base.in_features
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), self.sparse_values * self.sparse_on,
                                       (self.base.out_features, self.base.in_features), is_coalesced=True,
                                       check_invariants=False)

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight() + self.sparse_matrix().to_dense()

    def low_rank_update(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """LoRA's factors while the sparse part is still zero; after that, none (S has no low-rank form)."""
        if bool((self.sparse_values * self.sparse_on).any()):
            return None
        return super().low_rank_update()

    def why_not_low_rank(self) -> str:
        return "its sparse part S (ΔW = s·BA + S) has no low-rank form"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.disabled or self.merged:
            return out
        flat = x.reshape(-1, x.shape[-1]).to(self.sparse_values.dtype)
        if x.device.type == "meta":   # `lorafit estimate` traces shapes only: S x has x's token shape
            sparse = flat.new_empty(flat.shape[0], self.base.out_features)
        else:
            with torch.autocast(x.device.type, enabled=False):      # sparse × dense has no bf16 autocast rule
                sparse = torch.sparse.mm(self.sparse_matrix(), flat.T).T         # (S x) for every token
        return out + sparse.reshape(*x.shape[:-1], -1).to(out.dtype)

    @torch.no_grad()
    def set_mask(self, score: torch.Tensor) -> None:
        """Keep the top-k entries of ``score`` (out×in): indices sorted, values 0, sparse part on."""
        k = self.sparse_index.numel()
        self.sparse_index.copy_(torch.topk(score.flatten(), k).indices.sort().values)
        self.sparse_values.zero_()
        self.sparse_on.fill_(1.0)


class SparseMaskSchedule(Callback):
    """RoSA's ``wl{N}`` schedule: LoRA alone, gradient collection, then the fixed sparse mask.

    Optimizer step k (0-based) is a collection step if ``N ≤ k < N + spa_num_grads``; the mask is
    set after the last of them. The partial sums are part of ``state_dict`` so a run resumed in the
    middle of the collection ends with the same mask.
    """

    def __init__(self, warmup: int, num_grads: int, per_micro_batch: bool = False) -> None:
        self.warmup = warmup
        self.num_grads = num_grads
        self.per_micro_batch = per_micro_batch
        self.fisher: dict[str, torch.Tensor] = {}
        self._hooks: Optional[WeightGradients] = None   # quantised bases: W0's gradient from hooks
        self._squares: dict[str, torch.Tensor] = {}     # micro_batch: this step's Σ g_mb², from tensor hooks
        self._handles: list = []

    def _layers(self, trainer: Any) -> dict[str, RoSALinear]:
        return {n: m for n, m in adapter_layers(trainer.unwrapped()).items() if isinstance(m, RoSALinear)}

    def _collecting(self, step: int) -> bool:
        return self.warmup <= step < self.warmup + self.num_grads

    def _dense_grads(self, trainer: Any, on: bool) -> None:
        """Make the backward pass compute W0's gradient (``requires_grad``; hooks on a quantised base)."""
        layers = self._layers(trainer)
        if any(is_quantized(layer.base) for layer in layers.values()):
            if self.per_micro_batch:
                raise ConfigError("adapter.fisher=micro_batch needs W0's gradient per micro-batch, which a quantised "
                                  "base does not give (its W0 gradient comes from hooks, summed per step). Use "
                                  "adapter.fisher=step, or model.quantization=none.")
            if on and self._hooks is None:
                self._hooks = WeightGradients(layers, store=trainer.accelerator.device).__enter__()
            elif not on and self._hooks is not None:
                self._hooks.__exit__(None, None, None)
                self._hooks = None
            return
        for layer in layers.values():
            layer.base.weight.requires_grad_(on)
            layer.base.weight.grad = None
        for handle in self._handles:
            handle.remove()
        self._handles = [layer.base.weight.register_hook(self._square_hook(name))
                         for name, layer in layers.items()] if on and self.per_micro_batch else []

    def _square_hook(self, name: str):
        """Add the square of each micro-batch's W0 gradient as it arrives (before it is accumulated)."""
        def add(grad: torch.Tensor) -> None:
            square = grad.float().pow(2)
            self._squares[name] = square if name not in self._squares else self._squares[name] + square
        return add

    def _step_gradients(self, trainer: Any) -> dict[str, torch.Tensor]:
        """This step's W0 gradient of every layer (summed over micro-batches), cleared for the next."""
        if self._hooks is not None:
            grads, self._hooks.sums = self._hooks.sums, {}
            return grads
        grads = {}
        for name, layer in self._layers(trainer).items():
            grads[name] = layer.base.weight.grad.float()
            layer.base.weight.grad = None
        return grads

    def on_train_start(self, trainer: Any) -> None:
        if self._collecting(trainer.step):
            self._dense_grads(trainer, True)

    def after_backward(self, trainer: Any) -> None:
        if not self._collecting(trainer.step):
            return
        acc = trainer.accelerator
        for name, grad in self._step_gradients(trainer).items():
            if self.per_micro_batch:    # the squares were taken per micro-batch; every process's count
                square = self._squares.pop(name)
                square = acc.reduce(square, "sum") if acc.num_processes > 1 else square
            else:
                if acc.num_processes > 1:   # W0 is not a DDP parameter: average it like DDP would
                    grad = acc.reduce(grad, "mean")
                square = grad.pow(2)
            previous = self.fisher.get(name)
            self.fisher[name] = square if previous is None else previous.to(square.device) + square

    def after_optimizer_step(self, trainer: Any) -> None:
        step = trainer.step
        if step + 1 == self.warmup:
            self._dense_grads(trainer, True)                 # the next step collects
        if step + 1 == self.warmup + self.num_grads:
            for name, layer in self._layers(trainer).items():
                layer.set_mask(self.fisher.pop(name) / self.num_grads)
                trainer.optimizer.state.pop(layer.sparse_values, None)
            self._dense_grads(trainer, False)

    def state_dict(self) -> dict:
        return {"fisher": {k: v.cpu() for k, v in self.fisher.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.fisher = dict(state.get("fisher", {}))
