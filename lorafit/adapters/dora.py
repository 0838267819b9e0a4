"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row          (paper eq. 5; one norm per output row)
    y  = (m / n) ⊙ (W0 x + s·B (A x)) + b,  n = ‖W0 + s·B A‖_row, detached (paper §4.3)

``m ∈ R^{out}`` starts at the row norms of the starting weight, so W' = W0 at step 0.

The row norm is computed without materialising the out×in matrix ``B A`` (methods.md):

    n_i² = ‖W0_i‖² + 2s·⟨W0_i, B_i A⟩ + s²·B_i (A Aᵀ) B_iᵀ
         = ‖W0_i‖² + 2s·Σ_k B_ik (W0 Aᵀ)_ik + s²·Σ_k (B AAᵀ)_ik B_ik

which costs O(r·in·out) flops and O(r·out) memory; ``‖W0_i‖²`` is cached (W0 is frozen). The
norm is detached, as the paper prescribes, so no graph is kept for it.

The magnitude gradient ``∂L/∂m_i = Σ_tokens g_i · pre_i / n_i`` needs an output-sized tensor per
layer. By default the final row scaling (:class:`ScaleRows`) keeps the layer's output y (often kept
by the next operation anyway). With ``adapter.recompute=true`` (:class:`ScaleRowsRecomputed`) it
keeps nothing of that size and recomputes ``pre = W0 x + s·B A x`` in the backward pass from x and
``s·A x``, which autograd keeps for the factors' gradients anyway: about LoRA's memory for one more
``tokens × in × out`` matrix product per layer (docs/benchmarks.md measures both).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters.lora import LoRAConfig, LoRALinear


@dataclass
class DoRAConfig(LoRAConfig):
    """``adapter=dora``: LoRA's keys (r, alpha, dropout, use_rslora, target_modules) plus a
    trainable magnitude vector per adapted layer.

    Attributes:
        recompute: recompute ``W0 x`` in the backward pass instead of keeping each layer's output
            for the magnitude gradient: less memory, one more matrix product per layer. Default: false.
    """

    recompute: bool = False

    def wrap(self, layer: nn.Linear) -> "DoRALinear":
        return DoRALinear(layer, r=self.r, scaling=self.scaling, dropout=self.dropout, recompute=self.recompute)


class DoRALinear(LoRALinear):
    """LoRA's factors plus ``magnitude`` m; the direction is renormalised per output row."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0, recompute: bool = False) -> None:
        super().__init__(base, r, scaling, dropout)
        self.recompute = recompute
        self.magnitude = nn.Parameter(torch.empty(base.out_features, device=base.weight.device,
                                                  dtype=torch.float32))
        self.register_buffer("merge_norm", torch.zeros(0), persistent=False)  # n at merge time
        self.register_buffer("w0_norm_sq", torch.zeros(0), persistent=False)  # ‖W0_i‖², empty = stale
        self.reset_magnitude()

    def after_init(self) -> None:
        self.reset_magnitude()

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """m ← ‖W0 + s·BA‖_row; an init that changes A, B or W0 calls this again."""
        self.w0_norm_sq = torch.zeros(0, device=self.magnitude.device)
        self.magnitude.copy_(self.row_norm())

    @torch.no_grad()
    def row_norm(self) -> torch.Tensor:
        """n = ‖W0 + s·B A‖ per output row, without forming B A (see the module docstring)."""
        A, B, s = self.lora_A, self.lora_B, self.scaling
        w0 = self.base.weight.to(A.dtype)             # fp32 (the adapter's dtype) on any base
        if self.w0_norm_sq.numel() == 0:  # W0 is frozen: computed once, again only after (un)merge
            self.w0_norm_sq = w0.pow(2).sum(1)
        cross = (B * (w0 @ A.T)).sum(1)               # ⟨W0_i, (BA)_i⟩, (out,)
        quad = ((B @ (A @ A.T)) * B).sum(1)           # ‖(BA)_i‖², (out,)
        return (self.w0_norm_sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def delta_weight(self) -> torch.Tensor:
        """W' − W0 (DoRA's update is not additive in B A alone)."""
        return self.merged_weight() - self.base.weight.float()

    def merged_weight(self) -> torch.Tensor:
        if self.merged:
            return self.base.weight.float()
        direction = self.base.weight.float() + self.scaling * (self.lora_B @ self.lora_A)
        return (self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and not self.merged:
            return self.original_output(x)
        if self.merged:
            return self.base(x)
        x2 = x.reshape(-1, x.shape[-1])                                   # (tokens, in)
        h = F.linear(self.dropout(x2).to(self.lora_A.dtype), self.lora_A) * self.scaling
        pre = F.linear(x2, self.base.weight)
        if pre.dtype == h.dtype:
            pre.addmm_(h, self.lora_B.T)            # W0 x + s B A x, the sum done inside the product
        else:
            pre = pre + F.linear(h, self.lora_B).to(pre.dtype)
        if self.recompute:
            y = ScaleRowsRecomputed.apply(pre, self.magnitude, self.row_norm(), self.base.bias,
                                          x2, h, self.base.weight, self.lora_B)
        else:
            y = ScaleRows.apply(pre, self.magnitude, self.row_norm(), self.base.bias)
        return y.view(*x.shape[:-1], y.shape[-1])

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.merge_norm = self.row_norm()
            self.base.weight.data = self.merged_weight().to(self.base.weight.dtype)
            self.w0_norm_sq = torch.zeros(0, device=self.magnitude.device)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W0 = W' · n / m − s·B A, with n remembered from :meth:`merge`."""
        if self.merged:
            w0 = self.base.weight.float() * (self.merge_norm / self.magnitude).unsqueeze(1)
            self.merged = False
            self.base.weight.data = (w0 - self.scaling * (self.lora_B @ self.lora_A)).to(self.base.weight.dtype)
            self.w0_norm_sq = torch.zeros(0, device=self.magnitude.device)


