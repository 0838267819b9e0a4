"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv 2402.09353).

    W' = m ⊙ (W0 + s·B A) / ‖W0 + s·B A‖_row          (paper eq. 5; one norm per output row)
    y  = (m / n) ⊙ (W0 x + s·B (A x)) + b,  n = ‖W0 + s·B A‖_row, detached (paper §4.3)

``m ∈ R^{out}`` starts at the row norms of the starting weight, so W' = W0 at step 0.

The row norm is computed without materialising the out×in matrix ``B A`` (methods.md):

    n_i² = ‖W0_i‖² + 2s·⟨W0_i, B_i A⟩ + s²·B_i (A Aᵀ) B_iᵀ
         = ‖W0_i‖² + 2s·Σ_k B_ik (W0 Aᵀ)_ik + s²·Σ_k (B AAᵀ)_ik B_ik

which costs O(r·in·out) flops and O(r·out) memory; ``‖W0_i‖²`` is cached (W0 is frozen). The
norm is detached, as the paper prescribes, so no graph is kept for it.

The row scale is folded into the weights rather than applied to the output (:class:`DoRAProduct`):
``y = (c ⊙ W0) x + (c ⊙ B) h + b`` with ``c = m / n`` and ``h = s·A x`` costs an out×in and an out×r
scaling instead of passes over the tokens × out activation, in both the forward and the backward pass.

The magnitude gradient ``∂L/∂m_i = Σ_tokens g_i · pre_i / n_i`` (``pre = W0 x + s·B A x``) needs an
output-sized tensor per layer, kept or recomputed; ``adapter.recompute`` chooses per layer:

