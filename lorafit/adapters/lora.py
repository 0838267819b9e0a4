"""LoRA (Hu et al., 2021, arXiv 2106.09685) and rsLoRA (Kalajdzievski, 2023, arXiv 2312.03732).

    y = W0 x + b + s · B (A dropout(x)),     A ∈ R^{r×in}, B ∈ R^{out×r},  ΔW = s·B A

with ``s = α / r`` (LoRA, eq. 3 of the paper's §4.1) or ``s = α / √r`` (rsLoRA). A starts
Kaiming-uniform (a = √5), B at zero, so the adapted model equals the base model at step 0.

The scale is applied to the rank-r intermediate ``A x`` rather than to the out-sized result:
the same function, r/out of the multiplications.

Inits that start A, B from W0 itself (PiSSA, MiLoRA, OLoRA, LoRA-GA) call :meth:`LoRALinear.rebase`:
the layer keeps the starting factors ``A0, B0`` as buffers (``init_A``, ``init_B``, saved with the
adapter) and its base becomes the residual ``W0 − s·B0 A0``, so the model is unchanged at step 0.
Loading the adapter onto the *original* base redoes that subtraction from the stored factors, so the
saved adapter always applies to the unmodified base model; the switched-off layer (``disabled``)
adds ``s·B0 A0`` back and so computes the original ``W0 x``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters import AdditiveAdapter
from lorafit.config import check_range
from lorafit.quant import dense_weight, set_dense_weight


@dataclass
class LoRAConfig:
    """``adapter=lora`` (and ``adapter=rslora``: the same with ``use_rslora=true``).

    Attributes:
        r: rank of the update. Default: 8.
        alpha: scale numerator; s = alpha/r (or alpha/sqrt(r) with use_rslora). Default: 16.
        dropout: dropout on the adapter path only. Default: 0.0.
        use_rslora: rank-stabilised scaling alpha/sqrt(r). Default: false.
        target_modules: name patterns of the layers to adapt (see ``find_targets``); empty means
            the architecture's defaults (BERT: query/key/value/dense; Llama: q/k/v/o/gate/up/down_proj).
        from_pretrained: a PEFT adapter folder (LoRA, rsLoRA or DoRA, trained elsewhere) whose factors
            (and head) the run starts from instead of an init; r, alpha, use_rslora, the method and the
            target layers must be the folder's (:mod:`lorafit.adapters.peft_import`). Default: null.
    """

    roles: ClassVar[tuple[str, ...]] = ("A", "B")   # what its layers declare (lorafit.adapters.ROLES)

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    use_rslora: bool = False
    target_modules: Optional[list[str]] = None
    from_pretrained: Optional[str] = None

    def __post_init__(self) -> None:
        check_range("adapter.r", self.r, 1)
        check_range("adapter.alpha", self.alpha, 0, low_inclusive=False)
        check_range("adapter.dropout", self.dropout, 0.0, 1.0)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def check(self, name: str, layer: nn.Module) -> Optional[str]:
        if not isinstance(layer, nn.Linear):
            return f"{name} is a {type(layer).__name__}, not nn.Linear"
        return None

    def wrap(self, layer: nn.Linear) -> "LoRALinear":
        return LoRALinear(layer, r=self.r, scaling=self.scaling, dropout=self.dropout)


class LoRALinear(AdditiveAdapter):
    """A frozen ``nn.Linear`` plus the low-rank update ``s·B A``."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.scaling = scaling
        # Adapter weights stay fp32 even on a half-precision base: the update is small and
        # its optimizer state must not round away.
        factory = {"device": base.weight.device, "dtype": torch.float32}
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, **factory))
        # The role of each tensor, declared by the layer itself (see lorafit.adapters.ROLES): step
        # rules (LoRA+, RefLoRA) read it; AdaLoRA's look-alike lora_A/lora_B (not a plain B·A) carry none.
        self.lora_A.lorafit_role = "A"
        self.lora_B.lorafit_role = "B"
        if base.bias is not None:   # frozen, unless a run trains it: an output-side vector like B
            base.bias.lorafit_role = "vector"
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A (out × in, fp32)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def original_weight(self) -> torch.Tensor:
        """W0 as the original base holds it (the residual plus ``s·B0 A0`` after a rebase)."""
        weight = dense_weight(self.base)
        return weight + self.scaling * (self.init_B @ self.init_A) if self.rebased else weight

    def low_rank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(s·B, A)``; after a rebase ``([s·B, −s·B0], [A; A0])``: rank 2r, as PEFT converts PiSSA/OLoRA."""
        B, A = self.lora_B * self.scaling, self.lora_A
        if self.rebased:
            B, A = torch.cat([B, -self.init_B * self.scaling], 1), torch.cat([A, self.init_A])
        return B.detach(), A.detach()

    @property
    def rebased(self) -> bool:
        return hasattr(self, "init_A")

    @torch.no_grad()
    def rebase(self, A0: torch.Tensor, B0: torch.Tensor) -> None:
        """Start from ``A0, B0`` and make the base the residual ``W0 − s·B0 A0`` (fp32 maths)."""
        if self.rebased or self.merged:
            raise RuntimeError("rebase() needs an unmerged layer that has not been rebased yet")
        self.lora_A.copy_(A0)
        self.lora_B.copy_(B0)
        self.register_buffer("init_A", self.lora_A.detach().clone())
        self.register_buffer("init_B", self.lora_B.detach().clone())
        # formed in place: in W0 itself on an fp32 base, else in its fp32 copy, which a quantised base
        # gets quantised again (as PEFT does for PiSSA on 4 bits); no out×in temporary besides
        residual = dense_weight(self.base).addmm_(self.init_B, self.init_A, alpha=-self.scaling)
        set_dense_weight(self.base, residual)
        self.after_init()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        """Loading a saved adapter whose init rewrote W0 (the file holds ``init_A``, ``init_B``) onto the
        original base: rebase from those factors first, so the residual is rebuilt, then load."""
        if prefix + "init_A" in state_dict and not self.rebased:
            self.rebase(state_dict[prefix + "init_A"], state_dict[prefix + "init_B"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def after_init(self) -> None:
        """Called by every init once it has set A, B (and W0); subclasses re-derive their state."""

    def original_output(self, x: torch.Tensor) -> torch.Tensor:
        """The unadapted layer's output ``W0 x + b`` (adds ``s·B0 A0 x`` back after a rebase)."""
        out = self.base(x)
        if self.rebased:
            out = out + F.linear(F.linear(x.to(self.init_A.dtype), self.init_A) * self.scaling, self.init_B).to(out.dtype)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled and not self.merged:
            return self.original_output(x)
        out = self.base(x)
        if self.merged:
            return out
        h = F.linear(self.dropout(x).to(self.lora_A.dtype), self.lora_A) * self.scaling  # (..., r)
        return out + F.linear(h, self.lora_B).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"
