"""``lorafit merge RUN OUT``: fold an adapter into its base and write a plain Hugging Face folder.

Each adapter layer supplies its own folded weight (``merged_weight()``, fp32), so merge has no
method-specific code. The merged model keeps the base's dtype (the run's ``model.dtype``: a bf16
base gives a bf16 folder; ``--dtype`` to choose) and is written in safetensors shards
(``--max-shard-size``, with ``model.safetensors.index.json``). A QLoRA run merges onto its original
full-precision base: the base is loaded unquantised, never a 4-bit copy.

Memory: one copy of the base in its dtype, plus one layer's fp32 weight while it is folded; the
self-check never holds two models at once.

The self-check, before the command reports success (nothing is written if it fails):

1. per layer, in fp32: the adapter layer's own forward on random probe inputs against
   ``x W'ᵀ + b`` with the folded weight ``W'`` (relative ``1e-4``) — the merge formula is exact;
2. whole model, in the base's dtype: the folded model, then the written folder reloaded with plain
   ``transformers`` (after the in-memory model is freed), against the adapted model's logits on
   probe texts, within :func:`logit_tolerance` — the folder is complete and wired right.

The folder is written next to ``OUT`` and swapped in only after the check passes (``lorafit.files``):
an existing ``OUT`` is replaced only if it is an earlier merge output and ``--overwrite`` is given,
and never if it is, or lies inside, the run being merged.
"""

from __future__ import annotations

import gc
import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters import adapter_layers
from lorafit.adapters.io import find_adapter_dir, run_folder
from lorafit.assemble import load_adapted
from lorafit.config import ConfigError
from lorafit.console import console
from lorafit.files import check_free_space, fault_point, new_output, publish


PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A merge you can trust reproduces every logit of the adapted model.",
    "Short one.",
    "Low-rank adapters fold into the base weights exactly.",
]


def probe_inputs(tokenizer) -> dict[str, torch.Tensor]:
    """The probe texts, plus a short conversation in the tokenizer's chat template if it has one (so the
    rows of tokens a chat run added are checked too)."""
    texts = list(PROBE_TEXTS)
    if getattr(tokenizer, "chat_template", None):
        from jinja2 import TemplateError
        try:
            texts.append(tokenizer.apply_chat_template([{"role": "user", "content": "Fold me."}, {"role": "assistant",
                                                        "content": "Folded."}], tokenize=False))
        except TemplateError:    # a template that wants other turns: the plain probes still check the fold
            pass
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def _auto_class(task: str):
    from transformers import AutoModelForSequenceClassification
    from lorafit.models import AUTO_CLASSES
    return AUTO_CLASSES.get(task, AutoModelForSequenceClassification)


def logit_tolerance(dtype: torch.dtype, folded_layers: int, floor: float = 1e-4) -> float:
    """The relative logit tolerance of the whole-model check for a model stored in ``dtype``.

    Folding rounds every entry of W' once to the dtype (relative error at most its unit roundoff
    u = eps/2: 2⁻⁸ for bf16, 2⁻¹¹ for fp16, 2⁻²⁴ for fp32). Independent roundings perturb each layer's
    output by about u of its size, and the perturbations of the folded layers add in quadrature along
    the residual stream, so the logits move by about u·√layers of their scale; the bound allows twice
    that (``floor`` for fp32, where rounding is negligible). A wiring or saving bug — a layer not
    folded, a tensor not written — moves logits by O(1) of their scale and stays far above it; the
    formula itself is checked exactly, per layer in fp32, before.
    """
    unit_roundoff = torch.finfo(dtype).eps / 2
    return max(floor, 2 * unit_roundoff * math.sqrt(max(folded_layers, 1)))


@torch.no_grad()
def fold_checked(model: nn.Module, tolerance: float = 1e-4, tokens: int = 4) -> float:
    """Fold every adapter layer into its base weight in place, one layer at a time, checking each in fp32:
    the layer's own forward on random inputs against ``x W'ᵀ + b`` (an embedding's rows ``W'[ids]``,
    probing the last rows, where added tokens live). Returns the largest relative error.

    Raises:
        ConfigError: a layer whose folded weight does not reproduce its forward (a merge-formula bug).
    """
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for name, layer in adapter_layers(model).items():
        base = layer.base
        bias = getattr(base, "bias", None)
        stored, stored_bias = base.weight.data, None if bias is None else bias.data
        base.weight.data = stored.float()                         # this one layer in fp32, transiently
        if stored_bias is not None:
            base.bias.data = stored_bias.float()
        if isinstance(base, nn.Embedding):
            rows = base.num_embeddings
            x = torch.cat([torch.randint(rows, (tokens,), generator=gen), torch.arange(rows - tokens, rows)])
            x = x.to(stored.device)
            reference = layer(x).float()
            merged = layer.merged_weight().float()
            folded = F.embedding(x, merged)
        else:
            x = torch.randn(tokens, base.in_features, generator=gen).to(stored.device)
            reference = layer(x).float()
            merged = layer.merged_weight().float()
            folded = F.linear(x, merged, None if bias is None else base.bias)
        error = float((folded - reference).abs().max()) / max(1.0, float(reference.abs().max()))
        worst = max(worst, error)
        if error > tolerance:
            raise ConfigError(f"The folded weight of {name} does not reproduce the adapter layer's output (relative "
                              f"error {error:.3g} > {tolerance:g}, in fp32). Nothing was written. This is a bug in the "
                              f"adapter's merge formula; please report it with the run's config.")
        stored.copy_(merged)                                      # in place: the base's own storage, its dtype
        base.weight.data = stored
        if stored_bias is not None:
            base.bias.data = stored_bias
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
        del merged, x
    return worst


