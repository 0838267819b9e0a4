"""``lorafit estimate <train overrides>``: the peak memory of a training run, predicted before it runs.

Nothing is loaded: the model is built on PyTorch's ``meta`` device from its ``config.json`` (or
``model.build``), the adapter attached, and one forward pass and the loss run on meta tensors of
the micro-batch's shape (``data.batch_size`` / processes / ``hardware.grad_accum_steps`` sequences
of ``data.max_length`` tokens: the longest a padded batch can be), while a saved-tensor hook records
every tensor autograd keeps for the backward pass. Per process:

- **weights**: the base as stored — ``model.dtype``, or packed 4-bit (½ byte per weight plus
  double-quantised block scales) / int8 (1 byte plus a row scale) for ``model.quantization``;
- **adapter**: the adapter's tensors (and a trained head);
- **optimizer**: its state (AdamW and the rules built on it: two fp32 moments per trainable value);
- **activations**: what the forward pass keeps for the backward pass (attention as the fused
  kernels keep it: no S×S probabilities). With
  ``hardware.gradient_checkpointing`` only each block's input is kept, plus, during the backward,
  one block's activations recomputed;
- **transients**: alive at the start of the backward pass next to the activations: the loss's
  gradient with respect to the (fp32) logits, the trainable tensors' gradients, and on a quantised
  base one layer's weight dequantised to the compute dtype.

Under ``hardware=fsdp`` with N processes, weights (but a 4-bit base's block scales), adapter,
gradients and optimizer state are 1/N each, and the transients gain two of the largest sharded
layers gathered whole (the running one and the next, prefetched; a 4-bit base weight gathered as its
packed bytes).

``activations + transients`` is the *step peak*: what a training step needs on top of the resident
model and optimizer state, as ``scripts/bench_adapters.py`` / ``scripts/bench_scale.py`` measure it
(peak RSS above the resident set, allocator-exact by the profiler). The interpreter and libraries
(several hundred MB) come on top and are not estimated.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from unittest import mock

import torch
from torch import nn

from lorafit.adapters import attach, find_targets, trainable_parameters
from lorafit.config import ConfigError, TrainConfig
from lorafit.models import (AUTO_CLASSES, DTYPES, default_targets, from_pretrained, head_module_names,
                            load_tokenizer, resolve_dtype)

GiB = 2 ** 30
MiB = 2 ** 20


@dataclass
class MemoryEstimate:
    """Bytes per process."""

    weights: int
    adapter: int
    optimizer: int
    activations: int
    transients: int
    micro_batch: int
    sequence: int
    checkpointing: bool

    @property
    def step_peak(self) -> int:
        return self.activations + self.transients

    @property
    def total(self) -> int:
        return self.weights + self.adapter + self.optimizer + self.step_peak

    def line(self) -> str:
        """One line for the ``lorafit train`` banner."""
        return (f"estimated peak memory per process: {self.total / GiB:.2f} GiB (weights {self.weights / GiB:.2f}, "
                f"adapter + optimizer {(self.adapter + self.optimizer) / GiB:.2f}, step {self.step_peak / GiB:.2f} "
                f"for {self.micro_batch} × {self.sequence} tokens"
                f"{', checkpointed' if self.checkpointing else ''}); `lorafit estimate` explains it")

    def rows(self) -> list[tuple[str, float, str]]:
        """(part, MiB, what) for the ``lorafit estimate`` table."""
        return [(part, value * GiB / MiB, what) for part, value, what in self._rows()]

    def _rows(self) -> list[tuple[str, float, str]]:
        return [("weights", self.weights / GiB, "the base as stored (quantised or in model.dtype)"),
                ("adapter", self.adapter / GiB, "adapter tensors (+ a trained head)"),
                ("optimizer", self.optimizer / GiB, "optimizer state"),
                ("activations", self.activations / GiB,
                 f"kept for the backward pass, {self.micro_batch} × {self.sequence} tokens"
                 + (" (block inputs + one block, checkpointed)" if self.checkpointing else "")),
                ("transients", self.transients / GiB, "gradients, the logits' gradient, a dequantised weight"),
                ("step peak", self.step_peak / GiB, "activations + transients: a step on top of the resident set"),
                ("total", self.total / GiB, "per process, without the interpreter and libraries")]


def _config(cfg: TrainConfig, head: str) -> Any:
    from transformers import AutoConfig

    extra = {} if head in AUTO_CLASSES else {"num_labels": 1 if head in ("regression", "reward")
                                               else cfg.data.num_labels}
    model_cfg = cfg.model
    tokenizer = load_tokenizer(model_cfg)          # small files, no weights: the vocabulary and padding
    if model_cfg.build is not None:
        build = dict(model_cfg.build)
        build.setdefault("vocab_size", len(tokenizer))
        build.setdefault("pad_token_id", tokenizer.pad_token_id)
        return AutoConfig.for_model(build.pop("model_type"), **build, **extra)
    config = from_pretrained(AutoConfig.from_pretrained, model_cfg.name_or_path, "a model config",
                             "Give a local Hugging Face folder or a hub id in model.name_or_path.",
                             trust_remote_code=model_cfg.trust_remote_code, **extra)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def _weight_bytes(model: nn.Module, heads: list[str], quantization: str, dtype: torch.dtype) -> tuple[int, int]:
    """The base as bitsandbytes stores it: every backbone linear weight quantised, the rest in ``dtype``.
    Returns (all its bytes, the 4-bit block scales among them: FSDP does not shard those)."""
    total = scales = 0
    quantised = {f"{n}.weight" for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and not any(n == h or n.startswith(h + ".") for h in heads)}
    for name, param in model.named_parameters():
        if quantization != "none" and name in quantised:
            n = param.numel()
            if quantization == "int8":
                total += n + param.shape[0] * 4                   # int8 values + an fp32 scale per row
            else:                                                 # 4 bits + 8-bit block scales (64) + fp32 per 256 blocks
                scales += n // 64 + (n // 64 // 256 + 1) * 4
                total += n // 2
        else:
            total += param.numel() * dtype.itemsize
    return total + scales, scales


def _gathered_bytes(unit: nn.Module, quantization: str) -> int:
    """One FSDP unit's parameters as they are all-gathered: a 4-bit base weight as its packed bytes
    (n/2; its block scales stay whole in every process and are not gathered), the rest as they are."""
    packed = {id(m.weight) for m in unit.modules() if isinstance(m, nn.Linear)} if quantization in ("nf4", "fp4") else ()
    return sum(p.numel() // 2 if id(p) in packed else p.numel() * p.element_size() for p in unit.parameters())


class _FusedAttention(torch.autograd.Function):
    """Stands in for a fused attention kernel (flash / memory-efficient: what SDPA runs in training on
    CPUs and GPUs) while tracing on meta tensors, where PyTorch would decompose attention into the
    math path and keep the S×S probabilities: keeps what the fused kernels keep — q, k, v, the output
    and one log-sum-exp per query."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty((*q.shape[:-1], v.shape[-1]))
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, v, *_ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _fused_sdpa(query, key, value, *args, **kwargs) -> torch.Tensor:
    return _FusedAttention.apply(query, key, value)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (the longest ModuleList): what gradient checkpointing wraps."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _saved_activations(model: nn.Module, inputs: dict[str, torch.Tensor], head: str) -> tuple[int, list[int], int]:
    """(bytes saved for backward in all, per block, the bytes of each block's input) on meta tensors."""
    from lorafit.task import head_loss

    params = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}
    per_block: list[int] = []
    block_inputs: list[int] = []
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in params and key not in seen:
            seen[key] = t.untyped_storage().nbytes()
            if current:
                per_block[current[-1]] += seen[key]
        return t

    handles = []
    for i, block in enumerate(_blocks(model)):
        per_block.append(0)

        def enter(module, args, kwargs, i=i):
            current.append(i)
            hidden = next(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.is_floating_point())
            block_inputs.append(hidden.numel() * hidden.element_size())

        handles.append(block.register_forward_pre_hook(enter, with_kwargs=True))
        def leave(module, args, output) -> None:
            current.pop()            # (returns None: a forward hook's value would replace the output)

        handles.append(block.register_forward_hook(leave))
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _fused_sdpa):
            logits = model(**inputs).logits
            head_loss(logits, inputs_labels(inputs, logits, head), head)
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen.values()), per_block, max(block_inputs, default=0)


