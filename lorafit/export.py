"""``lorafit export RUN OUT --format peft|servable``: the adapter as a PEFT adapter folder.

Adapters are served unmerged by tools that read PEFT's format (vLLM, SGLang, TGI,
lm-evaluation-harness). Each adapter layer says how it is written there
(:meth:`~lorafit.adapters.AdditiveAdapter.peft_form`, in the method's own file): most methods' ΔW
has low rank and is written **exactly** as a plain LoRA — AdaLoRA ``B diag(E) A``, LoRA-Dash
``sBA + U diag(d) Vᵀ``, Spectral ``U'SV'ᵀ − USVᵀ``, Bone's tiled block, an init that rewrote W0
(``sBA − sB0A0``, as PEFT converts PiSSA/OLoRA adapters) — with the scale folded into B and each
layer's rank kept (PEFT's ``rank_pattern`` / ``alpha_pattern``, ``lora_alpha = r`` so every scale is 1);
DoRA is PEFT's DoRA (``use_dora``), Bone and Bat are PEFT's MiSS. Classification heads go in
``modules_to_save``, the rows of added tokens in ``trainable_token_indices`` (the base must be resized
to the tokenizer first, as with PEFT's own).

Two formats:

- ``peft``: what ``PeftModel.from_pretrained(base, OUT)`` loads, exactly, for every adapter and init;
- ``servable``: a plain LoRA that vLLM, SGLang and TGI accept — one rank for all layers (smaller
  ones zero-padded), the scale folded into B so one ``lora_alpha / r`` (= 1) is right everywhere, no
  DoRA, no ``modules_to_save``, no added tokens; causal LMs only.

Where no exact form exists (RoSA's sparse part, Bat and DoRA as ``servable``, a rank above
``--max-rank``), ``--approx`` writes the truncated SVD of each such layer's ΔW (its relative error,
``‖ΔW − ΔW_k‖_F / ‖ΔW‖_F``, is printed and recorded); without it the export is refused with the
reason. AdaLoRA layers pruned to rank 0 are left out of ``target_modules``.

The self-check, as merge's: the folder written is loaded with PEFT onto a fresh base and its logits
on probe inputs are compared with lorafit's adapted model; nothing is published if they differ
beyond the tolerance (exact exports) — approximate ones report the difference.
"""

from __future__ import annotations

import gc
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from lorafit.adapters import adapter_layers
from lorafit.adapters.io import find_adapter_dir, run_folder
from lorafit.adapters.peft_import import PEFT_CONFIG, PEFT_WEIGHTS, PREFIX
from lorafit.adapters.tokens import TokenRows
from lorafit.assemble import load_adapted
from lorafit.config import ConfigError
from lorafit.console import console
from lorafit.files import new_output, publish
from lorafit.merge import logit_tolerance, probe_inputs

FORMATS = ("peft", "servable")
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "classification": "SEQ_CLS", "regression": "SEQ_CLS",
                   "reward": "SEQ_CLS", "multiple_choice": None}
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
"""The values vLLM accepts for ``--max-lora-rank`` (an adapter's rank must not exceed the one chosen)."""
VLLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Llama-style projection names vLLM maps LoRA weights onto (besides embed_tokens and lm_head)."""


@dataclass
class LayerExport:
    """One layer as written: its PEFT kind (``lora``, ``dora``, ``miss``, ``miss_bat``), tensors by
    PEFT key suffix, rank, and the relative error of an SVD approximation (None when exact)."""

    kind: str
    tensors: dict[str, torch.Tensor]
    rank: int
    error: Optional[float] = None


@dataclass
class Exported:
    """What ``export`` wrote and measured."""

    config: dict[str, Any]
    layers: dict[str, LayerExport] = field(default_factory=dict)
    max_abs_logit_diff: float = 0.0
    tolerance: float = 0.0

    @property
    def approximate(self) -> dict[str, float]:
        return {name: layer.error for name, layer in self.layers.items() if layer.error is not None}


# ------------------------------------------------------------------------------------ per layer
def truncated(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The best rank-``rank`` factors (B, A) of ``delta`` (SVD) and the relative Frobenius error."""
    U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
    k = min(rank, S.numel())
    total = float(S.pow(2).sum())
    error = (float(S[k:].pow(2).sum()) / total) ** 0.5 if total > 0 else 0.0
    return (U[:, :k] * S[:k]).float(), Vh[:k].float(), error


