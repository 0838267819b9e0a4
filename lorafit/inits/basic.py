"""The two data-free initialisations of LoRA's factors (methods.md, "Initialisations").

- ``kaiming`` (default): A ~ Kaiming-uniform(a=√5), B = 0 — the LoRA paper's and PEFT's choice.
- ``gaussian``: A ~ N(0, 1/r), B = 0.

Both leave ΔW = 0, so the adapted model equals the base model right after attaching.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


def _lora_factors(name: str, layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    from lorafit.adapters.lora import LoRALinear  # LoRA and its extensions (rsLoRA, DoRA, RoSA, LoRA-Dash)

    if not isinstance(layer, LoRALinear):
        raise ValueError(f"init needs LoRA factors (lora_A, lora_B) but {name} is a {type(layer).__name__}; "
                         f"use the adapter's own default init (init=kaiming) with this adapter.")
    return layer.lora_A, layer.lora_B


@dataclass
class KaimingInit:
    """``init=kaiming``: each adapter's own default start (for LoRA: A Kaiming-uniform, B = 0)."""

    def apply(self, layers: dict[str, nn.Module]) -> None:
        """Nothing to do: every adapter layer is created in its default (Kaiming) state."""


@dataclass
class GaussianInit:
    """``init=gaussian``: A ~ N(0, 1/r), B = 0."""

    @torch.no_grad()
    def apply(self, layers: dict[str, nn.Module]) -> None:
        for name, layer in layers.items():
            lora_A, lora_B = _lora_factors(name, layer)
            nn.init.normal_(lora_A, std=1.0 / math.sqrt(lora_A.shape[0]))
            lora_B.zero_()
