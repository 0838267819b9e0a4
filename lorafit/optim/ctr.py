"""CTR-LoRA: a curvature-aware trust-region step for the adapter parameters (``optimizer=ctr``).

CTR-LoRA (arXiv 2510.15962) has no public code; this file is **our reconstruction**. What comes
from where:

- *From the paper's abstract*: updates constrained by a trust region in a Fisher/Hessian metric,
  and rank allocated across layers by marginal utility from lightweight second-order proxies.
- *From the seed's algorithm* (``shared/seeds/000_*``, methods.md "Step rules"): the step itself —
  gradient g on the batch; Steihaug–Toint truncated CG on the model ``m(δ) = g·δ + ½ δᵀHδ`` subject
  to ``‖δ‖_M ≤ Δ``; ``ρ = (L(θ) − L(θ+δ)) / −m(δ)`` on the same batch; ρ < η1: reject and
  ``Δ ← γ2·Δ``; otherwise accept, and if ρ ≥ η2 and δ reached the boundary ``Δ ← min(γ1·Δ, Δmax)``.
- *Ours*: H is the Gauss–Newton matrix ``Jᵀ H_L J`` (for softmax cross-entropy this is the Fisher)
  or the exact Hessian, both as matrix-free products; ``J v`` comes from the double-vjp trick
  (a vjp is linear in its cotangent u, so ``∂(Jᵀu)/∂u · v = J v``) rather than forward-mode AD,
  because custom autograd Functions (DoRA's ``DoRAProduct``) have no forward-mode rule; attention
  runs on PyTorch's math SDPA kernel during curvature products (fused kernels have no double
  backward). As in Hessian-free optimisation (Martens 2010), the products are taken on a sub-batch
  (``curvature_batch``, a quarter of the examples by default) while g and both losses of ρ use
  the whole batch, and L(θ) is the trainer's own forward. A sub-batch's Gauss–Newton matrix has
  rank ≤ its examples × classes, so g leaves its range and the model sees no curvature there;
  ``adaptive_damping`` adds λI with λ the curvature the model missed along the previous step
  (:func:`missed_curvature`, a secant estimate from the two losses ρ already has), and at least
  ``relative_damping`` × the curvature the sub-batch sees along CG's first direction −M⁻¹g
  (:func:`curvature_along`; CG reuses that product for its first iteration): the secant sees only
  the step's own batch, on which a long step into the directions the sub-batch is blind to looks
  fine while it raises the other batches' loss. The diagonal-Fisher metric is an EMA of squared
  gradients (β = ``fisher_beta``), normalised to mean 1 so that Δ keeps the units of a parameter
  norm. Dropout is switched off (ρ compares two losses of one deterministic function).
  The rank schedule keeps a budget of rank-1 components (row i of A with column i of B) trainable,
  re-chosen every ``rank_every`` steps by the predicted decrease of a diagonal-Newton step
  ``½ ‖g‖²/(h̄ + λ)`` per factor, h̄ the component's mean of a Hutchinson estimate of the curvature
  diagonal (one probe per step, an EMA; independent of g); the others are frozen, not zeroed, so
  the model's function never jumps.

One CTR step is one optimizer step of the trainer: g is the gradient of the mean loss over the
whole global batch (every micro-batch of gradient accumulation, every process), and the curvature
products and L(θ+δ) are taken over that batch (products: its sub-batch), summed over micro-batches
and all-reduced, so every process computes the same δ and takes the same decision. With one
curvature micro-batch per process the autograd graph is built once per step and reused by every
CG iteration; with accumulation it is rebuilt per micro-batch and product (memory of one
micro-batch, compute × micro-batches). ``max_grad_norm`` clipping does not apply: the trust region
bounds the step. There is no learning rate (the ``lr`` column of the log reads 0).

The numerics (CG, the ρ rule, curvature products) are :mod:`lorafit.optim.trust_region`; this file
holds the config, the rank schedule and :class:`TrustRegionStep`, the callback that owns the
trainer's step (``owns_step``: the trainer builds no torch optimizer and hands it a closure).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from lorafit.callbacks import Callback
from lorafit.config import ConfigError, check_choice, check_range
from lorafit.console import console
from lorafit.optim.trust_region import (CurvatureOperator, Vector, double_differentiable_attention, flatten,
                                        steihaug_cg, unflatten, update_radius)
from lorafit.task import SupervisedTask


@dataclass
class CTRConfig:
    """``optimizer=ctr``: the trust-region step (no learning rate).

    Attributes:
        curvature: ``ggn`` (Gauss–Newton = Fisher for cross-entropy; PSD) or ``hessian``.
        metric: ``euclidean`` or ``fisher`` (diagonal Fisher, EMA of g², normalised to mean 1).
        radius: Δ0, the initial trust radius (parameter-norm units).
        max_radius: Δmax.
        eta1 / eta2: reject below η1; grow at the boundary at or above η2.
        grow / shrink: γ1 (> 1) and γ2 (< 1).
        cg_iters: the most CG iterations per step; cg_tol: stop when ‖r‖ ≤ cg_tol·‖g‖.
        curvature_batch: fraction of the step's examples the curvature products are taken on
            (every round(1/f)-th example of the global batch; 1.0 = all); g and ρ use the whole batch.
        rho_batch: ``same`` (ρ on the step's batch, the seed's rule) or ``next`` (both losses of ρ
            on the next step's batch: does the step generalise beyond the batch it was fitted to?).
        damping: λ added to the curvature (H + λI); 0 keeps the model exact. With ``adaptive_damping``
            the starting λ, which then follows the curvature missed along each step.
        adaptive_damping: after each step set λ ← ½λ + ½·(the curvature the model missed along δ)
            (:func:`missed_curvature`; no extra forward). Only with ``rho_batch=same`` (with ``next``
            the two losses come from another batch and λ stays ``damping``).
        relative_damping: each step's λ is at least this multiple of the sub-batch curvature along
            CG's first direction −M⁻¹g (:func:`curvature_along`): the curvature the sub-batch does
            see stands in for what its low-rank Gauss–Newton matrix cannot (0: no floor). No extra
            product: CG reuses it for its first iteration.
        fisher_beta: EMA factor of the squared-gradient Fisher metric and of the rank schedule's
            curvature diagonal and utility.
        rank_budget: fraction of rank-1 components kept trainable (1.0 = no rank schedule).
        rank_every: re-choose the trainable components every this many steps.
    """

    curvature: str = "ggn"
    metric: str = "euclidean"
    radius: float = 0.1
    max_radius: float = 10.0
    eta1: float = 0.25
    eta2: float = 0.75
    grow: float = 2.0
    shrink: float = 0.5
    cg_iters: int = 5
    cg_tol: float = 0.1
    curvature_batch: float = 0.25
    rho_batch: str = "same"
    damping: float = 0.0
    adaptive_damping: bool = True
    relative_damping: float = 0.2
    fisher_beta: float = 0.95
    rank_budget: float = 1.0
    rank_every: int = 10

    def __post_init__(self) -> None:
        check_choice("optimizer.curvature", self.curvature, ("ggn", "hessian"))
        check_choice("optimizer.metric", self.metric, ("euclidean", "fisher"))
        check_choice("optimizer.rho_batch", self.rho_batch, ("same", "next"))
        check_range("optimizer.radius", self.radius, 0, low_inclusive=False)
        check_range("optimizer.max_radius", self.max_radius, self.radius)
        check_range("optimizer.eta1", self.eta1, 0, 1, high_inclusive=False)
        check_range("optimizer.eta2", self.eta2, self.eta1, 1)
        check_range("optimizer.grow", self.grow, 1, low_inclusive=False)
        check_range("optimizer.shrink", self.shrink, 0, 1, low_inclusive=False, high_inclusive=False)
        check_range("optimizer.cg_iters", self.cg_iters, 1)
        check_range("optimizer.cg_tol", self.cg_tol, 0, 1, low_inclusive=False)
        check_range("optimizer.curvature_batch", self.curvature_batch, 0, 1, low_inclusive=False)
        check_range("optimizer.damping", self.damping, 0)
        check_range("optimizer.relative_damping", self.relative_damping, 0)
        check_range("optimizer.fisher_beta", self.fisher_beta, 0, 1, high_inclusive=False)
        check_range("optimizer.rank_budget", self.rank_budget, 0, 1, low_inclusive=False)
        check_range("optimizer.rank_every", self.rank_every, 1)

    def state_copies(self) -> int:
        """fp32 vectors over the trainable values alive in a step: g, the Fisher EMA, the curvature
        diagonal's EMA, CG's z, r, d, Hd."""
        return 7

    def build(self, named_params: list[tuple[str, nn.Parameter]]) -> None:
        """No torch optimizer: :class:`TrustRegionStep` owns the step."""
        return None

    def make_scheduler(self, optimizer: None, total_steps: int) -> None:
        return None

    def callbacks(self) -> list[Callback]:
        return [TrustRegionStep(self)]


def curvature_along(direction: Vector, product: Vector) -> float:
    """The Rayleigh quotient ``dᵀHd / ‖d‖²`` from d and its product Hd (0 for d = 0)."""
    norm_sq = float(direction @ direction)
    return float(direction @ product) / norm_sq if norm_sq > 0 else 0.0


def missed_curvature(damping: float, predicted: float, actual: float, step_sq: float) -> float:
    """The damping λ that would have made the step's model exact along δ, at least 0.

    Along δ the loss is ``L(θ+δ) ≈ L(θ) + g·δ + ½ c ‖δ‖²``; the model had ``c_m = δᵀHδ/‖δ‖² + λ``,
    so ``L(θ+δ) − L(θ) − m(δ) = ½ (c − c_m) ‖δ‖²`` and the secant curvature needs
    ``λ + 2 (predicted − actual) / ‖δ‖²`` (predicted = −m(δ), actual = L(θ) − L(θ+δ)). Too small a
    model curvature (ρ < 1) raises λ, too large (ρ > 1) lowers it — the Levenberg–Marquardt
    direction (Moré 1978; Martens 2010 adjusts λ by ρ in fixed factors), here by the measured
    amount.
    """
    if step_sq <= 0:
        return damping
    return max(0.0, damping + 2.0 * (predicted - actual) / step_sq)


# --------------------------------------------------------------------------- rank schedule
def rank_components(model: nn.Module, params: list[torch.Tensor]) -> list[tuple[int, int, torch.Tensor]]:
    """For every LoRA-factor layer: (index of lora_A in ``params``, of lora_B, their rank)."""
    from lorafit.adapters import adapter_layers
    index = {id(p): i for i, p in enumerate(params)}
    found = []
    for layer in adapter_layers(model).values():
        A, B = getattr(layer, "lora_A", None), getattr(layer, "lora_B", None)
        if isinstance(A, nn.Parameter) and isinstance(B, nn.Parameter) and id(A) in index and id(B) in index:
            found.append((index[id(A)], index[id(B)], A.shape[0]))
    return found


def hutchinson_diagonal(hvp: Any, like: Vector, seed: int) -> Vector:
    """An unbiased estimate of diag(H) from one Rademacher probe v: ``v ⊙ Hv`` (Hutchinson 1990;
    E[v_j (Hv)_j] = H_jj since E[v_j v_k] = δ_jk). ``seed`` fixes v, so every process and a resumed
    run draw the same probe."""
    gen = torch.Generator().manual_seed(seed)
    v = (torch.randint(0, 2, like.shape, generator=gen) * 2 - 1).to(like)
    return v * hvp(v)


def component_utility(grad_sq: list[torch.Tensor], curvature: list[torch.Tensor],
                      components: list[tuple[int, int, int]]) -> torch.Tensor:
    """The predicted decrease of a diagonal-Newton step on each rank-1 component (row i of A with
    column i of B), one value per factor:

        u_i = ½ ‖g_A[i,:]‖² / (h̄_A,i + λ) + ½ ‖g_B[:,i]‖² / (h̄_B,i + λ),

    g the step's gradient, h̄ the mean over the factor's entries of the curvature diagonal (clamped
    at 0; an estimate independent of g), λ = 10⁻³ × the mean of h̄ over all components. Averaging h
    over a component's entries is what makes one Hutchinson probe usable (the per-entry estimate is
    noisy, the mean over in + out entries is not); keeping A and B apart is what keeps a factor with
    no curvature (A while B = 0) from diluting the other's.
    """
    def per_factor(t: torch.Tensor, a: bool) -> tuple[torch.Tensor, torch.Tensor]:
        return (t.sum(1), t.mean(1)) if a else (t.sum(0), t.mean(0))

    g_a, h_a, g_b, h_b = [], [], [], []
    for a, b, _ in components:
        (ga, _), (_, ha) = per_factor(grad_sq[a], True), per_factor(curvature[a], True)
        (gb, _), (_, hb) = per_factor(grad_sq[b], False), per_factor(curvature[b], False)
        g_a.append(ga), h_a.append(ha.clamp_min(0)), g_b.append(gb), h_b.append(hb.clamp_min(0))
    g_a, h_a, g_b, h_b = map(torch.cat, (g_a, h_a, g_b, h_b))
    floor = 1e-3 * torch.cat([h_a, h_b]).mean().clamp_min(1e-30)
    return 0.5 * (g_a / (h_a + floor) + g_b / (h_b + floor))


def top_components(utility: torch.Tensor, budget: float) -> torch.Tensor:
    """The bool mask of the ``round(budget × n)`` components of largest utility (at least one)."""
    keep = max(1, int(round(budget * utility.numel())))
    active = torch.zeros(utility.numel(), dtype=torch.bool, device=utility.device)
    active[torch.topk(utility, keep).indices] = True
    return active


# --------------------------------------------------------------------------- the callback
class TrustRegionStep(Callback):
    """Owns the optimizer step: each step is a CTR trust-region step (see the module docstring)."""

    owns_step = True

    def __init__(self, cfg: CTRConfig) -> None:
        self.cfg = cfg
        self.radius = cfg.radius
        self.damping = cfg.damping
        self.fisher: Optional[Vector] = None
        self.curvature: Optional[Vector] = None     # EMA of the Hutchinson curvature diagonal (rank schedule)
        self.utility: Optional[torch.Tensor] = None
        self.active: Optional[torch.Tensor] = None  # bool per rank-1 component
        self.last: dict[str, float] = {}

    def on_train_start(self, trainer: Any) -> None:
        if not isinstance(trainer.cfg.task, SupervisedTask):
            raise ConfigError(f"optimizer=ctr works with supervised training only (its curvature products need the "
                              f"model's outputs and the data's own loss), not with task={type(trainer.cfg.task).__name__}. "
                              f"Use optimizer=adamw for reward modelling and RL.")
        for other in trainer.callbacks:
            if type(other).extra_loss is not Callback.extra_loss:
                raise ConfigError(
                    f"optimizer=ctr cannot be combined with {type(other).__name__}, which adds a regulariser to "
                    f"the loss (e.g. AdaLoRA's orthogonality penalty): CTR's quadratic model and its ratio ρ are "
                    f"built from the task loss alone, so the step would be judged against the wrong function. "
                    f"Use another adapter with optimizer=ctr, or optimizer=adamw with this one.")
        model = trainer.unwrapped()
        switched = 0
        for module in model.modules():
            if isinstance(module, nn.Dropout) and module.p > 0:
                module.p = 0.0
                switched += 1
        if switched and trainer.accelerator.is_main_process:
            console.print(f"[yellow]optimizer=ctr: dropout switched off in {switched} module(s)[/] "
                          "(ρ compares two losses of one deterministic function)")

    # -- pieces of the step
    def _metric(self, grad: Vector) -> Optional[Vector]:
        """The diagonal-Fisher metric (``metric=fisher``; kept only then), or None (Euclidean)."""
        if self.cfg.metric != "fisher":
            return None
        beta = self.cfg.fisher_beta
        squared = grad * grad
        self.fisher = squared if self.fisher is None else beta * self.fisher.to(grad.device) + (1 - beta) * squared
        floor = self.fisher.mean().clamp_min(1e-30) * 1e-3
        metric = self.fisher + floor
        return metric / metric.mean()

    def _rank_mask(self, trainer: Any, grad: Vector, hvp: Any) -> Optional[Vector]:
        """The 0/1 mask of trainable coordinates under the rank budget (None: everything).

        Every step: one Hutchinson probe of the curvature diagonal (EMA ``fisher_beta``), the
        utility of every rank-1 component from it and g (:func:`component_utility`, EMA); every
        ``rank_every`` steps the components of largest utility are chosen."""
        if self.cfg.rank_budget >= 1.0:
            return None
        params = trainer.params
        components = rank_components(trainer.unwrapped(), params)
        if not components:
            return None
        beta = self.cfg.fisher_beta
        probe = hutchinson_diagonal(hvp, grad, seed=trainer.cfg.seed * 1_000_003 + trainer.step)
        self.curvature = probe if self.curvature is None else beta * self.curvature.to(grad.device) + (1 - beta) * probe
        utility = component_utility([s.float() for s in unflatten(grad * grad, params)],
                                    [h.float() for h in unflatten(self.curvature, params)], components)
        self.utility = utility if self.utility is None else beta * self.utility.to(utility.device) + (1 - beta) * utility
        if self.active is None or trainer.step % self.cfg.rank_every == 0:
            self.active = top_components(self.utility, self.cfg.rank_budget)
        masks = [torch.ones_like(p, dtype=torch.float32) for p in params]
        start = 0
        for a, b, r in components:
            on = self.active[start:start + r].float()
            masks[a] = on[:, None].expand_as(params[a]).clone()
            masks[b] = on[None, :].expand_as(params[b]).clone()
            start += r
        return flatten(masks, params)

    def take_step(self, trainer: Any, closure: Any) -> None:
        """One trust-region step on the gradient in ``p.grad`` (unclipped) at the trainer's loss
        ``closure.start_loss``; curvature products on ``closure.every(stride)``, L(θ+δ) on the whole
        batch through ``closure`` (:class:`lorafit.train.trainer.StepClosure`) — or both losses of ρ
        on the next step's batch (``rho_batch=next``)."""
        cfg, params = self.cfg, trainer.params
        grad = flatten([p.grad for p in params], params).to(params[0].device)
        metric = self._metric(grad)
        sub = closure.every(max(1, round(1 / cfg.curvature_batch)))
        with double_differentiable_attention():
            operator = CurvatureOperator(sub.pieces, params, cfg.curvature, 0.0, cache=len(sub.pieces) == 1,
                                         reduce=closure.reduce)
            if operator.cache:
                operator.losses()             # builds the graph every product reuses
            mask = self._rank_mask(trainer, grad, operator)    # the curvature diagonal without damping
            if mask is not None:
                grad = grad * mask
            hvp = operator if mask is None else (lambda v: mask * operator(mask * v))
            first = -(grad if metric is None else grad / metric)       # CG's first direction
            seen = hvp(first)                                           # H d₁, undamped
            damping = max(self.damping, cfg.relative_damping * curvature_along(first, seen))
            operator.damping = damping
            result = steihaug_cg(grad, hvp, self.radius, metric, cfg.cg_iters, cfg.cg_tol,
                                 first_product=seen + damping * first)
            operator.release()
        judge = closure if cfg.rho_batch == "same" else closure.of_step(trainer.step + 1)
        judged_before = closure.start_loss if judge is closure else judge.loss()
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, step in zip(params, unflatten(result.step, params)):
                p.add_(step)
        loss_after = judge.loss()
        predicted = -result.model_value
        actual = judged_before - loss_after
        rho = actual / predicted if predicted > 0 else 0.0   # no predicted decrease (g = 0): reject
        radius_used = self.radius
        accepted, self.radius = update_radius(rho, self.radius, result.boundary, cfg)
        if cfg.adaptive_damping and judge is closure:
            target = missed_curvature(damping, predicted, actual, float(result.step @ result.step))
            self.damping = 0.5 * damping + 0.5 * target
        if not accepted:
            with torch.no_grad():
                for p, old in zip(params, saved):
                    p.copy_(old)
        self.last = {"rho": rho, "radius": radius_used, "accepted": float(accepted),
                     "cg_iters": float(result.iters), "boundary": float(result.boundary),
                     "pred_reduction": predicted, "actual_reduction": actual, "loss_before": closure.start_loss,
                     "damping": damping}
        if judge is not closure:
            self.last["next_loss_before"] = judged_before
        if self.active is not None:
            self.last["active_rank"] = float(self.active.sum())

    def step_metrics(self, trainer: Any) -> dict[str, float]:
        return dict(self.last)

    def state_dict(self) -> dict:
        return {"radius": self.radius, "damping": self.damping, "fisher": self.fisher, "curvature": self.curvature,
                "utility": self.utility, "active": self.active}

    def load_state_dict(self, state: dict) -> None:
        self.radius = state["radius"]
        self.damping = state.get("damping", self.cfg.damping)
        self.fisher, self.utility, self.active = state["fisher"], state["utility"], state["active"]
        self.curvature = state.get("curvature")
