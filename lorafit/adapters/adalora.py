"""AdaLoRA: adaptive budget allocation (Zhang et al., 2023, arXiv 2303.10512).

An SVD-shaped update whose ranks are pruned during training (paper eq. 3):

    ΔW = B diag(E) A · α / init_r          A ∈ R^{r×in}, E ∈ R^{r}, B ∈ R^{out×r}, r = init_r

E starts at 0 (so ΔW = 0), A and B at N(0, 0.02). The divisor is init_r for the whole run (it
does not follow the pruned rank). The rank allocator (:class:`RankAllocator`, a trainer callback)
runs after every optimizer step, before ``zero_grad``, counting t = optimizer steps completed:

- sensitivity of every entry of A, E, B: ``I = |p ⊙ ∇p|``; smoothed ``Ī ← β1 Ī + (1−β1) I``,
  uncertainty ``Ū ← β2 Ū + (1−β2) |I − Ī|``, score ``s = Ī ⊙ Ū`` (paper eqs. 8–10);
- triplet score ``S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji)`` (eq. 11);
- budget (total rank over all layers): b_0 = Σ init_r until tinit, then the cubic decrease
  ``b(t) = b_T + (b_0 − b_T)(1 − (t − tinit)/(T − tfinal − tinit))³`` (truncated to an integer),
  b_T = target_r × layers; every ΔT steps the E entries whose score is ≤ the k-th smallest
  (k = b_0 − b(t)) are set to 0; at t = T − tfinal the final mask is chosen and frozen (re-applied
  after every later step). Masked entries keep training between masking steps, as in the paper.
- the orthogonality penalty ``R = mean over layers of ‖AAᵀ − I‖_F and ‖BᵀB − I‖_F`` is added to
  the loss with weight ``orth_reg``.

T is the trainer's total step count (never a user setting). The current mask is a buffer of each
layer (saved with the adapter) and, as ``kept_triplets``, part of the saved adapter config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters import AdditiveAdapter, adapter_layers
from lorafit.config import ConfigError, check_range
from lorafit.callbacks import Callback


@dataclass
class AdaLoRAConfig:
    """``adapter=adalora``.

    Attributes:
        init_r: starting rank of every layer. Default: 12.
        target_r: average final rank per layer (budget b_T = target_r × layers). Default: 8.
        alpha: scale numerator; ΔW carries α / init_r. Default: 16.
        dropout: dropout on the adapter path only. Default: 0.0.
        beta1, beta2: EMA factors of sensitivity and uncertainty. Default: 0.85, 0.85.
        orth_reg: weight of the orthogonality penalty. Default: 0.5.
        tinit: optimizer steps at full budget before pruning starts. Default: 0.
        tfinal: optimizer steps trained with the final, frozen mask. Default: 0.
        delta_t: mask every delta_t steps while the budget shrinks. Default: 1.
        kept_triplets: written by training (layer → which of the init_r triplets are kept; PEFT
            calls this rank_pattern, a name lorafit leaves to PEFT's integer ranks); leave null. Default: null.
        target_modules: name patterns of the layers to adapt (null: the architecture's defaults).
    """

    uses_total_steps: ClassVar[bool] = True   # the budget schedule ends tfinal steps before the last one

    init_r: int = 12
    target_r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg: float = 0.5
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    kept_triplets: Optional[dict[str, list[bool]]] = None
    target_modules: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_range("adapter.init_r", self.init_r, 1)
        check_range("adapter.target_r", self.target_r, 1)
        if self.target_r > self.init_r:
            raise ConfigError(f"adapter.target_r={self.target_r} exceeds adapter.init_r={self.init_r}: AdaLoRA only "
                              f"prunes ranks. Choose target_r ≤ init_r.")
        check_range("adapter.alpha", self.alpha, 0, low_inclusive=False)
        check_range("adapter.dropout", self.dropout, 0.0, 1.0)
        check_range("adapter.beta1", self.beta1, 0, 1, low_inclusive=False, high_inclusive=False)
        check_range("adapter.beta2", self.beta2, 0, 1, low_inclusive=False, high_inclusive=False)
        check_range("adapter.orth_reg", self.orth_reg, 0)
        check_range("adapter.tinit", self.tinit, 0)
        check_range("adapter.tfinal", self.tfinal, 0)
        check_range("adapter.delta_t", self.delta_t, 1)

    def check(self, name: str, layer: nn.Module) -> Optional[str]:
        if not isinstance(layer, nn.Linear):
            return f"{name} is a {type(layer).__name__}, not nn.Linear"
        return None

    def wrap(self, layer: nn.Linear) -> "AdaLoRALinear":
        return AdaLoRALinear(layer, self.init_r, self.alpha / self.init_r, self.dropout)

    def callbacks(self) -> list[Callback]:
        return [RankAllocator(self)]


class AdaLoRALinear(AdditiveAdapter):
    """A frozen ``nn.Linear`` plus ``B diag(E) A · α/init_r``."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = scaling
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, **factory) * 0.02)
        self.lora_E = nn.Parameter(torch.zeros(r, **factory))
        self.lora_B = nn.Parameter(torch.randn(base.out_features, r, **factory) * 0.02)
        self.register_buffer("rank_mask", torch.ones(r, dtype=torch.bool, device=base.weight.device))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B * self.lora_E) @ self.lora_A * self.scaling

    def low_rank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B diag(s·E), A)`` over the kept triplets (E ≠ 0): rank = what the budget left (0 if pruned)."""
        keep = self.lora_E != 0
        return (self.lora_B[:, keep] * (self.lora_E[keep] * self.scaling)).detach(), self.lora_A[keep].detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled or self.merged:
            return out
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * (self.lora_E * self.scaling)
        return out + F.linear(h, self.lora_B).to(out.dtype)

    def orthogonality(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)."""
        eye = torch.eye(self.r, device=self.lora_A.device)
        return (torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye),
                torch.linalg.matrix_norm(self.lora_B.T @ self.lora_B - eye))

    @torch.no_grad()
    def apply_mask(self, keep: torch.Tensor) -> None:
        self.rank_mask.copy_(keep)
        self.lora_E.masked_fill_(~keep, 0.0)

    def extra_repr(self) -> str:
        return f"init_r={self.r}, kept={int(self.rank_mask.sum())}, scaling={self.scaling:g}"


