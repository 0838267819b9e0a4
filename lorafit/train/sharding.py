"""``hardware=fsdp``: the model sharded across processes with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Each decoder layer (the classes a model lists in ``_no_split_modules``: ``LlamaDecoderLayer``,
``BertLayer`` …) becomes one FSDP unit, then the whole model: every process keeps 1/N of every
weight, frozen base and adapter alike, and gathers a layer's full weights only while that layer runs
forward or backward (reduce-scattering its gradients after). lorafit applies ``fully_shard`` itself,
on CPU (gloo) and GPU (nccl) alike — accelerate switches to FSDP only for multi-GPU setups and
would fall back to DDP on CPU processes — and lets accelerate keep the launch, autocast and process
bookkeeping. Adapter layers need nothing special: inside a unit's forward their tensors are whole.

What lives outside a forward is gathered explicitly (every process takes part, each call is a
collective): the adapter for saving (:func:`full_tensors`, written by the main process in the
single-process format), the optimizer state as plain tensors keyed by parameter name
(:func:`optimizer_state`), and their loading back (:func:`load_adapter`, :func:`load_optimizer`).
Callbacks that read or edit whole weights between steps (rank schedules, LoRA-GA's gradients, the
trust-region and refactoring step rules) and an int8 base are refused at start (:func:`check`).

A 4-bit base (QLoRA: ``model.quantization=nf4|fp4``) is sharded as bitsandbytes stores it: FSDP2
shards each parameter on its own along dim 0, whatever its dtype, so the packed ``uint8`` column of
a ``Params4bit`` (``n/2 × 1``) splits like any weight, and a unit's parameters of different dtypes
are all-gathered together as bytes. (FSDP1 flattened a unit into one tensor of one dtype, hence
bitsandbytes' ``quant_storage=bfloat16`` for it; FSDP2 needs no float storage, and a mixed-precision
``param_dtype`` never casts an integer parameter.) What the gathered weight lacks is its
``quant_state`` (the block scales, about 3 % of the packed weight, kept whole by every process):
``Linear4bit.forward`` then takes the layer's own, which :func:`shard` sets from the weight first.
RL samples with ``generate(synced_gpus=True)``: a process whose completions ended keeps running
forwards until every process has finished.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lorafit.config import ConfigError

OPTIONS = dict(full_state_dict=True, cpu_offload=False)


def check(cfg: Any, callbacks: list) -> None:
    """Refuse what does not run sharded, naming it and the alternative.

    Raises:
        ConfigError: a method callback, an int8 base, or one process.
    """
    import torch.distributed as dist

    problems = []
    whole = [cb for cb in callbacks if not cb.works_sharded]
    if whole:
        names = ", ".join(sorted({type(cb).__name__ for cb in whole}))
        problems.append(f"{names} read or change whole weights between steps, and FSDP holds them in shards "
                        f"(plain LoRA, rsLoRA, DoRA, Bone, Bat, Spectral-A/R, LoRA+ and the SVD inits run sharded)")
    if cfg.model.quantization == "int8":
        problems.append("model.quantization=int8: bitsandbytes' Linear8bitLt reads its scales from attributes of "
                        "the weight (CB, SCB) and swaps the weight's data in its forward, so a gathered FSDP shard "
                        "(a plain tensor) has neither (model.quantization=nf4 or fp4 run sharded)")
    if not dist.is_initialized() or dist.get_world_size() < 2:
        problems.append("it runs in one process: start several (hardware.num_processes=N, or torchrun)")
    if problems:
        raise ConfigError(f"hardware=fsdp cannot run this: {'; '.join(problems)}. Use hardware=ddp (every process "
                          f"holds the whole model) or change the setting named.")


def shard(model: nn.Module, device: torch.device) -> str:
    """``fully_shard`` every decoder layer, then the model, on a 1-D mesh of all processes (in place);
    returns a line saying how much of the model this process holds.

    Parameters are replaced by sharded ones (DTensors): lorafit's ``lorafit_*`` attributes on them
    (roles, learning rates) are carried over, so step rules and param groups see them.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lorafit.quant import is_quantized

    marks = {name: {k: v for k, v in vars(p).items() if k.startswith("lorafit_")}
             for name, p in model.named_parameters()}
    for module in model.modules():
        if is_quantized(module):   # 4-bit (int8 is refused): its forward reads this when the gathered weight
            module.quant_state = module.weight.quant_state    # has none; an init may have re-quantised W0
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = set(getattr(model, "_no_split_modules", None) or [])
    units = [module for module in model.modules() if type(module).__name__ in names]
    classes = ", ".join(sorted({type(module).__name__ for module in units}))
    for module in units:                # fully_shard renames each class (FSDPLlamaDecoderLayer): listed first
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for name, param in model.named_parameters():
        for key, value in marks.get(name, {}).items():
            setattr(param, key, value)
    local = sum(p.to_local().numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    return (f"hardware=fsdp: {len(units)} layers ({classes}) sharded "
            f"across {dist.get_world_size()} processes; this process holds {local:,} of {total:,} values")


def full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with every DTensor gathered into a plain tensor (a collective: all processes call it)."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def load_adapter(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load full (unsharded) adapter tensors into the sharded model: each process keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's state gathered into plain tensors keyed by parameter name (all processes call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(**OPTIONS))


def load_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(**OPTIONS))


def grad_norm(params: list[nn.Parameter], max_norm: float) -> float:
    """Clip the sharded gradients to ``max_norm`` (global norm, a collective) and return the norm."""
    from torch.distributed.tensor import DTensor

    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(total.full_tensor() if isinstance(total, DTensor) else total)
