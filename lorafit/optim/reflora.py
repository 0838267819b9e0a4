"""RefLoRA and RefLoRA-S (Zhang, Li, Giannakis, NeurIPS 2025, arXiv 2505.18877).

ΔW = B A has many factorisations: ``(B P, P⁻¹ A)`` for every invertible r×r P. RefLoRA takes each
step in the factorisation that minimises the paper's loss upper bound, which has a closed form:
with ``P Pᵀ = S⁻¹`` and

    S = G_A⁻¹ # BᵀB        (the matrix geometric mean X # Y = X^½ (X^-½ Y X^-½)^½ X^½, G_A = A Aᵀ)

an SGD step on the refactored ``(B P, P⁻¹ A)``, mapped back, is the preconditioned step

    grad_A ← S⁻¹ grad_A,     grad_B ← grad_B S                                    (RefLoRA)

so no refactoring is ever stored. S is computed from two r×r eigendecompositions (fp32):

    G_A = V_A Σ_A² V_Aᵀ,   M = B V_A Σ_A,   MᵀM = V_M Σ_M² V_Mᵀ,
    S   = V_A Σ_A⁻¹ V_M Σ_M V_Mᵀ Σ_A⁻¹ V_Aᵀ,   S⁻¹ = V_A Σ_A V_M Σ_M⁻¹ V_Mᵀ Σ_A V_Aᵀ.

Every Σ⁻¹ is ``1 / (σ + ε)`` with ε = the fp32 machine epsilon (1.2e-7), as in the official code
(github.com/zhangyilang/RefLoRA, ``reflora/reflora.py``, ``Refactorer.dummy_step``): it keeps a
numerically singular A or B from dividing by zero; eigenvalues rounded below 0 are clipped to 0.

**RefLoRA-S** (the scalar variant, ``use_scalar=True`` there) really refactors instead, with a
scalar: after each optimizer step ``p = √(‖B‖_F / ‖A‖_F)``, ``A ← p A``, ``B ← B / p`` (now
‖A‖ = ‖B‖, B A unchanged), and AdamW's moments follow the change of coordinates (the gradient of
pA is grad_A / p): ``m_A /= p``, ``v_A /= p²``, ``m_B *= p``, ``v_B *= p²``.

Both leave the first ``warmup`` optimizer steps alone (B = 0 at the usual init makes S singular
and a zero scale), counted by ``trainer.step``: RefLoRA preconditions step k iff k ≥ warmup;
RefLoRA-S balances before step k iff k ≥ warmup (after step k−1, or at train start when
warmup = 0) — the official code's counting. RefLoRA skips a layer whose B is exactly zero
(S = 0 would zero its gradients for good), RefLoRA-S one whose A or B is (p would be 0 or ∞);
the official code does neither.

They apply to LoRA-factor layers (``LoRALinear`` and subclasses: lora, rslora, dora, lora_dash,
rosa; DoRA's weight and LoRA-Dash's and RoSA's extra terms depend on A, B only through B A, so
refactoring leaves them unchanged). The only state is the step counter, which is the trainer's
own, so a resumed run continues exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from lorafit.adapters import adapter_layers
from lorafit.adapters.lora import LoRALinear
from lorafit.config import check_range
from lorafit.optim.basic import AdamWConfig
from lorafit.optim.loraplus import factor_layer_paths, no_factor_error
from lorafit.callbacks import Callback

EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- the maths
def refactor_metric(gram_A: torch.Tensor, gram_B: torch.Tensor, eps: float = EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """``S = (A Aᵀ)⁻¹ # BᵀB`` and ``S⁻¹`` from the r×r Gram matrices ``A Aᵀ`` and ``BᵀB``.

    Batched over leading dimensions (one r×r pair per layer); everything in fp32.
    """
    gram_A, gram_B = gram_A.float(), gram_B.float()
    lam_A, V_A = torch.linalg.eigh(gram_A)                     # G_A = V_A Σ_A² V_Aᵀ
    sig_A = lam_A.clamp_min(0).sqrt().unsqueeze(-2)             # (..., 1, r): scales columns
    VS_A = V_A * sig_A                                          # V_A Σ_A
    lam_M, V_M = torch.linalg.eigh(VS_A.mT @ gram_B @ VS_A)     # MᵀM = Σ_A V_Aᵀ BᵀB V_A Σ_A
    sig_M = lam_M.clamp_min(0).sqrt().unsqueeze(-2)
    left = (V_A / (sig_A + eps)) @ V_M                          # V_A Σ_A⁻¹ V_M
    S = (left * sig_M) @ left.mT
    left_inv = VS_A @ V_M                                       # V_A Σ_A V_M
    S_inv = (left_inv / (sig_M + eps)) @ left_inv.mT
    return S, S_inv


@torch.no_grad()
def precondition_(layers: list[LoRALinear], eps: float = EPS) -> None:
    """RefLoRA: ``grad_A ← S⁻¹ grad_A``, ``grad_B ← grad_B S`` for every layer, in place.

    The r×r work of all layers of one rank runs as one batched eigendecomposition pair.
    """
    batches: dict[tuple, list[LoRALinear]] = defaultdict(list)
    for layer in layers:
        if layer.lora_A.grad is not None and layer.lora_B.grad is not None:
            batches[(layer.r, layer.lora_A.device)].append(layer)
    for batch in batches.values():
        A = [layer.lora_A.float() for layer in batch]
        B = [layer.lora_B.float() for layer in batch]
        gram_A = torch.stack([a @ a.T for a in A])
        gram_B = torch.stack([b.T @ b for b in B])
        S, S_inv = refactor_metric(gram_A, gram_B, eps)
        live = gram_B.diagonal(dim1=-2, dim2=-1).sum(-1) > 0    # ‖B‖² > 0 (no host sync)
        for i, layer in enumerate(batch):
            for param, new in ((layer.lora_A, S_inv[i] @ layer.lora_A.grad.float()),
                               (layer.lora_B, layer.lora_B.grad.float() @ S[i])):
                param.grad.copy_(torch.where(live[i], new, param.grad.float()))


@torch.no_grad()
def balance_(layers: list[LoRALinear], optimizer_state: Any) -> None:
    """RefLoRA-S: ``A ← pA``, ``B ← B/p`` with ``p = √(‖B‖/‖A‖)``, and AdamW's moments to match.

    A layer with ‖A‖ = 0 or ‖B‖ = 0 keeps p = 1. ``optimizer_state`` maps a parameter to its
    AdamW state (``exp_avg``, ``exp_avg_sq``); a parameter without state yet is left as it is.
    """
    for layer in layers:
        A, B = layer.lora_A, layer.lora_B
        norm_A, norm_B = torch.linalg.vector_norm(A.float()), torch.linalg.vector_norm(B.float())
        live = (norm_A > 0) & (norm_B > 0)
        p = torch.where(live, (norm_B / torch.where(live, norm_A, 1.0)).sqrt(), 1.0)
        A.mul_(p)
        B.div_(p)
        for param, factor in ((A, 1.0 / p), (B, p)):   # the gradient of pA is grad_A / p
            state = optimizer_state.get(param)
            if state:
                state["exp_avg"].mul_(factor)
                state["exp_avg_sq"].mul_(factor * factor)


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in adapter_layers(model).values() if isinstance(m, LoRALinear)]


# ----------------------------------------------------------------------------- callbacks
class Precondition(Callback):
    """RefLoRA: precondition every LoRA layer's gradients after clipping, from step ``warmup`` on."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def before_optimizer_step(self, trainer: Any) -> None:
        if trainer.step >= self.warmup:
            precondition_(lora_layers(trainer.unwrapped()))