def lora_tensors(B: torch.Tensor, A: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"lora_A.weight": A.contiguous(), "lora_B.weight": B.contiguous()}


def layer_export(name: str, layer: nn.Module, servable: bool, approx: bool, max_rank: Optional[int]) -> LayerExport:
    """How one adapter layer is written (exactly, or by SVD when ``approx`` allows it).

    Raises:
        ConfigError: no exact form in the chosen format and ``approx`` is off.
    """
    form = None if servable else layer.peft_form()
    if form is None:
        factors = layer.low_rank_update()
        if factors is not None:
            form = ("lora", lora_tensors(*factors))
    if form is not None:
        kind, tensors = form
        rank = {"miss": 0, "miss_bat": -1}.get(kind)
        rank = tensors["lora_A.weight"].shape[0] if rank is None else tensors["miss_block"].shape[rank]
        if max_rank is None or rank <= max_rank or kind not in ("lora", "dora"):
            return LayerExport(kind, tensors, rank)
        reason = f"its exact rank {rank} is above --max-rank={max_rank}"
    else:
        reason = layer.why_not_low_rank()
    if not approx:
        raise ConfigError(f"{name} ({type(layer).__name__}) has no exact form in the {'servable' if servable else 'peft'} "
                          f"format: {reason}. Export a truncated SVD of its ΔW with --approx (the error per layer is "
                          f"printed and recorded), or use --format peft where it has one.")
    delta = layer.merged_weight().float() - layer.original_weight().float()
    rank = max_rank or getattr(layer, "r", 8)
    B, A, error = truncated(delta, rank)
    return LayerExport("lora", lora_tensors(B, A), A.shape[0], error)


# ------------------------------------------------------------------------------------ the folder
def peft_config(kinds: set[str], layers: dict[str, LayerExport], meta: dict[str, Any], base_model: str,
                heads: list[str], servable: bool, tokens: dict[str, list[int]]) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT (and, for ``servable``, vLLM) reads."""
    targets = sorted(layers)
    common = {"task_type": PEFT_TASK_TYPES.get(meta["task"]), "base_model_name_or_path": base_model,
              "target_modules": targets, "bias": "none", "inference_mode": True,
              "modules_to_save": heads or None}
    if kinds & {"miss", "miss_bat"}:
        (rank,) = {layer.rank for layer in layers.values()}
        return {"peft_type": "MISS", **common, "r": rank, "mini_r": 1, "miss_dropout": 0.0,
                "init_weights": "bat" if "miss_bat" in kinds else True}
    ranks = Counter(layer.rank for layer in layers.values())
    r = max(ranks) if servable else ranks.most_common(1)[0][0]
    pattern = {name: layer.rank for name, layer in layers.items() if layer.rank != r and not servable}
    return {"peft_type": "LORA", **common, "r": r, "lora_alpha": r, "rank_pattern": pattern,
            "alpha_pattern": dict(pattern), "use_rslora": False, "use_dora": "dora" in kinds, "lora_dropout": 0.0,
            "fan_in_fan_out": False, "init_lora_weights": True, "trainable_token_indices": tokens or None}


def padded(layer: LayerExport, rank: int) -> dict[str, torch.Tensor]:
    """A LoRA layer zero-padded to ``rank`` (A gains zero rows, B zero columns: the same ΔW)."""
    A, B = layer.tensors["lora_A.weight"], layer.tensors["lora_B.weight"]
    extra = rank - A.shape[0]
    return lora_tensors(torch.cat([B, B.new_zeros(B.shape[0], extra)], 1), torch.cat([A, A.new_zeros(extra, A.shape[1])]))


def token_rows_state(model: nn.Module) -> tuple[dict[str, list[int]], dict[str, torch.Tensor]]:
    """PEFT's ``trainable_token_indices`` and tensors for the rows of added tokens: the full new rows."""
    indices, state = {}, {}
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, TokenRows):
            ids = list(range(layer.first, layer.first + layer.token_rows.shape[0]))
            indices[name.rsplit(".", 1)[-1]] = ids
            state[f"{PREFIX}{name}.token_adapter.trainable_tokens_delta"] = layer.merged_weight()[ids].contiguous()
    return indices, state


