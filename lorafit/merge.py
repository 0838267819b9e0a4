"""``lorafit merge RUN OUT``: fold an adapter into its base and write a plain Hugging Face folder.

Each adapter layer supplies its own folded weight (``merged_weight()``), so merge has no
method-specific code. The result is checked twice before the command reports success: the
folded model against the unmerged adapted model in memory, and the written folder re-loaded with
plain ``transformers`` against the same outputs (fp32, max abs difference reported). The folder
is written next to ``OUT`` and swapped in only after the check passes (``lorafit.files``): an
existing ``OUT`` is replaced only if it is an earlier merge output and ``--overwrite`` is given,
and never if it is, or lies inside, the run being merged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from lorafit.console import console
from lorafit.adapters import fold_into_base
from lorafit.adapters.io import find_adapter_dir, run_folder
from lorafit.assemble import load_adapted
from lorafit.config import ConfigError
from lorafit.files import check_free_space, fault_point, new_output, publish


PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A merge you can trust reproduces every logit of the adapted model.",
    "Short one.",
    "Low-rank adapters fold into the base weights exactly.",
]


def probe_inputs(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt"))


def _auto_class(task: str):
    from transformers import AutoModelForSequenceClassification
    from lorafit.models import AUTO_CLASSES
    return AUTO_CLASSES.get(task, AutoModelForSequenceClassification)


@torch.no_grad()
def merge(run_dir: str, out_dir: str, base_model: Optional[str] = None, tolerance: float = 1e-4,
          overwrite: bool = False) -> float:
    """Fold ``run_dir``'s adapter into the base and save a plain HF model folder to ``out_dir``.

    Returns:
        The max abs difference between the reloaded merged model's logits and the adapted model's.

    Raises:
        ConfigError: no adapter in ``run_dir``, a base model that differs from the training base,
            a merged model that does not reproduce the adapted one within ``tolerance``
            (relative to the largest logit), or an output folder it may not write (``claim_output``).
    """
    adapter_dir = find_adapter_dir(run_dir)
    if adapter_dir is None:
        raise ConfigError(f"No adapter found in '{run_dir}' (looked for adapter_config.json there and in "
                          f"{run_dir}/adapter). Give a finished training run, its adapter/ or a checkpoint.")
    out = Path(out_dir)
    with new_output(out, "merge", overwrite, "--overwrite", protected=[adapter_dir, run_folder(adapter_dir)]) as tmp:
        return _merge_into(load_adapted(adapter_dir, base_model), adapter_dir, tmp, out, tolerance)


def _merge_into(assembled, adapter_dir: Path, tmp: Path, out: Path, tolerance: float) -> float:
    """Fold, write into ``tmp``, check, and publish ``tmp`` as ``out``."""
    model, tokenizer, task = assembled.model.float().eval(), assembled.tokenizer, assembled.meta["task"]
    inputs = probe_inputs(tokenizer)
    if task == "multiple_choice":  # one question whose four choices are the probe texts
        inputs = {k: v[None] for k, v in inputs.items()}
    adapted = model(**inputs).logits
    fold_into_base(model)
    folded = model(**inputs).logits

    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    check_free_space(out.parent, size, "the merged model")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    reloaded = _auto_class(task).from_pretrained(tmp, dtype=torch.float32).eval()
    plain = reloaded(**inputs).logits
    diff_memory = float((folded - adapted).abs().max())
    diff_plain = float((plain - adapted).abs().max())
    bound = tolerance * max(1.0, float(adapted.abs().max()))
    if diff_plain > bound:
        raise ConfigError(f"The merged model does not reproduce the adapted model: max abs logit difference "
                          f"{diff_plain:.3g} (in memory {diff_memory:.3g}) exceeds {bound:.3g}. Nothing was written. "
                          f"This is a bug in the adapter's merge formula; please report it with the run's config.")
    record = {"source": str(Path(adapter_dir).resolve()), "base_model": assembled.meta["base_model"],
              "base_fingerprint": assembled.meta["base_fingerprint"], "adapter": assembled.meta["adapter"],
              "max_abs_diff_in_memory": diff_memory, "max_abs_diff_reloaded": diff_plain}
    fault_point("merge:written")
    publish(tmp, out, "merge", record)
    console.print(f"merged {len(assembled.layers)} layers → {out} (plain transformers folder); "
                  f"self-check: max |Δlogit| = {diff_plain:.2e} over {len(PROBE_TEXTS)} probe inputs")
    return diff_plain
