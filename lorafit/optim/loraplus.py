"""LoRA+ (Hayou, Ghosh, Yu, 2024, arXiv 2402.12354): the B factor learns λ times faster than A.

    η_A = lr,    η_B = λ · lr,    λ = ``ratio`` (default 16 = 2⁴, the paper's suggested value)

In the paper's infinite-width analysis a shared learning rate for A (r × in) and B (out × r)
cannot make both factors learn features efficiently: A's fan-in grows with the width n while B's
is the fixed rank r, so with Adam η_A = Θ(1/n) and η_B = Θ(1). LoRA+ (AdamW with η_B = λ η_A)
fixes that with one extra number.

Parameter groups (from the ``lorafit_factor`` tag a LoRA layer puts on its factors and from the
module each tensor belongs to — no name patterns; see :func:`loraplus_lr`):

- ``lora_B`` of every LoRA-factor layer (``LoRALinear`` and subclasses: lora, rslora, dora,
  lora_dash, rosa) and every other 1-D tensor inside such a layer (DoRA's magnitude, LoRA-Dash's
  d, a trainable bias): λ · lr — a vector acts on the output side like B, with no wide fan-in;
- ``lora_A``, RoSA's sparse values (entries of ΔW itself, wide like A) and every tensor outside
  the adapter layers (a task head, its bias included): lr;
- a tensor carrying ``lorafit_lr`` (RoSA's ``sparse_lr``) keeps that learning rate.

Weight decay is applied in every group at ``weight_decay``, 1-D tensors included: the paper
states no rule for them, and lorafit's AdamW decays every trainable tensor, so
``optimizer=loraplus optimizer.ratio=1`` is exactly ``optimizer=adamw``. The schedule multiplies
every group's learning rate by the same factor. lorafit puts no LoRA on embeddings, so there is
no separate embedding group (PEFT gives LoRA embeddings their own lr, 1e-6 by default).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from torch import nn

from lorafit.config import ConfigError, check_range
from lorafit.optim.basic import AdamWConfig

FACTOR_ADAPTERS = "adapter=lora, rslora, dora, lora_dash or rosa"
OTHER_ADAPTERS = "adalora (ΔW = P·Λ·Q with pruned ranks), bone, bat, spectral_a and spectral_r"


def module_path(name: str) -> str:
    """``bert.encoder.layer.0.attention.self.query.lora_B`` → ``bert.encoder.layer.0.attention.self.query``."""
    return name.rpartition(".")[0]


def factor_layer_paths(named_params: list[tuple[str, nn.Parameter]]) -> set[str]:
    """Module paths of the LoRA-factor layers: those owning a tensor tagged ``lorafit_factor == "B"``
    (the tag is set by ``LoRALinear`` only, so AdaLoRA's ``lora_B`` does not count)."""
    return {module_path(n) for n, p in named_params if getattr(p, "lorafit_factor", None) == "B"}


def inside(path: str, layers: set[str]) -> bool:
    """Is the module ``path`` one of ``layers`` or below one (``query.base`` is inside ``query``)?"""
    parts = path.split(".")
    return any(".".join(parts[:k]) in layers for k in range(len(parts), 0, -1))


def loraplus_lr(name: str, param: nn.Parameter, layers: set[str], lr: float, ratio: float) -> float:
    """The learning rate LoRA+ gives one tensor (see the module docstring for the rule)."""
    own: Optional[float] = getattr(param, "lorafit_lr", None)
    if own is not None:
        return own
    factor = getattr(param, "lorafit_factor", None)
    if factor == "B":
        return ratio * lr
    if factor is None and param.ndim == 1 and inside(module_path(name), layers):
        return ratio * lr
    return lr


def no_factor_error(named_params: list[tuple[str, nn.Parameter]], rule: str) -> ConfigError:
    """One paragraph: which tensors the run trains, and which adapters ``rule`` supports."""
    kinds = Counter(n.rpartition(".")[2] for n, _ in named_params)
    found = ", ".join(f"{k} ×{c}" for k, c in kinds.most_common(6)) or "none"
    return ConfigError(
        f"optimizer={rule} works on LoRA-factor layers (ΔW = s·B A, built by {FACTOR_ADAPTERS}), but the "
        f"adapter in use has none: its {len(named_params)} trainable tensors are {found}, and no LoRALinear "
        f"layer owns them. The adapters {OTHER_ADAPTERS} are not supported. Pick a LoRA-factor "
        f"adapter, or keep this adapter with optimizer=adamw.")


@dataclass
class LoRAPlusConfig(AdamWConfig):
    """``optimizer=loraplus``: AdamW with the B factors at ``ratio`` × lr.

    Attributes:
        ratio: λ = η_B / η_A. Default: 16 (λ = 1 is plain AdamW).
        (and AdamW's keys: lr — the A learning rate —, weight_decay, betas, eps, the schedule.)
    """

    ratio: float = 16.0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("optimizer.ratio", self.ratio, 0, low_inclusive=False)

    def param_groups(self, named_params: list[tuple[str, nn.Parameter]]) -> list[dict]:
        """One AdamW group per distinct learning rate, the ``lr`` group first (its lr is the one
        logged); every group carries ``weight_decay``. AdamWConfig.build uses these groups.

        Raises:
            ConfigError: no trainable tensor is a LoRA B factor (an adapter without B·A factors).
        """
        layers = factor_layer_paths(named_params)
        if not layers:
            raise no_factor_error(named_params, "loraplus")
        groups: dict[float, list[nn.Parameter]] = {self.lr: []}
        for name, param in named_params:
            groups.setdefault(loraplus_lr(name, param, layers, self.lr, self.ratio), []).append(param)
        return [{"params": params, "lr": lr, "weight_decay": self.weight_decay}
                for lr, params in groups.items() if params]