def check_servable(config: dict[str, Any], state: dict[str, torch.Tensor]) -> list[str]:
    """What vLLM's adapter loader would reject in this folder (empty: nothing)."""
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')} (vLLM serves LORA)")
    if config.get("use_dora"):
        problems.append("use_dora (vLLM does not serve DoRA)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']}")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-layer rank_pattern/alpha_pattern (older vLLM ignores them: wrong scales)")
    if config.get("bias", "none") != "none" or config.get("trainable_token_indices"):
        problems.append("bias or trainable tokens")
    if config.get("init_lora_weights") not in (True, False, "gaussian"):
        problems.append(f"init_lora_weights={config.get('init_lora_weights')!r}")
    if not isinstance(config.get("r"), int) or not 0 < config["r"] <= max(VLLM_MAX_RANKS):
        problems.append(f"r={config.get('r')} (vLLM ranks go up to {max(VLLM_MAX_RANKS)})")
    for key in state:
        module, _, suffix = key.removeprefix(PREFIX).rpartition(".lora_")
        if not key.startswith(PREFIX) or suffix not in ("A.weight", "B.weight"):
            problems.append(f"tensor {key} (vLLM reads only base_model.model.*.lora_A/B.weight)")
        elif module.rsplit(".", 1)[-1] not in VLLM_TARGETS:
            problems.append(f"target {module} (vLLM maps {', '.join(VLLM_TARGETS)})")
    return problems


# ------------------------------------------------------------------------------------ the check
@torch.no_grad()
def peft_logits(folder: Path, base_model: str, meta: dict[str, Any], tokenizer: Any, inputs: dict[str, torch.Tensor],
                dtype: torch.dtype) -> torch.Tensor:
    """Logits of ``folder`` loaded with PEFT onto a fresh base (resized to the tokenizer if tokens were added)."""
    from peft import PeftModel

    from lorafit.merge import _auto_class

    kwargs = {"num_labels": meta["num_labels"]} if meta["task"] in ("classification", "regression", "reward") else {}
    if meta["task"] in ("regression", "reward"):
        kwargs["num_labels"] = 1
    base = _auto_class(meta["task"]).from_pretrained(base_model, dtype=dtype, **kwargs)
    if meta.get("added_tokens"):
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    model = PeftModel.from_pretrained(base, str(folder)).eval()
    logits = model(**inputs).logits.float()
    del model, base
    gc.collect()
    return logits


