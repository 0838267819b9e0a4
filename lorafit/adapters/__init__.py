"""Attach adapters to a model, save and load them, switch them off, fold them in.

The seam every method plugs into. An *adapter layer* wraps one ``nn.Linear`` (kept as
``self.base``, frozen) and owns its maths. It provides:

- ``forward(x)``: the adapted output (the original base output while ``disabled`` is set);
- ``merged_weight()``: the folded weight ``W'`` the plain model should carry after a merge;
- ``merge()`` / ``unmerge()``: write ``W'`` into ``base.weight`` and back, guarded by ``merged``;
- ``disabled``: a flag (the RL anchor and "eval without the adapter" need it).

For export (:mod:`lorafit.export`) an :class:`AdditiveAdapter` also says how its update is written
in PEFT's format: ``low_rank_update()`` — exact factors ``(B, A)`` with ``ΔW = B A`` relative to the
original base, or None — and ``peft_form()``, PEFT's own tensors where PEFT has the method (DoRA,
MiSS); ``original_weight()`` is the unadapted W0 an approximation subtracts.

Convention: everything registered on an adapter layer except ``base.*`` is adapter state.
Saving, loading and merging rely on it, so no code outside the method's own file ever asks
which method it is.

Each layer declares the *role* of its trainable tensors with a ``lorafit_role`` attribute (one of
:data:`ROLES`; untagged tensors are "other"), so step rules that treat factors differently (LoRA+,
RefLoRA) never ask which method they face.

Every method's config dataclass is its factory: ``cfg.wrap(linear) -> layer`` builds one layer,
``cfg.check(name, linear) -> str | None`` says why a layer does not fit (before anything runs),
and an optional ``cfg.callbacks()`` returns trainer callbacks (schedules of rank and structure).
"""

from __future__ import annotations

import contextlib
import re
from typing import Any, Iterator, Optional, Protocol, runtime_checkable

import torch
from torch import nn

from lorafit.config import ConfigError
from lorafit.quant import dense_weight, is_quantized

ROLES = {
    "A": "the input-side factor of a product s·B·A (LoRA's A: fan-in = the layer's width)",
    "B": "the output-side factor of s·B·A (LoRA's B: fan-in = the rank)",
    "vector": "a 1-D output-side tensor of a layer built on s·B·A (DoRA's magnitude, LoRA-Dash's d, its bias)",
    "delta": "entries of ΔW itself (RoSA's sparse values)",
}
"""The roles an adapter may declare for a trainable tensor (``param.lorafit_role``)."""


@runtime_checkable
class AdapterLayer(Protocol):
    base: nn.Linear
    merged: bool
    disabled: bool

    def merged_weight(self) -> torch.Tensor: ...

    def merge(self) -> None: ...

    def unmerge(self) -> None: ...


