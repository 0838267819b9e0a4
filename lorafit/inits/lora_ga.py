"""LoRA-GA: low-rank adaptation with gradient approximation (Wang et al., 2024, arXiv 2407.05000).

The init makes LoRA's first step follow full fine-tuning's: with ``G`` the gradient of the loss
with respect to W0 (averaged over ``init.batches`` batches of ``init.batch_size`` training
examples), ``U, S, V = svd_lowrank(G, q = min(4r, out, in), niter = 4)`` and, as in the authors'
official code (direction "ArB2r", scale "stable", γ = 16):

    A0 = Vᵀ[:r] · out^{1/4}/√γ,    B0 = U[:, r:2r] · out^{1/4}/√γ,    W0 ← W0 − s·B0 A0

After one plain-SGD step of size η the weight moves by ``−η s² c² (G V_r V_rᵀ + U_{r:2r} U_{r:2r}ᵀ G)
= −η s² c² · G_{2r}``, the rank-2r truncated SVD of G (c = out^{1/4}/√γ): the paper's eq. 7.

It needs data, so it runs as a callback at train start (:class:`GradientInit`), after a resume
check (a resumed run has its factors in the checkpoint already). Gradients are gathered layer by
layer: only the target weights require grad, and a hook on each of them adds the finished
gradient to an fp32 running sum kept off the device (on the CPU) and frees it at once, so the
device never holds more than about one layer of full gradients. The gradient pass runs the model
in eval mode (no dropout: the estimate is deterministic; our choice). Batches are the first
``batches × batch_size`` examples of a permutation seeded by the run's seed, shared across
processes and summed with an all-reduce. With ``init.cache=FILE`` the resulting factors are
written to FILE and reused by any later run with the same base, targets, adapter, data and init
settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Optional, Union

import torch
from rich.progress import Progress
from torch import nn

from lorafit.console import console
from lorafit.adapters import adapter_layers
from lorafit.adapters.lora import LoRALinear
from lorafit.config import ConfigError, as_dict, check_range, to_yaml
from lorafit.data.batches import collate, count_loss_units
from lorafit.task import forward_logits, head_loss
from lorafit.files import load_state
from lorafit.quant import WeightGradients, is_quantized
from lorafit.inits.basic import _lora_factors
from lorafit.callbacks import Callback



@dataclass
class LoRAGAInit:
    """``init=lora_ga``.

    Attributes:
        batches: batches whose gradients are averaged. Default: 64.
        batch_size: examples per batch. Default: 2.
        gamma: the "stable" scale's γ; factors are multiplied by out^{1/4}/√γ. Default: 16.
        cache: a file for the computed factors; reused when it matches this run. Default: null.
        gradient_memory: GiB the running gradient sums may take (fp32, one out×in matrix per target).
            0 (the default): every target in one pass over the init batches. Otherwise the targets are
            split into groups whose sums fit, one pass each: the same factors (the model's function does
            not change during the init, so each layer's gradient is the same), memory ÷ groups, time ×
            groups. ``auto``: the largest target's fp32 size, the least memory grouping can reach (a
            group never holds less than one layer) in the fewest passes that reach it — at the 1.1B
            shape 88 passes instead of 1, its peak below a training step's (docs/benchmarks.md). Not
            the default: the time grows with the passes. On a GPU the sums live in host memory either way.
    """

    rewrites_base: ClassVar[bool] = True      # W0 ← W0 − s·B0 A0 (LoRALinear.rebase)

    batches: int = 64
    batch_size: int = 2
    gamma: float = 16.0
    cache: Optional[str] = None
    gradient_memory: Union[int, float, str] = 0.0     # int: OmegaConf does not widen 1 to float in a Union

    def __post_init__(self) -> None:
        check_range("init.batches", self.batches, 1)
        check_range("init.batch_size", self.batch_size, 1)
        check_range("init.gamma", self.gamma, 0, low_inclusive=False)
        if isinstance(self.gradient_memory, str):
            if self.gradient_memory != "auto":
                raise ConfigError(f"Bad value for 'init.gradient_memory': {self.gradient_memory!r}. It must be a "
                                  f"number of GiB (0 = all targets in one pass) or auto (groups of at most the "
                                  f"largest target's fp32 size), e.g. init.gradient_memory=auto.")
        else:
            check_range("init.gradient_memory", self.gradient_memory, 0)

    def apply(self, layers: dict[str, nn.Module]) -> None:
        """Check the layers now (a clear error before any data is read); the work is a callback."""
        for name, layer in layers.items():
            _lora_factors(name, layer)
            if 2 * layer.r > min(layer.base.in_features, layer.base.out_features):
                raise ValueError(f"init=lora_ga needs 2r ≤ min(in, out), but {name} is "
                                 f"{layer.base.out_features}×{layer.base.in_features} with r={layer.r}. Lower adapter.r.")

    def callbacks(self) -> list[Callback]:
        return [GradientInit(self)]


def lora_ga_factors(grad: torch.Tensor, r: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) from the averaged gradient ``grad`` (out×in, fp32): direction ArB2r, scale stable."""
    out_features = grad.shape[0]
    U, _, V = torch.svd_lowrank(grad, q=min(4 * r, *grad.shape), niter=4)
    scale = out_features ** 0.25 / gamma ** 0.5
    return V[:, :r].T * scale, U[:, r:2 * r] * scale