# ------------------------------------------------------------------------------------ export
def export(run_dir: str, out_dir: str, fmt: str = "peft", approx: bool = False, max_rank: Optional[int] = None,
           base_model: Optional[str] = None, overwrite: bool = False, tolerance: float = 1e-4) -> Exported:
    """Write ``run_dir``'s adapter to ``out_dir`` in PEFT's format (``fmt``: ``peft`` or ``servable``).

    Raises:
        ConfigError: no adapter in ``run_dir``; a layer without an exact form and no ``approx``; a
            ``servable`` export of what servers cannot hold (a head, added tokens); a folder that PEFT
            loads with other logits than lorafit's (nothing is written then).
    """
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    if max_rank is not None and max_rank < 1:
        raise ConfigError(f"--max-rank {max_rank}: give a rank of at least 1.")
    adapter_dir = find_adapter_dir(run_dir)
    if adapter_dir is None:
        raise ConfigError(f"No lorafit adapter found in '{run_dir}'. Give a training run, its adapter/ or a checkpoint.")
    servable = fmt == "servable"
    assembled = load_adapted(adapter_dir, base_model, quantization="none")
    meta, model, tokenizer = assembled.meta, assembled.model.eval(), assembled.tokenizer
    if servable and (meta["modules_to_save"] or meta["task"] != "causal_lm"):
        raise ConfigError(f"--format servable is for causal LMs whose heads are unchanged, and this run trained "
                          f"{meta['modules_to_save'] or meta['task']}: serving engines load no heads. Use --format "
                          f"peft (PEFT loads the head from modules_to_save), or merge the run.")
    if servable and meta.get("added_tokens"):
        raise ConfigError(f"--format servable: the run added tokens to the vocabulary ({', '.join(meta['added_tokens'])}), "
                          f"and vLLM no longer loads extra vocabulary with an adapter. Use --format peft (the rows "
                          f"travel as trainable_token_indices), or merge the run and serve the merged folder.")
    layers = {}
    for name, layer in adapter_layers(model).items():
        if isinstance(layer, TokenRows):
            continue
        exported = layer_export(name, layer, servable, approx, max_rank)
        if exported.rank > 0:                     # AdaLoRA layers pruned to rank 0 leave target_modules
            layers[name] = exported
    if not layers:
        raise ConfigError(f"Every adapter layer of {run_dir} has rank 0 (ΔW = 0): there is nothing to export.")
    kinds = {layer.kind for layer in layers.values()}
    if len(kinds) > 1:                            # e.g. DoRA layers with some above --max-rank (by SVD: LoRA)
        name, layer = next((n, x) for n, x in layers.items() if x.kind != "lora")
        raise ConfigError(f"{name} exports as {layer.kind} while others export as LoRA; one PEFT adapter holds one "
                          f"kind. Export with --format servable --approx (every layer as LoRA), or without --max-rank.")
    tokens, token_state = token_rows_state(model)
    if tokens and kinds & {"miss", "miss_bat"}:
        raise ConfigError("PEFT's MiSS (Bone, Bat) takes no trainable_token_indices, and this run added tokens. "
                          "Merge the run instead.")
    base = base_model or meta["base_model"]
    heads = [h for h in meta["modules_to_save"] if any(True for _ in model.get_submodule(h).parameters())]
    config = peft_config(kinds, layers, meta, base, heads, servable, tokens)
    state = dict(token_state)
    for name, layer in layers.items():
        tensors = padded(layer, config["r"]) if servable else layer.tensors
        state.update({f"{PREFIX}{name}.{suffix}": t.detach().float().cpu().contiguous() for suffix, t in tensors.items()})
    for head in heads:
        for key, value in model.get_submodule(head).state_dict().items():
            state[f"{PREFIX}{head}.{key}"] = value.detach().float().cpu().contiguous()
    if servable and (problems := check_servable(config, state)):
        raise ConfigError(f"The servable export would break vLLM's adapter rules: {'; '.join(problems)}. This is a bug "
                          f"in lorafit's export; please report it.")

    inputs = probe_inputs(tokenizer)
    if meta["task"] == "multiple_choice":
        inputs = {k: v[None] for k, v in inputs.items()}
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    with torch.no_grad():
        reference = model(**inputs).logits.float()
    bound = logit_tolerance(dtype, len(layers), tolerance) * max(1.0, float(reference.abs().max()))
    del model, assembled.model
    assembled.layers.clear()
    gc.collect()
    out = Path(out_dir)
    result = Exported(config, layers, tolerance=bound)
    with new_output(out, "export", overwrite, "--overwrite", protected=[adapter_dir, run_folder(adapter_dir)]) as tmp:
        save_file(state, str(tmp / PEFT_WEIGHTS))
        (tmp / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(tmp)
        result.max_abs_logit_diff = float((peft_logits(tmp, base, meta, tokenizer, inputs, dtype) - reference).abs().max())
        if not result.approximate and result.max_abs_logit_diff > bound:
            raise ConfigError(f"PEFT loads the exported adapter with other logits than lorafit's (max |Δlogit| "
                              f"{result.max_abs_logit_diff:.3g} > {bound:.3g}). Nothing was written. This is a bug in "
                              f"lorafit's export; please report it with the run's config.")
        record = {"source": str(adapter_dir.resolve()), "format": fmt, "base_model": meta["base_model"],
                  "adapter": meta["adapter"], "ranks": {n: x.rank for n, x in layers.items()},
                  "approximated": result.approximate, "max_abs_logit_diff": result.max_abs_logit_diff,
                  "tolerance": bound}
        publish(tmp, out, "export", record)
    say_done(result, out, fmt)
    return result


def say_done(result: Exported, out: Path, fmt: str) -> None:
    config = result.config
    what = (f"{config['peft_type']} r={config['r']}" + (" (DoRA)" if config.get("use_dora") else "")
            + (f", {len(config['rank_pattern'])} layers with their own rank" if config.get("rank_pattern") else ""))
    console.print(f"exported {len(result.layers)} layers → {out} ({fmt}: {what}); PEFT reloads it with max |Δlogit| = "
                  f"{result.max_abs_logit_diff:.2e}")
    if result.approximate:
        worst = max(result.approximate.items(), key=lambda item: item[1])
        console.print(f"approximated {len(result.approximate)} layers by truncated SVD; largest relative error "
                      f"{worst[1]:.3g} ({worst[0]}); all in lorafit_export.json")
    if fmt == "servable":
        needed = next(r for r in VLLM_MAX_RANKS if r >= config["r"])
        console.print(f"serve it: vllm serve {config['base_model_name_or_path']} --enable-lora --lora-modules "
                      f"adapter={out.resolve()} --max-lora-rank {needed}", soft_wrap=True)
