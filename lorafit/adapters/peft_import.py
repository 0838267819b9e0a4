"""Adapters trained with PEFT, read as lorafit adapters.

A PEFT adapter folder (``adapter_config.json`` holding ``peft_type``, ``adapter_model.safetensors``
with PEFT's key names) is accepted wherever a run is: ``lorafit eval``, ``merge`` and ``chat`` score,
fold or talk to it (its logits equal PEFT's own), and ``adapter.from_pretrained=FOLDER`` starts a
training run from its factors. What maps exactly onto a lorafit adapter is read: LoRA, rsLoRA
(``use_rslora``) and DoRA (``use_dora``) with one rank and alpha for every layer, on a causal LM or a
sequence classifier (its head from ``modules_to_save``). Anything else is refused with the reason.

PEFT's keys → lorafit's: ``base_model.model.<layer>.lora_A.weight`` → ``<layer>.lora_A`` (B alike),
``<layer>.lora_magnitude_vector`` → ``<layer>.magnitude``, ``base_model.model.<head>.<param>`` →
``<head>.<param>``. PEFT's scale ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA) is lorafit's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lorafit.config import ConfigError
from lorafit.files import load_tensors, read_json

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
TASKS = {"CAUSAL_LM": "causal_lm", "SEQ_CLS": "classification"}
KEYS = {".lora_A.weight": ".lora_A", ".lora_B.weight": ".lora_B", ".lora_magnitude_vector": ".magnitude"}


def is_peft_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a PEFT adapter (its config names a ``peft_type``)."""
    try:
        return "peft_type" in json.loads((Path(folder) / PEFT_CONFIG).read_text())
    except (OSError, ValueError, TypeError):
        return False


def read_peft_config(folder: Path) -> dict[str, Any]:
    """The folder's PEFT config, refused unless it maps exactly onto lorafit's LoRA / rsLoRA / DoRA.

    Raises:
        ConfigError: another PEFT method, per-layer ranks or alphas, trained biases or token rows,
            a task lorafit has no head for.
    """
    path = Path(folder) / PEFT_CONFIG
    config = read_json(path, "PEFT adapter config")
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type {config.get('peft_type')!r} (lorafit reads LORA, with or without use_dora)")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("per-layer ranks or alphas (rank_pattern / alpha_pattern): lorafit's LoRA has one r and alpha")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (trained biases)")
    if config.get("trainable_token_indices"):
        problems.append("trainable_token_indices (trained token rows)")
    if config.get("task_type") not in TASKS:
        problems.append(f"task_type {config.get('task_type')!r} (lorafit reads {', '.join(TASKS)})")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        problems.append(f"r={config.get('r')!r}")
    if problems:
        raise ConfigError(f"The PEFT adapter {folder} cannot be read as a lorafit adapter: {'; '.join(problems)}. "
                          f"Merge it with PEFT (merge_and_unload) and give lorafit the merged model instead.")
    return config


def adapter_options(config: dict[str, Any]) -> dict[str, Any]:
    """The lorafit adapter config (``adapter=lora``, ``rslora`` or ``dora``) equal to a PEFT LoRA config."""
    target = "lorafit.adapters.dora.DoRAConfig" if config.get("use_dora") else "lorafit.adapters.lora.LoRAConfig"
    return {"_target_": target, "r": config["r"], "alpha": float(config.get("lora_alpha", 8)), "dropout": 0.0,
            "use_rslora": bool(config.get("use_rslora", False))}


def peft_state(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's tensors under lorafit's keys."""
    state = {}
    for key, value in load_tensors(Path(folder) / PEFT_WEIGHTS, "PEFT adapter file").items():
        name = key.removeprefix(PREFIX)
        for theirs, ours in KEYS.items():
            if name.endswith(theirs):
                name = name[: -len(theirs)] + ours
                break
        state[name] = value
    return state


def peft_meta(folder: Path) -> dict[str, Any]:
    """What :func:`lorafit.assemble.load_adapted` needs (lorafit's adapter config keys) for a PEFT folder.

    There is no base fingerprint: the base is the one named by ``base_model_name_or_path`` (or the
    ``--base-model`` given), as PEFT itself trusts.
    """
    config = read_peft_config(folder)
    state = peft_state(folder)
    targets = sorted(key[: -len(".lora_A")] for key in state if key.endswith(".lora_A"))
    heads = sorted({key.rpartition(".")[0] for key in state if not key.endswith(tuple(KEYS.values()))})
    task, num_labels = TASKS[config["task_type"]], 2
    if task == "classification":
        head = next((state[f"{h}.weight"] for h in ("classifier", "score", "classifier.out_proj")
                     if f"{h}.weight" in state), None)
        if head is None:
            raise ConfigError(f"The PEFT adapter {folder} is a sequence classifier, but its file holds no "
                              f"classifier/score weights (modules_to_save). Save it with its head.")
        num_labels = head.shape[0]
        task = "classification" if num_labels > 1 else "regression"
    base = config.get("base_model_name_or_path") or ""
    tokenizer = str(folder) if (Path(folder) / "tokenizer_config.json").is_file() else None
    return {"task": task, "num_labels": num_labels, "targets": targets, "modules_to_save": heads,
            "base_model": base, "base_fingerprint": None, "model": {"name_or_path": base, "tokenizer": tokenizer},
            "adapter": adapter_options(config), "init": None, "peft": True}


def start_from_peft(model: torch.nn.Module, folder: str, adapter_cfg: Any, targets: list[str]) -> None:
    """``adapter.from_pretrained``: load a PEFT folder's factors (and head) into freshly attached layers.

    Raises:
        ConfigError: the folder's method, r, alpha, rsLoRA or target layers differ from the run's adapter.
    """
    from lorafit.adapters import load_adapter_state   # the package imports this module's constants

    meta = peft_meta(Path(folder))
    theirs, ours = meta["adapter"], {"_target_": f"{type(adapter_cfg).__module__}.{type(adapter_cfg).__name__}",
                                     "r": adapter_cfg.r, "alpha": float(adapter_cfg.alpha),
                                     "use_rslora": adapter_cfg.use_rslora}
    differ = [f"{k}: the folder has {theirs[k]!r}, the run {ours[k]!r}" for k in ours if theirs[k] != ours[k]]
    if set(meta["targets"]) != set(targets):
        missing = sorted(set(meta["targets"]) ^ set(targets))
        differ.append(f"target layers ({len(meta['targets'])} in the folder, {len(targets)} in the run; e.g. {missing[0]})")
    if differ:
        kind = "dora" if "dora" in theirs["_target_"] else ("rslora" if theirs["use_rslora"] else "lora")
        raise ConfigError(f"adapter.from_pretrained={folder} does not match the run's adapter ({'; '.join(differ)}). "
                          f"Continue it with adapter={kind} adapter.r={theirs['r']} adapter.alpha={theirs['alpha']:g} "
                          f"and the same target_modules.")
    load_adapter_state(model, peft_state(Path(folder)))
