"""LoRA-Dash (Si et al., 2024, arXiv 2409.01035): LoRA, then a boost along task-specific directions.

Two phases, counted in optimizer steps:

1. "pre-launch" (the first ``t`` steps): plain LoRA, ``ΔW = s·B A``.
2. At step t, per layer: ``W0 = U Σ Vᵀ`` (fp32), ``δ_i = u_iᵀ ΔW v_i`` — how much the LoRA update
   moves W0 along its own i-th singular direction —, score ``|δ_i| / σ_i``; the top-s pairs
   ``(u_i, v_i)`` become frozen buffers ``U_s``, ``V_s``. From then on

       W = W0 + s·B A + U_s diag(d) V_sᵀ        (no α/r on the second term)

   with d ∈ R^s trainable, starting at 0, so the switch leaves the model's outputs unchanged.

``d`` is a parameter from step 0 — it sits in the optimizer from the start and receives an exact
zero gradient while ``U_s`` and ``V_s`` are zero (before step t) — and its optimizer state is
cleared at the switch so Adam starts it fresh. ``δ`` is computed from the small products
``(Uᵀ B)`` and ``(A V)``; ΔW is never formed. The buffers are part of the saved adapter, so a
reloaded or resumed model carries the directions; the switch itself needs no other state.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters import adapter_layers
from lorafit.adapters.lora import LoRAConfig, LoRALinear
from lorafit.callbacks import Callback
from lorafit.config import check_range


@dataclass
class LoRADashConfig(LoRAConfig):
    """``adapter=lora_dash``: LoRA's keys plus

    Attributes:
        t: pre-launch length in optimizer steps; the directions are chosen after step t. Default: 100.
        s: number of task-specific directions per layer. Default: 8.
    """

    roles: ClassVar[tuple[str, ...]] = ("A", "B", "vector")

    t: int = 100
    s: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("adapter.t", self.t, 0)
        check_range("adapter.s", self.s, 1)

    def check(self, name: str, layer: nn.Module) -> str | None:
        problem = super().check(name, layer)
        if problem is None and self.s > min(layer.in_features, layer.out_features):
            problem = f"{name} is {layer.out_features}×{layer.in_features}, fewer directions than adapter.s={self.s}"
        return problem

    def wrap(self, layer: nn.Linear) -> "LoRADashLinear":
        return LoRADashLinear(layer, r=self.r, scaling=self.scaling, dropout=self.dropout, s=self.s)

    def callbacks(self) -> list[Callback]:
        return [DashLaunch(self.t)]


class LoRADashLinear(LoRALinear):
    """LoRA plus ``U_s diag(d) V_sᵀ`` (the directions are zero until the launch)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0, s: int = 8) -> None:
        super().__init__(base, r, scaling, dropout)
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.s = s
        self.register_buffer("dash_U", torch.zeros(base.out_features, s, **factory))
        self.register_buffer("dash_V", torch.zeros(base.in_features, s, **factory))
        self.dash_d = nn.Parameter(torch.zeros(s, **factory))
        self.dash_d.lorafit_role = "vector"

    def delta_weight(self) -> torch.Tensor:
        return super().delta_weight() + (self.dash_U * self.dash_d) @ self.dash_V.T

    def low_rank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """LoRA's factors and the s directions: ``([B_lora, U diag(d)], [A_lora; Vᵀ])``, rank ≤ r + s."""
        B, A = super().low_rank_update()
        return torch.cat([B, (self.dash_U * self.dash_d).detach()], 1), torch.cat([A, self.dash_V.T.detach()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        if self.disabled or self.merged:
            return out
        dash = F.linear(F.linear(x.to(self.dash_V.dtype), self.dash_V.T) * self.dash_d, self.dash_U)
        return out + dash.to(out.dtype)

    @torch.no_grad()
    def launch(self) -> torch.Tensor:
        """Choose the top-s directions of W0 by |u_iᵀ ΔW v_i| / σ_i; returns their indices.

        W0 is the pre-trained weight and ΔW what LoRA has learnt: after an init that rewrote the base
        (PiSSA, OLoRA …) that is ``W_res + s·B0A0`` and ``s(BA − B0A0)``, not the residual and ``s·BA``."""
        U, S, Vh = torch.linalg.svd(self.original_weight(), full_matrices=False)
        V = Vh.T
        B, A = LoRALinear.low_rank_update(self)                                     # ΔW = B A, scale folded
        delta = ((U.T @ B) * (A @ V).T).sum(1)                                      # δ_i = (UᵀB)_i·(AV)_:,i
        score = delta.abs() / S.clamp_min(torch.finfo(S.dtype).tiny)
        chosen = torch.topk(score, self.s).indices.sort().values
        self.dash_U.copy_(U[:, chosen])
        self.dash_V.copy_(V[:, chosen])
        self.dash_d.zero_()
        return chosen


class DashLaunch(Callback):
    """After optimizer step ``t``: pick every layer's directions and restart d's optimizer state."""

    def __init__(self, t: int) -> None:
        self.t = t

    def on_train_start(self, trainer: Any) -> None:
        if self.t == 0 and trainer.step == 0:
            self._launch(trainer)

    def after_optimizer_step(self, trainer: Any) -> None:
        if trainer.step + 1 == self.t:
            self._launch(trainer)

    def _launch(self, trainer: Any) -> None:
        for layer in adapter_layers(trainer.unwrapped()).values():
            if isinstance(layer, LoRADashLinear):
                layer.launch()
                trainer.optimizer.state.pop(layer.dash_d, None)