class AdditiveAdapter(nn.Module):
    """Base of the adapter layers whose fold is ``W' = W0 + ΔW``: subclasses give ``delta_weight()``
    (fp32, out×in) and inherit ``merged_weight``, ``merge`` and ``unmerge`` (unmerge subtracts ΔW)."""

    base: nn.Linear
    merged: bool = False
    disabled: bool = False

    def delta_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        return dense_weight(self.base) + self.delta_weight()

    def original_weight(self) -> torch.Tensor:
        """The unadapted W0 (fp32) the update is relative to."""
        return dense_weight(self.base)

    def low_rank_update(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(B, A)`` with ``merged_weight() − original_weight() = B A`` exactly (fp32, any scale folded
        into B); None when ΔW has no exact low-rank form."""
        return None

    def why_not_low_rank(self) -> str:
        """Why :meth:`low_rank_update` is None (for the export's message)."""
        return "its ΔW has no exact low-rank form"

    def peft_form(self) -> Optional[tuple[str, dict[str, torch.Tensor]]]:
        """The layer in PEFT's format: (kind, tensors by PEFT key suffix); by default the exact low-rank
        update as a LoRA (``lora_A.weight``, ``lora_B.weight``; PEFT's scale 1), None if there is none."""
        factors = self.low_rank_update()
        if factors is None:
            return None
        B, A = factors
        return "lora", {"lora_A.weight": A, "lora_B.weight": B}

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            refuse_quantized(self.base, "merge")
            self.base.weight.data = self.merged_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight.data = (self.base.weight.float() - self.delta_weight()).to(self.base.weight.dtype)
            self.merged = False


def refuse_quantized(base: nn.Module, what: str) -> None:
    """Folding ΔW into a quantised weight would quantise the update away: merge onto the full-precision base."""
    if is_quantized(base):
        raise ConfigError(f"Cannot {what} an adapter into a quantised base weight: the update would be rounded to "
                          f"the 4/8-bit grid. Merge onto the original full-precision base (what `lorafit merge` does "
                          f"for a QLoRA run).")


def find_targets(model: nn.Module, patterns: list[str], exclude: list[str] = ()) -> list[str]:
    """Names of the ``nn.Linear`` modules matched by ``patterns``, outside the ``exclude`` heads.

    A pattern matches a module if it equals the last part of its name (``query``), or if it
    fully matches the whole dotted name as a regular expression (``.*layer\\.[0-5]\\..*query``).
    ``all-linear`` matches every linear layer of the backbone.
    """
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or isinstance(module, AdapterLayer):
            continue
        if any(name == head or name.startswith(head + ".") for head in exclude):
            continue
        last = name.rsplit(".", 1)[-1]
        if any(p == "all-linear" or p == last or re.fullmatch(p, name) for p in patterns):
            names.append(name)
    return names


def attach(model: nn.Module, cfg: Any, targets: list[str]) -> dict[str, nn.Module]:
    """Freeze ``model`` and replace each named linear layer by ``cfg.wrap(layer)`` in place.

    Every target is checked first (``cfg.check``) so that a layer the method cannot adapt fails
    at start, with all offending layers named, not halfway through training.
    """
    problems = [msg for name in targets if (msg := cfg.check(name, model.get_submodule(name)))]
    if problems:
        distinct = list(dict.fromkeys(problems))   # a reason that holds for every layer is said once
        raise ConfigError(f"The adapter {type(cfg).__name__} does not fit {len(problems)} target layer(s): "
                          + "; ".join(distinct[:5]) + ("; ..." if len(distinct) > 5 else "")
                          + ". Change the adapter's options or narrow adapter.target_modules.")
    for param in model.parameters():
        param.requires_grad_(False)
    layers = {}
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layers[name] = cfg.wrap(getattr(parent, child))
        setattr(parent, child, layers[name])
    return layers


def adapter_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if isinstance(m, AdapterLayer)}


def adapter_state_dict(model: nn.Module, extra_modules: list[str] = ()) -> dict[str, torch.Tensor]:
    """Adapter state of every layer (all but ``base.*``) plus the full state of ``extra_modules``."""
    state = {}
    for name, layer in adapter_layers(model).items():
        for key, value in layer.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = value.detach().clone()
    for name in extra_modules:
        for key, value in model.get_submodule(name).state_dict().items():
            state[f"{name}.{key}"] = value.detach().clone()
    return state


def load_adapter_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load what :func:`adapter_state_dict` produced; every key must land, every adapter key must come.

    Each layer loads its own part through ``nn.Module``'s load hooks, so a layer whose state needs
    work before its tensors land does it itself (LoRA's rebase onto the original base when the file
    holds an init's factors).
    """
    unknown = model.load_state_dict(state, strict=False).unexpected_keys
    if unknown:
        raise ConfigError(f"The adapter file holds {len(unknown)} tensors this model has no place for "
                          f"(first: {unknown[0]}). It was trained with another adapter config or base model.")
    missing = [k for k in adapter_state_dict(model) if k not in state]
    if missing:
        raise ConfigError(f"The adapter file lacks {len(missing)} adapter tensors (first: {missing[0]}).")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model: every adapter layer returns its base output inside this block."""
    layers = list(adapter_layers(model).values())
    if any(layer.merged for layer in layers):
        raise RuntimeError("Cannot disable adapters that are merged into the base weights; unmerge first.")
    previous = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield
    finally:
        for layer, was in zip(layers, previous):
            layer.disabled = was


@torch.no_grad()
def fold_into_base(model: nn.Module) -> nn.Module:
    """Replace every adapter layer by a plain ``nn.Linear`` carrying its merged weight (in place)."""
    for name, layer in adapter_layers(model).items():
        base = layer.base
        refuse_quantized(base, "fold")
        base.weight.data.copy_(layer.merged_weight().to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    return model