@torch.no_grad()
def merge(run_dir: str, out_dir: str, base_model: Optional[str] = None, tolerance: float = 1e-4,
          overwrite: bool = False, dtype: Optional[str] = None, max_shard_size: str = "2GB") -> float:
    """Fold ``run_dir``'s adapter into the base and save a plain HF model folder to ``out_dir``.

    Args:
        dtype: the merged model's dtype (default: the run's ``model.dtype``).
        max_shard_size: the largest safetensors shard (``save_pretrained``'s ``max_shard_size``).

    Returns:
        The max abs difference between the reloaded merged model's logits and the adapted model's.

    Raises:
        ConfigError: no adapter in ``run_dir``, a base model that differs from the training base,
            a merged model that fails the self-check, or an output folder it may not write
            (``claim_output``).
    """
    adapter_dir = find_adapter_dir(run_dir)
    if adapter_dir is None:
        raise ConfigError(f"No adapter found in '{run_dir}' (looked for lorafit_adapter.json or a PEFT "
                          f"adapter_config.json there and in {run_dir}/adapter). Give a finished training run, its "
                          f"adapter/, a checkpoint or a PEFT adapter folder.")
    out = Path(out_dir)
    with new_output(out, "merge", overwrite, "--overwrite", protected=[adapter_dir, run_folder(adapter_dir)]) as tmp:
        assembled = load_adapted(adapter_dir, base_model, quantization="none", dtype=dtype)
        return _merge_into(assembled, adapter_dir, tmp, out, tolerance, max_shard_size)


def _merge_into(assembled, adapter_dir: Path, tmp: Path, out: Path, tolerance: float, max_shard_size: str) -> float:
    """Fold (checked per layer), write into ``tmp``, check the whole model, publish ``tmp`` as ``out``."""
    model, tokenizer, task = assembled.model.eval(), assembled.tokenizer, assembled.meta["task"]
    n_layers = len(assembled.layers)
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    inputs = probe_inputs(tokenizer)
    if task == "multiple_choice":  # one question whose four choices are the probe texts
        inputs = {k: v[None] for k, v in inputs.items()}
    adapted = model(**inputs).logits.float()
    layer_error = fold_checked(model, tolerance)
    folded = model(**inputs).logits.float()
    bound = logit_tolerance(dtype, n_layers, tolerance) * max(1.0, float(adapted.abs().max()))
    diff_memory = float((folded - adapted).abs().max())

    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_free_space(out.parent, size, "the merged model")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(tmp)
    del model, assembled.model
    assembled.layers.clear()                     # the adapter layers still referenced the folded weights
    gc.collect()                                 # the written folder is reloaded into the freed memory
    reloaded = _auto_class(task).from_pretrained(tmp, dtype=dtype).eval()
    plain = reloaded(**inputs).logits.float()
    del reloaded
    diff_plain = float((plain - adapted).abs().max())
    if max(diff_plain, diff_memory) > bound:
        raise ConfigError(f"The merged model does not reproduce the adapted model: max abs logit difference "
                          f"{diff_plain:.3g} (in memory {diff_memory:.3g}) exceeds {bound:.3g} ({dtype}). Nothing was "
                          f"written. This is a bug in lorafit's merge; please report it with the run's config.")
    record = {"source": str(Path(adapter_dir).resolve()), "base_model": assembled.meta["base_model"],
              "base_fingerprint": assembled.meta["base_fingerprint"], "adapter": assembled.meta["adapter"],
              "dtype": str(dtype).removeprefix("torch."), "max_rel_error_per_layer_fp32": layer_error,
              "max_abs_diff_in_memory": diff_memory, "max_abs_diff_reloaded": diff_plain, "tolerance": bound}
    fault_point("merge:written")
    publish(tmp, out, "merge", record)
    console.print(f"merged {n_layers} layers → {out} (plain transformers folder, "
                  f"{str(dtype).removeprefix('torch.')}); self-check: per layer ≤ {layer_error:.1e} (fp32), "
                  f"max |Δlogit| = {diff_plain:.2e} over {len(inputs['input_ids'])} probe inputs")
    return diff_plain