class Balance(Callback):
    """RefLoRA-S: balance ‖A‖ = ‖B‖ before every optimizer step from step ``warmup`` on."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def on_train_start(self, trainer: Any) -> None:
        if self.warmup == 0 and trainer.step == 0:   # a resumed run was balanced before its checkpoint
            self._balance(trainer)

    def after_optimizer_step(self, trainer: Any) -> None:
        if trainer.step + 1 >= self.warmup:          # trainer.step is the step just taken (0-based)
            self._balance(trainer)

    def _balance(self, trainer: Any) -> None:
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)   # accelerate's wrapper
        balance_(lora_layers(trainer.unwrapped()), optimizer.state)


# ----------------------------------------------------------------------------- configs
@dataclass
class RefactorConfig(AdamWConfig):
    """AdamW plus a refactoring rule; only for adapters with LoRA factors (checked at build).

    Attributes:
        warmup: optimizer steps taken without refactoring first (not the lr warm-up,
            ``warmup_steps``). Default: 100.
    """

    warmup: int = 100
    option: ClassVar[str] = "reflora"   # the optimizer option's name, for messages

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("optimizer.warmup", self.warmup, 0)

    def param_groups(self, named_params: list[tuple[str, nn.Parameter]]) -> list[dict]:
        if not factor_layer_paths(named_params):
            raise no_factor_error(named_params, self.option)
        return super().param_groups(named_params)


@dataclass
class RefLoRAConfig(RefactorConfig):
    """``optimizer=reflora``: AdamW on gradients preconditioned by ``S = (AAᵀ)⁻¹ # BᵀB``."""

    option: ClassVar[str] = "reflora"

    def callbacks(self) -> list[Callback]:
        return [Precondition(self.warmup)]


@dataclass
class RefLoRASConfig(RefactorConfig):
    """``optimizer=reflora_s``: AdamW, then ‖A‖ = ‖B‖ rebalancing (with its state) after each step."""

    option: ClassVar[str] = "reflora_s"

    def callbacks(self) -> list[Callback]:
        return [Balance(self.warmup)]
