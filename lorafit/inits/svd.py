"""Inits that start LoRA's factors from W0 itself and leave the residual in the base (methods.md).

- ``init=pissa`` (Meng et al., 2024, arXiv 2404.02948): ``W0 = U S Vᵀ``, the **top** r triplets,
  ``S_r ← S[:r]/s``, ``A = diag(√S_r) Vᵀ[:r]``, ``B = U[:, :r] diag(√S_r)``; exact (the r triplets
  from the fp64 Gram matrix, :func:`lorafit.linalg.singular_triplets`: as accurate as an fp32 SVD
  in about one layer of memory) or, with ``init.niter=K``, the randomised
  ``torch.svd_lowrank(W0, q=r, niter=K)`` ("PiSSA fast").
- ``init=milora`` (Wang et al., 2024, arXiv 2406.09044): the same on the **last** r triplets (the
  minor singular components), exact.
- ``init=olora`` (Büyükakyüz, 2024, arXiv 2406.01775): ``Q, R = qr(W0)``, ``B = Q[:, :r]``,
  ``A = R[:r]``, no rescaling. Householder QR's first r columns of Q depend only on the first r
  columns of W0, so ``Q_r, R_rr = qr(W0[:, :r])`` and ``R[:r] = Q_rᵀ W0`` (``R_rr`` in its first r
  columns): the same factors without the full Q and R.

In every case the base becomes ``W0 − s·B A`` (``LoRALinear.rebase``), so the model is unchanged at
step 0, and the saved adapter stores the starting factors (``init_A``, ``init_B``): loading it onto
the *original* base rebuilds the residual, and ``lorafit merge`` onto the original base gives the
trained model. All decompositions run on the layer's device, one layer at a time (a quantised
layer is dequantised for its own decomposition and residual only; for the exact SVDs not even that:
they read a 4-bit layer a block of rows at a time, :func:`lorafit.quant.weight_rows`), and the
residual is formed in place. The papers recommend α = r (s = 1) and no dropout for PiSSA and MiLoRA.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from rich.progress import Progress
from torch import nn

from lorafit.console import console
from lorafit.config import check_range
from lorafit.inits.basic import _lora_factors
from lorafit.linalg import Matrix, singular_triplets
from lorafit.quant import dense_weight, weight_rows

Factors = Callable[[Matrix, nn.Module], tuple[torch.Tensor, torch.Tensor]]


def rebase_each(layers: dict[str, nn.Module], what: str, factors: Factors,
                read: Callable[[nn.Module], Matrix] = dense_weight) -> None:
    """Rebase every layer on ``factors(read(base) = W0 in fp32, layer) → (A0, B0)``, one layer at a time.

    W0 is read (a quantised base dequantised, whole or, with ``read=weight_rows``, by rows) and
    dropped before the rebase (which forms the residual from the layer itself), so a layer's
    decomposition and its residual never overlap in memory.
    """
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(what, total=len(layers))
        for name, layer in layers.items():
            _lora_factors(name, layer)   # a LoRA-factor adapter, or a clear error
            A0, B0 = factors(read(layer.base), layer)
            layer.rebase(A0, B0)
            progress.advance(task)


def svd_factors(weight: Matrix, r: int, scaling: float, minor: bool = False,
                niter: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with ``s·B A`` = the top (or, ``minor``, the last) r singular triplets of ``weight``
    (a tensor, or rows to read when exact: ``niter`` null)."""
    if niter is None:
        U, S, V = singular_triplets(weight, r, minor)
    else:
        U, S, V = torch.svd_lowrank(weight, q=r, niter=niter)
    root = (S / scaling).sqrt()
    return root[:, None] * V.T, U * root[None, :]


def qr_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(R[:r], Q[:, :r]) of ``weight = Q R`` (Householder) from its first r columns only."""
    Q, R = torch.linalg.qr(weight[:, :r])
    A = Q.T @ weight           # r×n (of all columns: ``weight[:, r:]`` would be copied whole for the product)
    A[:, :r] = R               # exactly upper triangular there
    return A, Q


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
        rebase_each(layers, "PiSSA init", lambda w, layer: svd_factors(w, layer.r, layer.scaling, niter=self.niter),
                    read=weight_rows if self.niter is None else dense_weight)


@dataclass
class MiLoRAInit:
    """``init=milora``: the r minor singular components (exact SVD)."""

    rewrites_base: ClassVar[bool] = True      # W0 ← W0 − s·B0 A0 (LoRALinear.rebase)

    def apply(self, layers: dict[str, nn.Module]) -> None:
        rebase_each(layers, "MiLoRA init", lambda w, layer: svd_factors(w, layer.r, layer.scaling, minor=True),
                    read=weight_rows)


@dataclass
class OLoRAInit:
    """``init=olora``: B, A = the first r columns of Q and rows of R in ``W0 = Q R``."""

    rewrites_base: ClassVar[bool] = True      # W0 ← W0 − s·B0 A0 (LoRALinear.rebase)

    def apply(self, layers: dict[str, nn.Module]) -> None:
        rebase_each(layers, "OLoRA init", lambda w, layer: qr_factors(w, layer.r))