* keep: the layer's output y is kept, and ``pre / n = (y − b) / m``. Free where the next operation
  keeps y anyway (an MLP's activation); one output-sized tensor elsewhere.
* recompute: nothing output-sized is kept; ``Σ_t g_i pre_i = Σ_j W0_ij (gᵀx)_ij + Σ_k B_ik (gᵀh)_ik``
  from x and h (kept for the factors' gradients anyway): one ``tokens × in × out`` product.

With adapter dropout in training (``adapter.dropout > 0``) the form is the authors' and PEFT's: the
W0 term of the rescaling sees the dropped input too, ``y = W0 x + b + (c − 1) ⊙ W0 drop(x) +
c ⊙ s·B A drop(x)`` (:meth:`DoRALinear.forward_dropped`; plain autograd, two base products). Without
dropout, or in eval, both forms are ``c ⊙ (W0 x + s·B A x) + b``.

``recompute: auto`` (the default) recomputes in the square layers (in = out: the attention
projections of BERT and Llama, k/v only without grouped-query attention), where the product is the
cheapest per value not kept, and keeps the output elsewhere: the wide MLP outputs are kept by their
activation anyway, and the down projections' product (in = 4·hidden) costs the most. ``true`` /
``false``: recompute in every layer / in none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters import refuse_quantized
from lorafit.adapters.lora import LoRAConfig, LoRALinear
from lorafit.quant import dense_weight, is_quantized
from lorafit.config import check_choice


@dataclass
class DoRAConfig(LoRAConfig):
    """``adapter=dora``: LoRA's keys (r, alpha, dropout, use_rslora, target_modules) plus a
    trainable magnitude vector per adapted layer.

    Attributes:
        recompute: where the backward pass recomputes ``W0 x`` for the magnitude gradient instead
            of keeping the layer's output: ``auto`` (square layers, in = out), ``true`` (every
            layer: LoRA's memory, one more matrix product per layer) or ``false`` (none: fastest).
            Default: auto.
    """

    roles: ClassVar[tuple[str, ...]] = ("A", "B", "vector")

    recompute: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.recompute = str(self.recompute).lower()         # a YAML boolean arrives as True/False
        check_choice("adapter.recompute", self.recompute, ("auto", "true", "false"))

    def recomputes(self, layer: nn.Linear) -> bool:
        """Whether ``layer`` recomputes W0 x in the backward pass (see the module docstring)."""
        if self.recompute == "auto":
            return layer.in_features == layer.out_features
        return self.recompute == "true"

    def wrap(self, layer: nn.Linear) -> "DoRALinear":
        return DoRALinear(layer, r=self.r, scaling=self.scaling, dropout=self.dropout,
                          recompute=self.recomputes(layer))


class DoRALinear(LoRALinear):
    """LoRA's factors plus ``magnitude`` m; the direction is renormalised per output row."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0, recompute: bool = False) -> None:
        super().__init__(base, r, scaling, dropout)
        self.recompute = recompute
        self.magnitude = nn.Parameter(torch.empty(base.out_features, device=base.weight.device,
                                                  dtype=torch.float32))
        self.magnitude.lorafit_role = "vector"
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
        w0 = dense_weight(self.base, A.dtype)         # the adapter's dtype on any base (dequantised if need be)
        if self.w0_norm_sq.numel() == 0:  # W0 is frozen: computed once, again only after (un)merge
            self.w0_norm_sq = w0.pow(2).sum(1)
        cross = (B * (w0 @ A.T)).sum(1)               # ⟨W0_i, (BA)_i⟩, (out,)
        quad = ((B @ (A @ A.T)) * B).sum(1)           # ‖(BA)_i‖², (out,)
        return (self.w0_norm_sq + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def low_rank_update(self) -> None:
        return None             # W' rescales each row of W0: full rank

    def why_not_low_rank(self) -> str:
        return "DoRA rescales every row of W0, so ΔW has full rank (and serving engines have no DoRA)"

    def peft_form(self) -> tuple[str, dict[str, torch.Tensor]]:
        """PEFT's DoRA: its LoRA factors (scale folded in) and ``lora_magnitude_vector`` = m; PEFT's norm is
        the same per-row ‖W0 + B A‖ of the original base (a rebase's factors are part of B A)."""
        B, A = LoRALinear.low_rank_update(self)
        return "dora", {"lora_A.weight": A, "lora_B.weight": B, "lora_magnitude_vector": self.magnitude.detach()}

    def delta_weight(self) -> torch.Tensor:
        """W' − W0 (DoRA's update is not additive in B A alone)."""
        return self.merged_weight() - dense_weight(self.base)

    def merged_weight(self) -> torch.Tensor:
        if self.merged:
            return self.base.weight.float()
        direction = dense_weight(self.base) + self.scaling * (self.lora_B @ self.lora_A)
        return (self.magnitude / direction.norm(dim=1)).unsqueeze(1) * direction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and not self.merged:
            return self.original_output(x)
        if self.merged:
            return self.base(x)
        if self.training and isinstance(self.dropout, nn.Dropout):
            return self.forward_dropped(x)
        if is_quantized(self.base):
            return self.forward_quantized(x)
        x2 = x.reshape(-1, x.shape[-1])                                   # (tokens, in)
        h = F.linear(self.dropout(x2).to(self.lora_A.dtype), self.lora_A) * self.scaling
        y = DoRAProduct.apply(x2, h, self.lora_B, self.magnitude, self.row_norm(), self.base.weight,
                              self.base.bias, self.recompute)
        return y.view(*x.shape[:-1], y.shape[-1])

    def forward_dropped(self, x: torch.Tensor) -> torch.Tensor:
        """Training with adapter dropout, as the authors' code and PEFT compute it:
        ``y = W0 x + b + (c − 1) ⊙ W0 drop(x) + c ⊙ s·B A drop(x)``, ``c = m / n`` (n detached)."""
        dropped = self.dropout(x)
        out = self.base(x)
        w0_dropped = self.base(dropped)
        if self.base.bias is not None:
            w0_dropped = w0_dropped - self.base.bias.to(w0_dropped.dtype)
        low_rank = F.linear(F.linear(dropped.to(self.lora_A.dtype), self.lora_A) * self.scaling, self.lora_B)
        c = self.magnitude / self.row_norm().detach()
        return out + ((c - 1) * w0_dropped + c * low_rank).to(out.dtype)

    def forward_quantized(self, x: torch.Tensor) -> torch.Tensor:
        """The same output on a quantised base, through the base layer's own product (its weight is
        dequantised inside bitsandbytes, never kept): ``y = c ⊙ (base(x) − b + s·B A x) + b``; the
        magnitude's gradient keeps the output-sized ``pre`` (as ``recompute=false``)."""
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling
        pre = self.base(x)
        bias = self.base.bias
        if bias is not None:
            pre = pre - bias.to(pre.dtype)
        pre = pre + F.linear(h, self.lora_B).to(pre.dtype)
        y = pre * (self.magnitude / self.row_norm()).to(pre.dtype)
        return y if bias is None else y + bias.to(y.dtype)

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            refuse_quantized(self.base, "merge")
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


def scaled(w0: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``c ⊙ W0`` (rows scaled; c in fp32), in W0's dtype."""
    return (w0.to(c.dtype) * c).to(w0.dtype)


class DoRAProduct(torch.autograd.Function):
    """``y = (c ⊙ W0) x + (c ⊙ B) h + b`` with ``c = m / n``: DoRA's output for ``h = s·A x``.

    Inputs with a gradient: x (tokens × in), h (tokens × r), B, m, and W0 and b when they require
    it (LoRA-GA's gradient of W0; a trained bias); n is the detached row norm. The backward pass
    uses the scaled weights too, so no pass over a tokens × out tensor is needed except the
    magnitude's ``Σ_tokens g ⊙ (y − b)`` when y is kept; with ``recompute`` it uses
    ``Σ_j W0_ij (gᵀx)_ij + Σ_k B_ik (gᵀh)_ik`` instead. With fewer tokens than input features
    (decoding) it scales the rows of y instead of W0's, which is cheaper there. The backward is
    made of differentiable operations, so double backward (CTR's curvature products) works. m
    must not have exact zeros when y is kept (it starts at W0's row norms).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, h: torch.Tensor, B: torch.Tensor, m: torch.Tensor, n: torch.Tensor,
                w0: torch.Tensor, bias: torch.Tensor | None, recompute: bool) -> torch.Tensor:
        c = (m / n).unsqueeze(1)
        fold = x.shape[0] >= x.shape[1]      # scaling W0 (out×in) is cheaper than scaling y (tokens×out)
        y = F.linear(x, scaled(w0, c) if fold else w0, bias if fold else None)   # under autocast: its dtype
        if y.dtype == h.dtype:
            y.addmm_(h, (B * c if fold else B).T.to(h.dtype))
        else:                                                        # half-precision base, fp32 adapter
            y = y + F.linear(h, B * c if fold else B).to(y.dtype)
        if not fold:                         # few tokens (decoding): scale the output rows instead
            y = y.mul_(c.T.to(y.dtype)) if bias is None else torch.addcmul(bias.to(y.dtype), y, c.T.to(y.dtype))
        ctx.fold = fold
        ctx.recompute = recompute
        ctx.save_for_backward(x, h, B, m, n, w0, bias, *(() if recompute else (y,)))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        # grad has y's dtype; the base path runs in it, the rank-r path in h's dtype, and autograd
        # casts each returned gradient to its input's dtype.
        x, h, B, m, n, w0, bias, *kept = ctx.saved_tensors
        c = (m / n).unsqueeze(1)
        grad_x = grad_h = grad_B = grad_m = grad_w0 = grad_bias = None
        g_low = grad.to(h.dtype)
        if ctx.needs_input_grad[0]:
            if ctx.fold:
                grad_x = grad.mm(scaled(w0, c).to(grad.dtype))
            else:
                grad_x = (grad * c.T.to(grad.dtype)).mm(w0.to(grad.dtype))
        if ctx.needs_input_grad[1]:
            grad_h = g_low.mm((B * c).to(h.dtype))
        need_gh = ctx.needs_input_grad[2] or (ctx.needs_input_grad[3] and ctx.recompute)
        gh = g_low.T.mm(h).to(B.dtype) if need_gh else None                      # (out, r)
        if ctx.needs_input_grad[2]:
            grad_B = gh * c
        need_gw = ctx.needs_input_grad[5] or (ctx.needs_input_grad[3] and ctx.recompute)
        gw = grad.T.mm(x.to(grad.dtype)).to(m.dtype) if need_gw else None         # (out, in)
        if ctx.needs_input_grad[5]:                  # W0 trained (LoRA-GA's gradient of the base weight)
            grad_w0 = gw * c
        if ctx.needs_input_grad[3]:
            if ctx.recompute:
                grad_m = ((w0.to(m.dtype) * gw).sum(1) + (B * gh).sum(1)) / n
            else:
                grad_m = (grad.to(m.dtype) * kept[0].to(m.dtype)).sum(0)
                if bias is not None:
                    grad_m = grad_m - grad.to(m.dtype).sum(0) * bias.to(m.dtype)
                grad_m = grad_m / m
        if bias is not None and ctx.needs_input_grad[6]:
            grad_bias = grad.sum(0)
        return grad_x, grad_h, grad_B, grad_m, None, grad_w0, grad_bias, None