def scale_rows(pre: torch.Tensor, m: torch.Tensor, n: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``(m / n) ⊙ pre + b`` in one pass (``addcmul``)."""
    scale = (m / n).to(pre.dtype)
    return pre * scale if bias is None else torch.addcmul(bias.to(pre.dtype), pre, scale)


class ScaleRows(torch.autograd.Function):
    """``y = (m / n) ⊙ pre + b`` whose backward keeps the *output* y, not ``pre``.

    Plain autograd would save ``pre`` (an activation the size of the layer's output) to form
    ∂L/∂m. Since ``pre / n = (y − b) / m``, the gradient ``∂L/∂m = Σ_tokens g ⊙ (y − b) / m`` needs
    only y — and y is usually saved by the next operation anyway (attention matmuls, activations),
    so it costs no memory of its own there. n is the detached row norm (no gradient). m must not
    have exact zeros (it starts at the row norms of W0).
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, m: torch.Tensor, n: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = scale_rows(pre, m, n, bias)
        ctx.save_for_backward(y, m, n, bias)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        y, m, n, bias = ctx.saved_tensors
        grad_pre = grad * (m / n).to(grad.dtype)
        grad_m = None
        if ctx.needs_input_grad[1]:
            g, out = grad.reshape(-1, y.shape[-1]).to(m.dtype), y.reshape(-1, y.shape[-1]).to(m.dtype)
            grad_m = (g * out).sum(0)                          # Σ g ⊙ y, then − b ⊙ Σ g: Σ g ⊙ (m/n) ⊙ pre
            if bias is not None:
                grad_m = grad_m - g.sum(0) * bias.to(m.dtype)
            grad_m = grad_m / m
        return grad_pre, grad_m, None, None


class ScaleRowsRecomputed(torch.autograd.Function):
    """``y = (m / n) ⊙ pre + b`` that keeps no output-sized tensor: the magnitude gradient
    ``Σ_tokens g ⊙ pre / n`` recomputes ``pre = W0 x + B h`` (``h = s·A x``) in the backward pass.

    x and h are the tensors autograd already keeps for the LoRA factors' gradients, so saving them
    again costs nothing; the price is one ``tokens × in × out`` product per layer and backward.
    """

    @staticmethod
    def forward(ctx, pre: torch.Tensor, m: torch.Tensor, n: torch.Tensor, bias: torch.Tensor | None,
                x: torch.Tensor, h: torch.Tensor, w0: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(m, n, x, h, w0, B)
        return scale_rows(pre, m, n, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        m, n, x, h, w0, B = ctx.saved_tensors
        grad_m = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                pre = F.linear(x, w0) + F.linear(h, B).to(x.dtype)
            grad_m = (grad.to(m.dtype) * pre.to(m.dtype)).reshape(-1, pre.shape[-1]).sum(0) / n
        return grad * (m / n).to(grad.dtype), grad_m, None, None, None, None, None, None