def budget_schedule(t: int, total: int, init_budget: int, target_budget: int, tinit: int, tfinal: int,
                    delta_t: int) -> tuple[int, bool]:
    """(budget, mask now?) after optimizer step t (1-based) of ``total`` (paper eq. 12)."""
    if t <= tinit:
        return init_budget, False
    if t > total - tfinal:
        return target_budget, True
    progress = 1 - (t - tinit) / (total - tfinal - tinit)
    return int((init_budget - target_budget) * progress ** 3 + target_budget), t % delta_t == 0


class RankAllocator(Callback):
    """AdaLoRA's importance scores, budget schedule, masking and orthogonality penalty."""

    def __init__(self, cfg: AdaLoRAConfig) -> None:
        self.cfg = cfg
        self.smoothed: dict[str, torch.Tensor] = {}     # Ī per parameter name
        self.uncertainty: dict[str, torch.Tensor] = {}  # Ū per parameter name
        self.final_mask: Optional[dict[str, torch.Tensor]] = None
        self.kept_triplets: Optional[dict[str, list[bool]]] = None  # the latest mask, for the adapter config

    @staticmethod
    def _layers(trainer: Any) -> dict[str, AdaLoRALinear]:
        return {n: m for n, m in adapter_layers(trainer.unwrapped()).items() if isinstance(m, AdaLoRALinear)}

    def on_train_start(self, trainer: Any) -> None:
        total, tinit, tfinal = trainer.total_steps, self.cfg.tinit, self.cfg.tfinal
        if tinit + tfinal >= total:
            raise ConfigError(f"adapter.tinit={tinit} + adapter.tfinal={tfinal} leave no steps for AdaLoRA's budget "
                              f"schedule in a run of {total} optimizer steps. Lower them (tinit + tfinal < {total}).")
        if self.cfg.kept_triplets is not None and self.kept_triplets is None:
            raise ConfigError("adapter.kept_triplets is written by training (the masks AdaLoRA's budget schedule "
                              "chose) and cannot be set: the schedule would overwrite it at its first masking step. "
                              "Leave it null; to start from a trained AdaLoRA adapter, resume its run.")
        if self.kept_triplets is not None:   # resumed: the saved config carries the restored mask
            trainer.assembled.meta["adapter"]["kept_triplets"] = self.kept_triplets

    def extra_loss(self, trainer: Any) -> Optional[torch.Tensor]:
        if self.cfg.orth_reg == 0:
            return None
        terms = [t for layer in self._layers(trainer).values() for t in layer.orthogonality()]
        return self.cfg.orth_reg * torch.stack(terms).mean()

    @torch.no_grad()
    def update_scores(self, layers: dict[str, AdaLoRALinear]) -> None:
        b1, b2 = self.cfg.beta1, self.cfg.beta2
        for name, layer in layers.items():
            for pname in ("lora_A", "lora_E", "lora_B"):
                p, key = getattr(layer, pname), f"{name}.{pname}"
                if p.grad is None:
                    continue
                sensitivity = (p * p.grad).abs()
                smoothed = self.smoothed.get(key, torch.zeros_like(p)).to(p.device)
                uncertainty = self.uncertainty.get(key, torch.zeros_like(p)).to(p.device)
                smoothed = b1 * smoothed + (1 - b1) * sensitivity
                self.uncertainty[key] = b2 * uncertainty + (1 - b2) * (sensitivity - smoothed).abs()
                self.smoothed[key] = smoothed

    def triplet_scores(self, layers: dict[str, AdaLoRALinear]) -> dict[str, torch.Tensor]:
        """S_i = s(E_i) + mean_j s(A_ij) + mean_j s(B_ji), per layer (r,)."""
        def score(key: str) -> torch.Tensor:
            return self.smoothed[key] * self.uncertainty[key]
        return {name: score(f"{name}.lora_E") + score(f"{name}.lora_A").mean(1) + score(f"{name}.lora_B").mean(0)
                for name in layers}

    @torch.no_grad()
    def mask_to_budget(self, layers: dict[str, AdaLoRALinear], budget: int) -> dict[str, torch.Tensor]:
        scores = self.triplet_scores(layers)
        k = sum(layer.r for layer in layers.values()) - budget
        if k <= 0:
            keep = {name: torch.ones_like(s, dtype=torch.bool) for name, s in scores.items()}
        else:
            threshold = torch.kthvalue(torch.cat(list(scores.values())), k).values
            keep = {name: s > threshold for name, s in scores.items()}
        for name, layer in layers.items():
            layer.apply_mask(keep[name])
        return keep

    def after_optimizer_step(self, trainer: Any) -> None:
        cfg, layers = self.cfg, self._layers(trainer)
        t, total = trainer.step + 1, trainer.total_steps
        final_start = total - cfg.tfinal
        if t > final_start:
            for name, layer in layers.items():
                layer.apply_mask(self.final_mask[name].to(layer.rank_mask.device))
            return
        if t < final_start:
            self.update_scores(layers)
        budget, mask_now = budget_schedule(t, total, sum(layer.r for layer in layers.values()),
                                           cfg.target_r * len(layers), cfg.tinit, cfg.tfinal, cfg.delta_t)
        if mask_now or t == final_start:
            keep = self.mask_to_budget(layers, budget)
            self.kept_triplets = {n: k.tolist() for n, k in keep.items()}
            trainer.assembled.meta["adapter"]["kept_triplets"] = self.kept_triplets
            if t == final_start:
                self.final_mask = {n: k.cpu() for n, k in keep.items()}
                self.smoothed, self.uncertainty = {}, {}

    def state_dict(self) -> dict:
        cpu = lambda d: {k: v.cpu() for k, v in d.items()}  # noqa: E731
        return {"smoothed": cpu(self.smoothed), "uncertainty": cpu(self.uncertainty),
                "final_mask": self.final_mask, "kept_triplets": self.kept_triplets}

    def load_state_dict(self, state: dict) -> None:
        self.smoothed, self.uncertainty = dict(state["smoothed"]), dict(state["uncertainty"])
        self.final_mask = state["final_mask"]
        self.kept_triplets = state.get("kept_triplets", state.get("rank_pattern"))   # its name until 0.1
