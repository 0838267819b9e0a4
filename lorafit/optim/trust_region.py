"""Trust-region numerics of CTR-LoRA, with no knowledge of models or trainers.

- :func:`steihaug_cg`: Steihaug–Toint truncated CG on ``m(δ) = g·δ + ½ δᵀHδ`` s.t. ``‖δ‖_M ≤ Δ``;
- :func:`update_radius`: the ρ rule (accept / reject, grow / shrink Δ);
- :class:`CurvatureOperator`: ``v ↦ (H + λI) v`` matrix-free, H the Gauss–Newton matrix
  ``Jᵀ H_L J`` or the Hessian, over functions returning ``(outputs, loss)``;
- :func:`flatten` / :func:`unflatten` between per-parameter tensors and one vector.

The step rule that uses them is :mod:`lorafit.optim.ctr`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

Vector = torch.Tensor  # flat fp32 vector over all trainable parameters


# --------------------------------------------------------------------------- the subproblem
@dataclass
class CGResult:
    step: Vector
    iters: int
    boundary: bool        # δ lies on the trust-region boundary
    model_value: float    # m(δ) = g·δ + ½ δᵀHδ (negative: a predicted decrease)


def _to_boundary(z: Vector, d: Vector, radius: float, metric: Optional[Vector]) -> float:
    """The τ ≥ 0 with ‖z + τ d‖_M = Δ."""
    Md = d if metric is None else metric * d
    a, b = float(d @ Md), float(z @ Md)
    c = float(z @ (z if metric is None else metric * z)) - radius ** 2
    return (-b + math.sqrt(max(b * b - a * c, 0.0))) / a


def steihaug_cg(grad: Vector, hvp: Callable[[Vector], Vector], radius: float,
                metric: Optional[Vector] = None, max_iters: int = 10, tol: float = 0.1,
                first_product: Optional[Vector] = None) -> CGResult:
    """Steihaug–Toint truncated CG for ``min g·δ + ½ δᵀHδ`` s.t. ``‖δ‖_M ≤ Δ``, ``‖x‖_M² = xᵀ diag(M) x``.

    Preconditioned CG with preconditioner M (Nocedal & Wright, Algorithm 7.2, with the M-norm of
    Conn, Gould & Toint §7.5): stops at negative curvature or the boundary (returning the boundary
    point along the current direction), or when ``‖r‖ ≤ tol·‖g‖``. ``m(δ)`` is tracked exactly
    from the residual ``r = g + Hδ``, so no extra product is needed. ``first_product``: H applied
    to the first direction ``−M⁻¹g``, when the caller already has it (saves that product).
    """
    z = torch.zeros_like(grad)
    r = grad.clone()
    y = r if metric is None else r / metric
    d = -y
    ry = float(r @ y)
    value = 0.0
    g_norm = float(grad.norm())
    if g_norm == 0.0:
        return CGResult(z, 0, False, 0.0)
    for it in range(1, max_iters + 1):
        Hd = first_product if it == 1 and first_product is not None else hvp(d)
        dHd = float(d @ Hd)
        if dHd <= 0:
            tau = _to_boundary(z, d, radius, metric)
            value += tau * float(r @ d) + 0.5 * tau * tau * dHd
            return CGResult(z + tau * d, it, True, value)
        alpha = ry / dHd
        z_next = z + alpha * d
        norm_next = float(z_next @ (z_next if metric is None else metric * z_next))
        if norm_next >= radius ** 2:
            tau = _to_boundary(z, d, radius, metric)
            value += tau * float(r @ d) + 0.5 * tau * tau * dHd
            return CGResult(z + tau * d, it, True, value)
        value += alpha * float(r @ d) + 0.5 * alpha * alpha * dHd
        z = z_next
        r = r + alpha * Hd
        if float(r.norm()) <= tol * g_norm:
            return CGResult(z, it, False, value)
        y = r if metric is None else r / metric
        ry_next = float(r @ y)
        d = -y + (ry_next / ry) * d
        ry = ry_next
    return CGResult(z, max_iters, False, value)


def update_radius(rho: float, radius: float, boundary: bool, cfg: Any) -> tuple[bool, float]:
    """The ρ rule: (accepted, next radius); ``cfg`` carries ``eta1``, ``eta2``, ``grow``, ``shrink``, ``max_radius``."""
    if not rho >= cfg.eta1:          # also rejects NaN
        return False, cfg.shrink * radius
    if rho >= cfg.eta2 and boundary:
        return True, min(cfg.grow * radius, cfg.max_radius)
    return True, radius


# --------------------------------------------------------------------------- curvature products
def flatten(tensors: list[Optional[torch.Tensor]], like: list[torch.Tensor]) -> Vector:
    """One vector (fp32, or fp64 if a parameter is fp64) of per-parameter tensors; None counts as 0."""
    dtype = torch.float64 if any(p.dtype == torch.float64 for p in like) else torch.float32
    return torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1).to(dtype) for t, p in zip(tensors, like)])


def unflatten(vector: Vector, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in like:
        out.append(vector[start:start + p.numel()].view_as(p).to(p.dtype))
        start += p.numel()
    return out


class CurvatureOperator:
    """``v ↦ (H + λI) v`` on one batch, matrix-free; H = Gauss–Newton ``Jᵀ H_L J`` or the Hessian.

    Args:
        pieces: one function per micro-batch returning ``(outputs, loss)`` with the graph to
            ``params`` (the losses sum to the step's loss).
        params: the trainable tensors (δ's coordinates).
        kind: ``ggn`` or ``hessian``.
        cache: keep each piece's graph for the next product (set when there is one piece).
        reduce: sums a tensor over processes (identity on one process).
    """

    def __init__(self, pieces: list[Callable[[], tuple[torch.Tensor, torch.Tensor]]], params: list[torch.Tensor],
                 kind: str = "ggn", damping: float = 0.0, cache: bool = True,
                 reduce: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> None:
        self.pieces, self.params, self.kind, self.damping = pieces, params, kind, damping
        self.cache, self.reduce = cache, reduce
        self._graphs: dict[int, tuple] = {}
        self.loss = 0.0

    def _build(self, i: int) -> tuple:
        outputs, loss = self.pieces[i]()
        if self.kind == "hessian":
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            return loss, grads
        grad_out = torch.autograd.grad(loss, outputs, create_graph=True)[0]           # ∇_z L, differentiable
        u = torch.zeros_like(outputs, requires_grad=True)
        vjp_u = torch.autograd.grad(outputs, self.params, u, create_graph=True, allow_unused=True)  # Jᵀu
        return loss, outputs, grad_out, u, vjp_u

    def losses(self) -> float:
        """Build (and, if caching, keep) every piece's graph; the step's loss L(θ), all-reduced."""
        total = torch.zeros((), dtype=torch.float64)
        for i in range(len(self.pieces)):
            graph = self._build(i)
            total = total + graph[0].detach().double().cpu()
            if self.cache:
                self._graphs[i] = graph
        self.loss = float(self.reduce(total))
        return self.loss

    def _product(self, graph: tuple, v: list[torch.Tensor]) -> list[Optional[torch.Tensor]]:
        if self.kind == "hessian":
            _, grads = graph
            used = [(g, x) for g, x in zip(grads, v) if g is not None]
            hv = torch.autograd.grad([g for g, _ in used], self.params, [x for _, x in used],
                                     retain_graph=True, allow_unused=True)
            return list(hv)
        _, outputs, grad_out, u, vjp_u = graph
        used = [(g, x) for g, x in zip(vjp_u, v) if g is not None]
        jv = torch.autograd.grad([g for g, _ in used], u, [x for _, x in used], retain_graph=True)[0]   # J v
        h_jv = torch.autograd.grad(grad_out, outputs, jv, retain_graph=True)[0]                         # H_L J v
        return list(torch.autograd.grad(outputs, self.params, h_jv, retain_graph=True, allow_unused=True))

    def __call__(self, v: Vector) -> Vector:
        parts = unflatten(v, self.params)
        total = torch.zeros_like(v)
        for i in range(len(self.pieces)):
            graph = self._graphs.get(i) or self._build(i)
            total += flatten(self._product(graph, parts), self.params).to(v.device)
        total = self.reduce(total)
        return total + self.damping * v if self.damping else total

    def release(self) -> None:
        self._graphs.clear()


@contextlib.contextmanager
def double_differentiable_attention():
    """Attention through PyTorch's math SDPA kernel, the one with a double backward."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - older torch
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield
