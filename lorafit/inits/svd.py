"""Inits that start LoRA's factors from W0 itself and leave the residual in the base (methods.md).

- ``init=pissa`` (Meng et al., 2024, arXiv 2404.02948): ``W0 = U S Vᵀ``, the **top** r triplets,
  ``S_r ← S[:r]/s``, ``A = diag(√S_r) Vᵀ[:r]``, ``B = U[:, :r] diag(√S_r)``; exact SVD
  (``torch.linalg.svd``) or, with ``init.niter=K``, the randomised ``torch.svd_lowrank(W0, q=r,
  niter=K)`` ("PiSSA fast").
- ``init=milora`` (Wang et al., 2024, arXiv 2406.09044): the same on the **last** r triplets (the
  minor singular components), exact SVD.
- ``init=olora`` (Büyükakyüz, 2024, arXiv 2406.01775): ``Q, R = qr(W0)``, ``B = Q[:, :r]``,
  ``A = R[:r]``, no rescaling.

In every case the base becomes ``W0 − s·B A`` (``LoRALinear.rebase``), so the model is unchanged at
step 0, and the saved adapter stores the starting factors (``init_A``, ``init_B``): loading it onto
the *original* base rebuilds the residual, and ``lorafit merge`` onto the original base gives the
trained model. All decompositions run in fp32 on the layer's device. The papers recommend α = r
(s = 1) and no dropout for PiSSA and MiLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from rich.progress import Progress
from torch import nn

from lorafit.console import console
from lorafit.config import check_range
from lorafit.inits.basic import _lora_factors
from lorafit.quant import dense_weight


def _each_layer(layers: dict[str, nn.Module], what: str):
    """(name, layer, W0 in fp32) for every layer, with a progress bar (SVDs of big layers take a while)."""
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(what, total=len(layers))
        for name, layer in layers.items():
            _lora_factors(name, layer)   # a LoRA-factor adapter, or a clear error
            yield name, layer, dense_weight(layer.base)   # dequantised on a quantised base
            progress.advance(task)


def svd_factors(weight: torch.Tensor, r: int, scaling: float, minor: bool = False,
                niter: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``s·B A`` = the top (or, ``minor``, the last) r singular triplets of ``weight``."""
    if niter is None:
        U, S, Vh = torch.linalg.svd(weight, full_matrices=False)
        picked = slice(len(S) - r, len(S)) if minor else slice(0, r)
        U, S, Vh = U[:, picked], S[picked], Vh[picked]
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
        Vh = V.T
    root = (S / scaling).sqrt()
    return root[:, None] * Vh, U * root[None, :]


@dataclass
class PiSSAInit:
    """``init=pissa``: principal singular values and vectors.

    Attributes:
        niter: null = exact SVD; an integer K = randomised SVD with K subspace iterations (fast). Default: null.
    """

    rewrites_base: ClassVar[bool] = True      # W0 ← W0 − s·B0 A0 (LoRALinear.rebase)

    niter: Optional[int] = None

    def __post_init__(self) -> None:
        if self.niter is not None:
            check_range("init.niter", self.niter, 0)

    def apply(self, layers: dict[str, nn.Module]) -> None:
        for _, layer, weight in _each_layer(layers, "PiSSA init"):
            layer.rebase(*svd_factors(weight, layer.r, layer.scaling, niter=self.niter))


@dataclass
class MiLoRAInit:
    """``init=milora``: the r minor singular components (exact SVD)."""

    rewrites_base: ClassVar[bool] = True      # W0 ← W0 − s·B0 A0 (LoRALinear.rebase)

    def apply(self, layers: dict[str, nn.Module]) -> None:
        for _, layer, weight in _each_layer(layers, "MiLoRA init"):
            layer.rebase(*svd_factors(weight, layer.r, layer.scaling, minor=True))


@dataclass
class OLoRAInit:
    """``init=olora``: B, A = the first r columns of Q and rows of R in ``W0 = Q R``."""

    rewrites_base: ClassVar[bool] = True      # W0 ← W0 − s·B0 A0 (LoRALinear.rebase)

    def apply(self, layers: dict[str, nn.Module]) -> None:
        for _, layer, weight in _each_layer(layers, "OLoRA init"):
            Q, R = torch.linalg.qr(weight)
            layer.rebase(R[:layer.r], Q[:, :layer.r])