def gradient_sums(model: nn.Module, layers: dict[str, LoRALinear], batches: Iterable[dict[str, torch.Tensor]],
                  loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor], total: Optional[int] = None,
                  show: bool = True) -> dict[str, torch.Tensor]:
    """Σ over ``batches`` of ∂loss/∂W0 for every layer's base weight, in fp32 on the CPU.

    Only the target weights require grad while it runs; a hook adds each finished weight gradient
    to its sum and frees it, so at most about one layer of full gradients is alive at a time.
    The model runs in eval mode; requires_grad flags and the mode are restored afterwards.
    """
    if any(is_quantized(layer.base) for layer in layers.values()):
        return _quantized_gradient_sums(model, layers, batches, loss_of, total, show)
    sums = {n: torch.zeros(l.base.weight.shape, dtype=torch.float32) for n, l in layers.items()}  # off the device
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)

    def offload(name: str):
        def hook(weight: torch.Tensor) -> None:
            sums[name] += weight.grad.float().cpu()
            weight.grad = None       # free this layer's gradient before the next one is formed
        return hook

    handles = []
    for name, layer in layers.items():
        layer.base.weight.requires_grad_(True)
        handles.append(layer.base.weight.register_post_accumulate_grad_hook(offload(name)))
    was_training = model.training
    model.eval()
    try:
        backward_over(batches, loss_of, total, show)
    finally:
        for handle in handles:
            handle.remove()
        for layer in layers.values():
            layer.base.weight.requires_grad_(False)
            layer.base.weight.grad = None
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return sums


def backward_over(batches: Iterable[dict[str, torch.Tensor]], loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
                  total: Optional[int], show: bool) -> None:
    """One backward pass per batch, with a progress bar (the hooks set up by the caller collect)."""
    with Progress(console=console, transient=True, disable=not show) as progress:
        task = progress.add_task("LoRA-GA gradients", total=total)
        for batch in batches:
            loss_of(batch).backward()
            progress.advance(task)


