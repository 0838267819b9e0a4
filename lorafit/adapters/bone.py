"""Bone and Bat (Kang et al., DiSHA, arXiv 2409.15371): block-shared updates of the weight.

Bone ("block affine"): one trainable ``D ∈ R^{r×out}`` shared by every input block of width r,

    ΔW[o, k·r + j] = D[j, o]          (Dᵀ tiled along the input dimension)
    y = W0 x + b + (Σ_k x[k·r:(k+1)·r]) @ D

The forward never forms the tiled matrix: the input is cut into blocks of width r (the last one
zero-padded when ``in`` is not a multiple of r), the blocks are summed, and one r×out product
follows — cheaper than LoRA's two products. The merge adds ``tile(Dᵀ)`` cropped to ``in`` columns
(the ragged last block keeps only its first ``in mod r`` rows of D).

Bat ("block affine transformation"): blocks ``W_ij ∈ R^{r×r}`` of W0 (i: output block, j: input
block) are transformed by a per-output-block ``D_i ∈ R^{r×r}``,

    ΔW_ij = W_ij D_i + D_i,           D ∈ R^{(out/r)×r×r}

so the update depends on W0 and is not low-rank in any useful way. **Bat materialises
W0 + ΔW (out×in) in every forward, as the paper does** — about twice the cost of a LoRA forward
and one extra weight-sized tensor in memory per layer. It requires ``in`` and ``out`` to be
multiples of r. Unmerge inverts the map: ``W_ij = (W'_ij − D_i)(I + D_i)^{-1}``.

Both start at D = 0 (ΔW = 0). Defaults as in methods.md: r = 64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters import AdditiveAdapter
from lorafit.config import ConfigError, check_range
from lorafit.quant import is_quantized


@dataclass
class BoneConfig:
    """``adapter=bone``.

    Attributes:
        r: block width; D has r×out entries. Default: 64.
        dropout: dropout on the adapter path's input. Default: 0.0.
        target_modules: name patterns of the layers to adapt (null: the architecture's defaults).
    """

    r: int = 64
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_range("adapter.r", self.r, 1)
        check_range("adapter.dropout", self.dropout, 0.0, 1.0)

    def check(self, name: str, layer: nn.Module) -> Optional[str]:
        if not isinstance(layer, nn.Linear):
            return f"{name} is a {type(layer).__name__}, not nn.Linear"
        return None

    def wrap(self, layer: nn.Linear) -> "BoneLinear":
        return BoneLinear(layer, self.r, self.dropout)


class BoneLinear(AdditiveAdapter):
    """A frozen ``nn.Linear`` plus Bone's block-shared update ``tile(Dᵀ)``."""

    def __init__(self, base: nn.Linear, r: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.bone_D = nn.Parameter(torch.zeros(r, base.out_features, device=base.weight.device, dtype=torch.float32))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False

    def delta_weight(self) -> torch.Tensor:
        """ΔW = tile(Dᵀ) along the input dimension, cropped to ``in`` columns (fp32)."""
        blocks = -(-self.base.in_features // self.r)
        return self.bone_D.T.repeat(1, blocks)[:, :self.base.in_features]

    def low_rank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Dᵀ, E)`` with ``E[t, j] = 1`` where ``j mod r = t``: tile(Dᵀ) = Dᵀ E, rank ≤ r."""
        columns = torch.arange(self.base.in_features, device=self.bone_D.device)
        E = (columns[None] % self.r == torch.arange(self.r, device=columns.device)[:, None]).float()
        return self.bone_D.T.detach(), E

    def peft_form(self) -> tuple[str, dict[str, torch.Tensor]]:
        """PEFT's MiSS (Bone's successor there), default mode: its block is D."""
        return "miss", {"miss_block": self.bone_D.detach()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled or self.merged:
            return out
        h = self.dropout(x).to(self.bone_D.dtype)
        pad = -h.shape[-1] % self.r
        if pad:
            h = F.pad(h, (0, pad))
        summed = h.unflatten(-1, (-1, self.r)).sum(-2)              # Σ_k x[k·r:(k+1)·r], (..., r)
        return out + (summed @ self.bone_D).to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}"


@dataclass
class BatConfig(BoneConfig):
    """``adapter=bat``: Bone's keys; ``in`` and ``out`` of every target must be multiples of r.

    Bat has no separate adapter path (the forward uses the merged weight), so ``dropout`` must be 0.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dropout:
            raise ConfigError(f"adapter.dropout={self.dropout}: Bat applies W0 + ΔW as one matrix, so there is "
                              f"no adapter-only path to drop out. Use adapter.dropout=0 (or model.dropout).")

    def check(self, name: str, layer: nn.Module) -> Optional[str]:
        problem = super().check(name, layer)
        if problem is None and is_quantized(layer):
            problem = ("the base is quantised, and Bat forms the dense W0 + ΔW (W0's blocks times D) in every "
                       "forward pass and keeps it for the backward, which is the memory a quantised base exists "
                       "to save; use adapter=bone (or another adapter) with model.quantization, or Bat with "
                       "model.quantization=none")
        if problem is None and (layer.in_features % self.r or layer.out_features % self.r):
            problem = (f"{name} is {layer.out_features}×{layer.in_features} (out×in), not divisible into "
                       f"{self.r}×{self.r} blocks (adapter.r={self.r})")
        return problem

    def wrap(self, layer: nn.Linear) -> "BatLinear":
        return BatLinear(layer, self.r)


class BatLinear(AdditiveAdapter):
    """A frozen ``nn.Linear`` whose r×r blocks are transformed: ``W_ij ← W_ij (I + D_i) + D_i``."""

    def __init__(self, base: nn.Linear, r: int) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.bat_D = nn.Parameter(torch.zeros(base.out_features // r, r, r, device=base.weight.device,
                                              dtype=torch.float32))
        self.merged = False
        self.disabled = False

    def _blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """(out, in) → (out/r, in/r, r, r): element [i, j] is the block W_ij."""
        r = self.r
        return weight.reshape(weight.shape[0] // r, r, weight.shape[1] // r, r).transpose(1, 2)

    def _unblocks(self, blocks: torch.Tensor) -> torch.Tensor:
        return blocks.transpose(1, 2).reshape(self.base.out_features, self.base.in_features)

    def delta_weight(self) -> torch.Tensor:
        """ΔW_ij = W_ij D_i + D_i (fp32, materialised)."""
        D = self.bat_D.unsqueeze(1)                                   # (out/r, 1, r, r): D_i for every j
        return self._unblocks(self._blocks(self.base.weight.float()) @ D + D)   # Bat refuses a quantised base

    def why_not_low_rank(self) -> str:
        return "ΔW_ij = W_ij D_i + D_i depends on every block of W0 (full rank)"

    def peft_form(self) -> tuple[str, dict[str, torch.Tensor]]:
        """PEFT's MiSS in its ``bat`` mode: the same block transform, its block is D."""
        return "miss_bat", {"miss_block": self.bat_D.detach()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled or self.merged:
            return self.base(x)
        weight = self.merged_weight()                                 # materialised, as in the paper
        return F.linear(x.to(weight.dtype), weight,
                        None if self.base.bias is None else self.base.bias.to(weight.dtype)).to(x.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """W_ij = (W'_ij − D_i)(I + D_i)^{-1}, solved in fp32."""
        if self.merged:
            D = self.bat_D.unsqueeze(1)
            eye = torch.eye(self.r, device=D.device)
            blocks = torch.linalg.solve(eye + D, self._blocks(self.base.weight.float()) - D, left=False)
            self.base.weight.data = self._unblocks(blocks).to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r} (materialises W0 + ΔW in forward)"
