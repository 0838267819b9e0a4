"""Spectral adapters (Zhang & Pilanci, 2024, arXiv 2405.13952): tune the top-r singular vectors of W0.

At attach time, once and in fp32: ``W0 = U S Vᵀ`` (its top r triplets only, from the fp64 Gram
matrix: :func:`lorafit.linalg.singular_triplets`, as accurate as an fp32 SVD in about one layer of
memory; a 4-bit base is read a block of rows at a time, never dequantised whole), keep
``U_r ∈ R^{out×r}``, ``S_r``, ``V_r ∈ R^{in×r}`` as buffers (saved with the adapter, so a reload
never depends on the SVD's signs), ``W_rest = W0 − U_r diag(S_r) V_rᵀ``.

- Spectral-A (additive, ``adapter=spectral_a``): ``W = (U_r + B_U) diag(S_r) (V_r + B_V)ᵀ + W_rest``,
  trainable ``B_U ∈ R^{out×r}``, ``B_V ∈ R^{in×r}`` (r·(out+in) numbers, as LoRA), both 0 at start.
- Spectral-R (rotation, ``adapter=spectral_r``): ``U_r ← U_r cay(X_U)``, ``V_r ← V_r cay(X_V)``
  with the Cayley map ``cay(X) = (I − K)(I + K)^{-1}``, ``K = (X − Xᵀ)/2``, which keeps both
  orthonormal; trainable ``X_U, X_V ∈ R^{r×r}`` (2r² numbers), 0 at start (cay(0) = I). With
  ``adapter.train_scale=true``, as the authors' rotation code does, also a multiplicative scale
  ``λ ∈ R^r`` on the top-r singular values (1 at start): ``S_r ← λ ⊙ S_r`` in the tuned part.

No α/r factor (methods.md). The forward never forms an out×in matrix: with ``h = x V_r`` (…, r),

    A:  y = W0 x + b + (U_r + B_U)(S ⊙ x B_V) + B_U (S ⊙ h)
    R:  y = W0 x + b + U_r [cay(X_U) (λ ⊙ S ⊙ cay(X_V)ᵀ h) − S ⊙ h]      (λ = 1 without train_scale)

(row-vector form in the code), both exactly W0 x + b while the trainable tensors are zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from lorafit.adapters import AdditiveAdapter
from lorafit.config import ConfigError, check_choice, check_range
from lorafit.linalg import singular_triplets
from lorafit.quant import weight_rows

MODES = ("additive", "rotation")


@dataclass
class SpectralConfig:
    """``adapter=spectral_a`` (mode=additive) and ``adapter=spectral_r`` (mode=rotation).

    Attributes:
        r: number of top singular vectors tuned. Default: 8.
        mode: ``additive`` (Spectral-A) or ``rotation`` (Spectral-R, Cayley-parametrised).
        train_scale: rotation only: also train a scale on the top-r singular values (1 at start), as
            the authors' rotation code does. Default: false.
        target_modules: name patterns of the layers to adapt (null: the architecture's defaults).
    """

    r: int = 8
    mode: str = "additive"
    train_scale: bool = False
    target_modules: Optional[list[str]] = None

    def __post_init__(self) -> None:
        check_range("adapter.r", self.r, 1)
        check_choice("adapter.mode", self.mode, MODES)
        if self.train_scale and self.mode != "rotation":
            raise ConfigError("adapter.train_scale=true scales the rotated singular values of Spectral-R "
                              "(adapter=spectral_r); Spectral-A has no such scale. Drop it, or use adapter=spectral_r.")

    def check(self, name: str, layer: nn.Module) -> Optional[str]:
        if not isinstance(layer, nn.Linear):
            return f"{name} is a {type(layer).__name__}, not nn.Linear"
        if self.r > min(layer.in_features, layer.out_features):
            return f"{name} is {layer.out_features}×{layer.in_features}, fewer singular values than adapter.r={self.r}"
        return None

    def wrap(self, layer: nn.Linear) -> "SpectralLinear":
        return SpectralLinear(layer, self.r, self.mode, self.train_scale)


def cayley(X: torch.Tensor) -> torch.Tensor:
    """cay(X) = (I − K)(I + K)^{-1} with K = (X − Xᵀ)/2 (orthogonal; cay(0) = I exactly)."""
    K = (X - X.T) / 2
    eye = torch.eye(X.shape[0], device=X.device, dtype=X.dtype)
    return torch.linalg.solve(eye + K, eye - K)  # (I+K)^{-1}(I−K) = (I−K)(I+K)^{-1}: they commute


class SpectralLinear(AdditiveAdapter):
    """A frozen ``nn.Linear`` whose top-r singular vectors are tuned (additively or by rotation)."""

    def __init__(self, base: nn.Linear, r: int, mode: str = "additive", train_scale: bool = False) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.mode = mode
        with torch.no_grad():
            U, S, V = singular_triplets(weight_rows(base), r)
        self.register_buffer("spectral_U", U.contiguous())
        self.register_buffer("spectral_S", S.contiguous())
        self.register_buffer("spectral_V", V.contiguous())
        factory = {"device": base.weight.device, "dtype": torch.float32}
        if mode == "additive":
            self.spectral_BU = nn.Parameter(torch.zeros(base.out_features, r, **factory))
            self.spectral_BV = nn.Parameter(torch.zeros(base.in_features, r, **factory))
        else:
            self.spectral_XU = nn.Parameter(torch.zeros(r, r, **factory))
            self.spectral_XV = nn.Parameter(torch.zeros(r, r, **factory))
            if train_scale:
                self.spectral_scale = nn.Parameter(torch.ones(r, **factory))
        self.merged = False
        self.disabled = False

    def tuned_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(U_r', V_r'): the tuned top-r singular vectors."""
        if self.mode == "additive":
            return self.spectral_U + self.spectral_BU, self.spectral_V + self.spectral_BV
        return self.spectral_U @ cayley(self.spectral_XU), self.spectral_V @ cayley(self.spectral_XV)

    def tuned_values(self) -> torch.Tensor:
        """λ ⊙ S_r: the top-r singular values as tuned (S_r without train_scale)."""
        scale = getattr(self, "spectral_scale", None)
        return self.spectral_S if scale is None else self.spectral_S * scale

    def delta_weight(self) -> torch.Tensor:
        """ΔW = U_r' diag(λ S) V_r'ᵀ − U_r diag(S) V_rᵀ (fp32, out×in)."""
        U2, V2 = self.tuned_factors()
        S = self.spectral_S
        return (U2 * self.tuned_values()) @ V2.T - (self.spectral_U * S) @ self.spectral_V.T

    def low_rank_update(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``([U' diag(λS), −U diag(S)], [V'ᵀ; Vᵀ])``: rank ≤ 2r."""
        U2, V2 = self.tuned_factors()
        S, U, V = self.spectral_S, self.spectral_U, self.spectral_V
        return torch.cat([U2 * self.tuned_values(), -U * S], 1).detach(), torch.cat([V2.T, V.T]).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.disabled or self.merged:
            return out
        U, S, V = self.spectral_U, self.spectral_S, self.spectral_V
        xf = x.to(V.dtype)
        h = xf @ V                                                            # (..., r)
        if self.mode == "additive":
            BU, BV = self.spectral_BU, self.spectral_BV
            delta = ((xf @ BV) * S) @ (U + BU).T + (h * S) @ BU.T
        else:
            rotated = ((h @ cayley(self.spectral_XV)) * self.tuned_values()) @ cayley(self.spectral_XU).T
            delta = (rotated - h * S) @ U.T
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return f"r={self.r}, mode={self.mode}"