def _quantized_gradient_sums(model: nn.Module, layers: dict[str, LoRALinear], batches: Iterable[dict[str, torch.Tensor]],
                             loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor], total: Optional[int],
                             show: bool) -> dict[str, torch.Tensor]:
    """:func:`gradient_sums` on a quantised base, whose weights have no gradient: ``Σ g xᵀ`` from hooks
    (:class:`lorafit.quant.WeightGradients`), with the adapters' own gradients discarded."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    was_training = model.training
    model.eval()
    try:
        with WeightGradients(layers) as collected:
            backward_over(batches, loss_of, total, show)
    finally:
        for p in trainable:
            p.requires_grad_(True)
        model.train(was_training)
    return {name: collected.sums[name] for name in layers}


class GradientInit(Callback):
    """Estimate each target's mean gradient at train start, then rebase every layer on LoRA-GA's factors."""

    def __init__(self, cfg: LoRAGAInit) -> None:
        self.cfg = cfg

    def on_train_start(self, trainer: Any) -> None:
        model = trainer.unwrapped()
        layers = {n: m for n, m in adapter_layers(model).items() if isinstance(m, LoRALinear)}
        if trainer.step > 0 or any(layer.rebased for layer in layers.values()):
            return  # resumed: the factors came back with the checkpoint
        key = self.cache_key(trainer)
        factors = self.read_cache(key)
        if factors is None:
            factors = {}
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(trainer.cfg.seed)  # the randomised SVD: the same on every process
                for group in self.groups(layers):     # (no randomness in the gradient passes: eval mode)
                    grads = self.mean_gradients(trainer, model, group)
                    for name in list(grads):          # each full gradient is dropped once factored
                        grad = grads.pop(name).to(layers[name].lora_A.device)
                        factors[name] = lora_ga_factors(grad, layers[name].r, self.cfg.gamma)
            if self.cfg.cache and trainer.accelerator.is_main_process:
                self.write_cache(key, factors)
        for name, layer in layers.items():
            A0, B0 = factors[name]
            layer.rebase(A0.to(layer.lora_A.device), B0.to(layer.lora_B.device))

    def groups(self, layers: dict[str, LoRALinear]) -> list[dict[str, LoRALinear]]:
        """Consecutive groups of targets whose fp32 gradient sums fit ``gradient_memory`` (one group if 0;
        ``auto``: the largest target's size). A target larger than the budget is a group by itself."""
        sizes = {name: layer.base.out_features * layer.base.in_features * 4 for name, layer in layers.items()}
        auto = self.cfg.gradient_memory == "auto"
        budget = max(sizes.values(), default=0) if auto else self.cfg.gradient_memory * 2 ** 30
        if budget <= 0:
            return [layers]
        groups: list[dict[str, LoRALinear]] = [{}]
        used = 0
        for name, layer in layers.items():
            size = sizes[name]
            if groups[-1] and used + size > budget:
                groups.append({})
                used = 0
            groups[-1][name] = layer
            used += size
        return groups

    def mean_gradients(self, trainer: Any, model: nn.Module, layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
        """This process's share of the init batches, through :func:`mean_gradients`, summed over processes."""
        cfg, acc = self.cfg, trainer.accelerator
        gen = torch.Generator().manual_seed(trainer.cfg.seed)
        order = torch.randperm(len(trainer.train_set), generator=gen)
        wanted = cfg.batches * cfg.batch_size
        order = order.repeat(-(-wanted // len(order)))[:wanted].tolist()
        mine = range(acc.process_index, cfg.batches, acc.num_processes)

        def loss_of(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            with acc.autocast():
                logits = forward_logits(model, batch)
                return head_loss(logits, batch["labels"], trainer.head) / max(count_loss_units(batch), 1)

        batches = ({k: v.to(acc.device) for k, v in collate(list(trainer.train_set.select(
                    order[b * cfg.batch_size:(b + 1) * cfg.batch_size])), trainer.pad_id).items()} for b in mine)
        sums = gradient_sums(model, layers, batches, loss_of, total=len(mine), show=acc.is_main_process)
        for name in sums:           # one sum at a time, in place: never a second copy of all of them
            if acc.num_processes > 1:
                sums[name] = acc.reduce(sums[name].to(acc.device), "sum").cpu()
            sums[name].div_(cfg.batches)
        return sums

    # ------------------------------------------------------------------- cache
    def cache_key(self, trainer: Any) -> dict:
        meta = trainer.assembled.meta
        init = {k: v for k, v in as_dict(self.cfg).items() if k not in ("cache", "gradient_memory")}
        return {"base_fingerprint": meta["base_fingerprint"], "targets": meta["targets"],
                "adapter": meta["adapter"], "init": init, "seed": trainer.cfg.seed,
                "data": to_yaml(trainer.cfg.data)}

    def read_cache(self, key: dict) -> Optional[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        if not self.cfg.cache or not Path(self.cfg.cache).is_file():
            return None
        saved = load_state(Path(self.cfg.cache), "LoRA-GA cache (init.cache)")
        if saved.get("key") != key:
            console.print(f"[yellow]init.cache={self.cfg.cache} was computed for another base, adapter, data or "
                          f"init setting; computing LoRA-GA again and overwriting it[/]")
            return None
        console.print(f"LoRA-GA factors reused from {self.cfg.cache}")
        return saved["factors"]

    def write_cache(self, key: dict, factors: dict) -> None:
        path = Path(self.cfg.cache)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"key": key, "factors": {n: (a.cpu(), b.cpu()) for n, (a, b) in factors.items()}}, tmp)
        os.replace(tmp, path)