def inputs_labels(inputs: dict[str, torch.Tensor], logits: torch.Tensor, head: str) -> torch.Tensor:
    batch = inputs["input_ids"].shape[0]
    if head == "causal_lm":
        return inputs["input_ids"]
    if head == "regression":
        return torch.zeros(batch, device="meta")
    return torch.zeros(batch, dtype=torch.long, device="meta")


def estimate(cfg: TrainConfig, processes: int = 1) -> MemoryEstimate:
    """The memory estimate of ``cfg`` per process (see the module docstring)."""
    head = cfg.data.head
    config = _config(cfg, head)
    dtype = resolve_dtype(cfg.model, config)
    compute = dtype if cfg.model.compute_dtype == "auto" else DTYPES[cfg.model.compute_dtype]
    auto_cls = AUTO_CLASSES.get(head)
    if auto_cls is None:
        from transformers import AutoModelForSequenceClassification as auto_cls
    # activations follow the unquantised parts' dtype (a quantised layer returns its input's dtype);
    # the quantised weights' storage is counted apart
    with torch.device("meta"):
        model = auto_cls.from_config(config, dtype=dtype)
    heads = head_module_names(model)
    weights, scales = _weight_bytes(model, heads, cfg.model.quantization, dtype)
    targets = find_targets(model, cfg.adapter.target_modules or default_targets(model), exclude=heads)
    if not targets:
        raise ConfigError(f"adapter.target_modules matches no linear layer of this {config.model_type} model.")
    with torch.device("meta"):
        attach(model, cfg.adapter, targets)
    if head != "causal_lm":
        for name in heads:
            model.get_submodule(name).requires_grad_(True)
    trainable = [p for _, p in trainable_parameters(model)]
    adapter = sum(t.numel() * t.element_size() for name, layer in model.named_modules()
                  if name in targets for k, t in layer.state_dict().items() if not k.startswith("base."))
    adapter += sum(p.numel() * p.element_size() for name in heads if head != "causal_lm"
                   for p in model.get_submodule(name).parameters())
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optimizer = cfg.optimizer.state_copies() * sum(p.numel() * 4 for p in trainable)

    micro = max(1, cfg.data.batch_size // (processes * cfg.hardware.grad_accum_steps))
    sequence = cfg.data.max_length
    ids = torch.zeros(micro, sequence, dtype=torch.long, device="meta")
    model.train()
    saved, per_block, block_input = _saved_activations(model, {"input_ids": ids}, head)
    checkpointing = cfg.hardware.gradient_checkpointing
    if checkpointing and per_block:
        activations = saved - sum(per_block) + len(per_block) * block_input + max(per_block)
    else:
        activations = saved
    vocab = getattr(config, "vocab_size", 0) if head == "causal_lm" else 0
    logits_grad = micro * sequence * vocab * 4                  # ∂L/∂logits, fp32
    dequantised = 0
    if cfg.model.quantization != "none":
        biggest = max((m.base.weight.numel() for n, m in model.named_modules() if n in targets), default=0)
        dequantised = biggest * compute.itemsize
    gathered = 0
    if cfg.hardware.sharding == "fsdp" and processes > 1:
        # FSDP2 keeps 1/N of every weight, gradient and optimizer state, and gathers the running layer
        # whole, the next one prefetched: two of the largest sharding units
        adapter, grads, optimizer = (x // processes for x in (adapter, grads, optimizer))
        weights = (weights - scales) // processes + scales      # a 4-bit layer's quant_state stays whole
        units = set(getattr(model, "_no_split_modules", None) or [])
        gathered = 2 * max((_gathered_bytes(m, cfg.model.quantization) for m in model.modules()
                            if type(m).__name__ in units), default=0)
    return MemoryEstimate(weights=weights, adapter=adapter, optimizer=optimizer, activations=activations,
                          transients=logits_grad + grads + dequantised + gathered, micro_batch=micro,
                          sequence=sequence, checkpointing=checkpointing)
