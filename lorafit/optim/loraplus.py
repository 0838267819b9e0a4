"""LoRA+ (Hayou, Ghosh, Yu, 2024, arXiv 2402.12354): the B factor learns λ times faster than A.

    η_A = lr,    η_B = λ · lr,    λ = ``ratio`` (default 16 = 2⁴, the paper's suggested value)

In the paper's infinite-width analysis a shared learning rate for A (r × in) and B (out × r)
cannot make both factors learn features efficiently: A's fan-in grows with the width n while B's
is the fixed rank r, so with Adam η_A = Θ(1/n) and η_B = Θ(1). LoRA+ (AdamW with η_B = λ η_A)
fixes that with one extra number.

Parameter groups as the authors' code and PEFT's ``create_loraplus_optimizer`` make them, from the
role each adapter layer declares for its tensors (``param.lorafit_role``, :data:`lorafit.adapters.ROLES`;
no list of methods here — see :func:`loraplus_lr`):

- role ``B`` (LoRA's B) and every other 1-D tensor (DoRA's magnitude, LoRA-Dash's d, a trained
  bias, a head's bias): λ · lr — a vector acts on the output side like B, with no wide fan-in;
- role ``A``, every other matrix (a task head's weight; the tensors of adapters without B·A
  factors) and role ``delta`` (RoSA's sparse values, entries of ΔW itself, wide like A: lorafit's
  choice, the authors have no RoSA): lr;
- a tensor carrying ``lorafit_lr`` (RoSA's ``sparse_lr``) keeps that learning rate.

Weight decay, as there too: ``weight_decay`` on every tensor but biases and normalisation weights
(:func:`decayed`; DoRA's magnitude is decayed). With ``weight_decay=0`` (the default),
``optimizer=loraplus optimizer.ratio=1`` is exactly ``optimizer=adamw``. The schedule multiplies
every group's learning rate by the same factor. lorafit puts no LoRA on embeddings, so there is
no separate embedding group (PEFT gives LoRA embeddings their own lr, 1e-6 by default).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional

from torch import nn

from lorafit.config import ConfigError, check_range, option_names, option_schema
from lorafit.optim.basic import AdamWConfig

OUTPUT_SIDE = ("B", "vector")
"""The roles LoRA+ gives λ · lr."""


def factor_layer_paths(named_params: list[tuple[str, nn.Parameter]]) -> set[str]:
    """Module paths of the layers that declare a LoRA B factor (``lorafit_role == "B"``)."""
    return {name.rpartition(".")[0] for name, p in named_params if getattr(p, "lorafit_role", None) == "B"}


def loraplus_lr(param: nn.Parameter, lr: float, ratio: float) -> float:
    """The learning rate LoRA+ gives one tensor (see the module docstring for the rule)."""
    own: Optional[float] = getattr(param, "lorafit_lr", None)
    if own is not None:
        return own
    role = getattr(param, "lorafit_role", None)
    return ratio * lr if role in OUTPUT_SIDE or (param.ndim == 1 and role != "delta") else lr


def decayed(name: str) -> bool:
    """Whether LoRA+ decays a tensor: not biases, not normalisation weights (``*norm*`` modules)."""
    module = name.rpartition(".")[0].rpartition(".")[2].lower()
    return not (name.endswith("bias") or "norm" in module)


def no_factor_error(named_params: list[tuple[str, nn.Parameter]], rule: str) -> ConfigError:
    """One paragraph: which tensors the run trains, and what ``rule`` needs."""
    kinds = Counter(n.rpartition(".")[2] for n, _ in named_params)
    found = ", ".join(f"{k} ×{c}" for k, c in kinds.most_common(6)) or "none"
    names = option_names("adapter")
    with_factors = [o for o in names if "B" in getattr(option_schema("adapter", o), "roles", ())]
    with_factors.sort(key=lambda o: (o != "lora", o))   # the plain one first, as the example
    others = [o for o in names if o not in with_factors]
    return ConfigError(
        f"optimizer={rule} works on LoRA-factor layers (ΔW = s·B A), which adapter={', '.join(with_factors)} declare, "
        f"but the adapter in use has none: its {len(named_params)} trainable tensors are {found}. The adapters "
        f"{', '.join(others)} are not supported. Pick a LoRA-factor adapter, or keep this adapter with "
        f"optimizer=adamw.")


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
        """One AdamW group per distinct (learning rate, decayed or not), the decayed ``lr`` group first
        (its lr is the one logged). AdamWConfig.build uses these groups.

        Raises:
            ConfigError: no trainable tensor is a LoRA B factor (an adapter without B·A factors).
        """
        if not factor_layer_paths(named_params):
            raise no_factor_error(named_params, "loraplus")
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {(self.lr, True): []}
        for name, param in named_params:
            groups.setdefault((loraplus_lr(param, self.lr, self.ratio), decayed(name)), []).append(param)
        return [{"params": params, "lr": lr, "weight_decay": self.weight_decay if decay else 0.0}
                for (lr, decay), params in groups.items() if params]
