"""What ``lorafit train`` and ``lorafit eval`` do, as plain functions (the CLI only parses)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.console import Console
from rich.table import Table

from lorafit.assemble import assemble, find_adapter_dir, load_adapted
from lorafit.config import ConfigError, EvalConfig, HardwareConfig, TrainConfig, as_dict, to_yaml
from lorafit.data.tasks import tokenize
from lorafit.evaluate import predict, score
from lorafit.models import from_pretrained, load_model, save_base
from lorafit.train.checkpoint import latest_checkpoint
from lorafit.train.trainer import Trainer

console = Console(stderr=True, soft_wrap=True)


def make_accelerator(hardware: HardwareConfig) -> Accelerator:
    if hardware.device == "gpu" and not torch.cuda.is_available():
        raise ConfigError("hardware=gpu but no CUDA device is visible. Use hardware=cpu (or hardware=auto).")
    return Accelerator(cpu=hardware.device == "cpu", mixed_precision=hardware.mixed_precision)


def _cache_key(data_cfg: Any, tokenizer: Any) -> str:
    text = to_yaml(data_cfg) + str(getattr(tokenizer, "name_or_path", "")) + str(len(tokenizer))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def callbacks_of(*parts: Any) -> list:
    """Trainer callbacks contributed by the adapter, init and optimizer configs."""
    found = []
    for part in parts:
        make = getattr(part, "callbacks", None)
        if make is not None:
            found.extend(make())
    return found


def train(cfg: TrainConfig) -> dict[str, dict]:
    """Assemble the model, tokenise the data once, run the trainer; returns final eval metrics."""
    accelerator = make_accelerator(cfg.hardware)
    set_seed(cfg.seed)
    resolve = getattr(cfg.data, "resolve_objective", None)  # data=commonsense: MC head or SFT, by the model
    if resolve is not None:
        resolve(cfg.model)
    prepare = getattr(cfg.task, "prepare", None)  # a task checks that model, data and reward fit it
    if prepare is not None:
        prepare(cfg)
    run_dir = Path(cfg.output_dir)
    claim_run_dir(cfg, accelerator)
    data = cfg.data
    assembled = assemble(cfg.model, cfg.adapter, cfg.init, data.task_type, data.num_labels, seed=cfg.seed)
    if cfg.model.build is not None:
        # A built (random) base exists nowhere else: keep it so merge and eval can find it.
        base_dir = run_dir / "base"
        if accelerator.is_main_process and not (base_dir / "config.json").is_file():
            _save_unadapted_base(cfg, assembled, base_dir)
        assembled.meta["base_model"] = str(base_dir.resolve())
    cache = run_dir / "cache" / _cache_key(data, assembled.tokenizer)
    with accelerator.main_process_first():
        train_set = tokenize(data, "train", assembled.tokenizer, cache)
        eval_sets = {data.split_name(s): tokenize(data, s, assembled.tokenizer, cache) for s in data.eval_splits}
    trainer = Trainer(cfg, assembled, train_set, eval_sets,
                      callbacks_of(cfg.adapter, cfg.init, cfg.optimizer, cfg.task), accelerator)
    if accelerator.is_main_process:
        n_train = sum(p.numel() for p in trainer.params)
        n_all = sum(p.numel() for p in assembled.model.parameters())
        console.print(f"lorafit train: {type(cfg.adapter).__name__} on {len(assembled.layers)} layers of "
                      f"{cfg.model.name_or_path}; trainable {n_train:,} of {n_all:,} parameters "
                      f"({100 * n_train / n_all:.2f}%); {trainer.total_steps} steps → {run_dir}")
    before = trainer.evaluate() if (cfg.eval_at_start and eval_sets and not cfg.resume) else None
    after = trainer.fit()
    if accelerator.is_main_process and after:
        print_results(after, before, title=f"{run_dir} (dev)")
    return after


# ---------------------------------------------------------------------------------- run folder
RUN_MARKER = "lorafit_train.json"
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "results.json", "adapter", "checkpoints", "cache", "base", "tb",
               "error.log", RUN_MARKER)
"""What ``lorafit train`` writes into a run folder; ``overwrite=true`` removes these and nothing else."""
# Keys that may change on resume without changing the maths of the remaining steps.
RESUME_HARMLESS = ("output_dir", "resume", "overwrite", "eval_every", "eval_at_start", "save_every", "log_every",
                   "keep_checkpoints", "progress", "tensorboard", "data.eval_batch_size", "data.max_eval_examples",
                   "model.name_or_path", "model.tokenizer")   # the base itself is checked by its fingerprint
RESUME_NOTED = ("hardware.grad_accum_steps", "hardware.device")  # the same update up to round-off


def is_run_folder(folder: Path) -> bool:
    """A folder written by ``lorafit train``: this version's marker, an earlier version's layout, or
    step checkpoints (a run's ``checkpoints/`` copied elsewhere to resume from)."""
    return ((folder / RUN_MARKER).is_file() or latest_checkpoint(folder) is not None
            or ((folder / "config.yaml").is_file() and any(
                (folder / name).exists() for name in ("adapter", "checkpoints", "metrics.jsonl"))))


def claim_run_dir(cfg: TrainConfig, accelerator: Accelerator) -> None:
    """Check that ``output_dir`` may hold this run (every process, before any writes), then (main
    process) prepare it.

    A fresh run needs an absent or empty folder, or an earlier lorafit run with ``overwrite=true`` (only
    the entries of :data:`RUN_ENTRIES` are removed). ``resume=true`` needs a run whose checkpoint config
    agrees with this one in everything that changes the maths (:func:`check_resume`).
    """
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir={run_dir} is a file, not a folder. Choose another output_dir.")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if entries and not is_run_folder(run_dir):
        shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
        raise ConfigError(f"output_dir={run_dir} already exists and holds files lorafit did not write ({shown}). "
                          f"lorafit never deletes or overwrites what it did not write: choose a new or empty "
                          f"output_dir.")
    found = latest_checkpoint(run_dir)
    continuing = bool(entries) and cfg.resume and found is not None
    if continuing:
        check_resume(cfg, run_dir, found)
    elif entries and not (cfg.overwrite or cfg.resume):
        what = f"checkpoints (latest: {found.name})" if found is not None else "an earlier lorafit run"
        raise ConfigError(f"output_dir={run_dir} already holds {what}. Pass resume=true to continue that run, "
                          f"overwrite=true to start afresh there (lorafit's own files in it are deleted), or choose "
                          f"another output_dir.")
    accelerator.wait_for_everyone()   # every process has looked before the main one writes
    if not accelerator.is_main_process or continuing:
        return  # when continuing, the trainer rewrites config.yaml once the checkpoint has loaded
    if entries:   # overwrite=true, or resume=true of a run that never wrote a checkpoint: start afresh
        for name in RUN_ENTRIES:
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    from lorafit import __version__
    (run_dir / RUN_MARKER).write_text(json.dumps({"command": "train", "lorafit_version": __version__}, indent=2))
    (run_dir / "config.yaml").write_text(to_yaml(cfg))


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def _total_steps_matter(cfg: TrainConfig) -> bool:
    """Does anything in the run depend on the number of steps (a decaying lr, a warm-up ratio, a rank budget)?"""
    optimizer = cfg.optimizer
    decays = getattr(optimizer, "scheduler", "constant") != "constant" or getattr(optimizer, "warmup_ratio", 0) > 0
    return decays or bool(getattr(cfg.adapter, "uses_total_steps", False))


def check_resume(cfg: TrainConfig, run_dir: Path, found: Optional[Path]) -> None:
    """Refuse ``resume=true`` if the config differs from the checkpoint's in a key that changes the maths."""
    from omegaconf import OmegaConf

    source = found / "config.yaml" if found is not None and (found / "config.yaml").is_file() else run_dir / "config.yaml"
    if not source.is_file():
        return
    try:
        saved = _flat(OmegaConf.to_container(OmegaConf.load(source)))
    except Exception as exc:  # YAML errors have many types
        raise ConfigError(f"resume=true: {source} cannot be read ({' '.join(str(exc).split())[:200]}). "
                          f"Start a new run instead.") from None
    now = _flat({k: v for k, v in as_dict(cfg).items() if k != "_target_"})
    differ = [k for k in sorted(saved.keys() & now.keys()) if saved[k] != now[k] and not k.startswith(RESUME_HARMLESS)]
    if not _total_steps_matter(cfg):
        differ = [k for k in differ if k not in ("max_steps", "num_epochs")]
    noted = [k for k in differ if k in RESUME_NOTED]
    refused = [k for k in differ if k not in RESUME_NOTED]
    if refused:
        shown = "; ".join(f"{k}: {saved[k]!r} → {now[k]!r}" for k in refused[:8])
        raise ConfigError(f"resume=true, but this config differs from the checkpoint's ({source}) in what changes the "
                          f"training maths: {shown}. Resume with the checkpoint's values, or start a new run "
                          f"(another output_dir, or overwrite=true there).")
    for key in noted:
        console.print(f"note: {key} was {saved[key]!r} and is now {now[key]!r}; the update is the same up to round-off")


def _save_unadapted_base(cfg: TrainConfig, assembled: Any, folder: Path) -> None:
    """Write the built base model: built again from its config and seed, so it holds exactly the
    weights the adapter was attached to (an init may have turned the live ones into a residual)."""
    data = cfg.data
    model = load_model(cfg.model, data.task_type, data.num_labels, seed=cfg.seed, tokenizer=assembled.tokenizer)
    save_base(model, assembled.tokenizer, folder)


def print_results(results: dict[str, dict], before: Optional[dict[str, dict]] = None, title: str = "") -> None:
    table = Table(title=title)
    table.add_column("split")
    table.add_column("metric")
    if before:
        table.add_column("before", justify="right")
    table.add_column("after" if before else "value", justify="right")
    for split, metrics in results.items():
        for name, value in metrics.items():
            cells = [split, name]
            if before:
                old = before.get(split, {}).get(name)
                cells.append("" if old is None else _fmt(old))
            cells.append(_fmt(value))
            table.add_row(*cells)
    Console().print(table)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# ------------------------------------------------------------------------------------- eval
EVAL_FIX = "Give a Hugging Face model folder (config.json, weights, tokenizer files), a run folder or a merged folder."

def load_for_eval(path: str, data: Any) -> tuple[Any, Any, str]:
    """A model to score: a run / adapter folder (adapter applied, not merged) or a plain HF folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    adapter_dir = find_adapter_dir(path)
    if adapter_dir is not None:
        assembled = load_adapted(adapter_dir)
        if assembled.meta["task"] != data.task_type:
            raise ConfigError(f"{path} was trained for {assembled.meta['task']}, but data={type(data).__name__} "
                              f"is a {data.task_type} task. Evaluate it on matching data.")
        return assembled.model, assembled.tokenizer, "adapter (unmerged)"
    if not (Path(path) / "config.json").is_file():
        raise ConfigError(f"'{path}' is neither a lorafit run folder (adapter/adapter_config.json) nor a Hugging "
                          f"Face model folder (config.json). Give a run folder, a merged folder or a base model.")
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, path, "a tokenizer", EVAL_FIX)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if data.task_type == "causal_lm":
        return from_pretrained(AutoModelForCausalLM.from_pretrained, path, "the model", EVAL_FIX), tokenizer, "plain"
    config = from_pretrained(AutoConfig.from_pretrained, path, "a model config", EVAL_FIX)
    expected = 1 if data.task_type == "regression" else data.num_labels
    has_head = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if not has_head or config.num_labels != expected:
        console.print(f"[yellow]warning:[/] {path} has no trained {expected}-label classification head; "
                      f"a new random head is used, so scores are near chance.")
    model = from_pretrained(
        AutoModelForSequenceClassification.from_pretrained, path, "the model", EVAL_FIX, num_labels=expected,
        ignore_mismatched_sizes=True,
        **({"problem_type": "regression"} if data.task_type == "regression" else {}))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer, "plain"


def evaluate_model(path: str, cfg: EvalConfig) -> dict[str, dict]:
    """``lorafit eval``: score ``path`` on the data's dev splits; write results.json, results.md
    (+ predictions). ``tasks=[...]`` scores several GLUE tasks; ``suite=commonsense`` goes to
    :func:`lorafit.commonsense_eval.evaluate_commonsense`."""
    import dataclasses

    from rich.progress import Progress

    from lorafit.data.commonsense import CommonsenseData
    from lorafit.data.glue import get_task
    from lorafit.data.tasks import GlueData

    if cfg.suite == "commonsense":
        from lorafit.commonsense_eval import evaluate_commonsense
        return evaluate_commonsense(path, cfg)
    data = cfg.data
    if isinstance(data, CommonsenseData):
        raise ConfigError("data=commonsense is scored with suite=commonsense (and a protocol); add suite=commonsense.")
    if cfg.tasks and not isinstance(data, GlueData):
        raise ConfigError(f"tasks=[...] with suite=glue names GLUE tasks, but data={type(data).__name__} was chosen. "
                          f"Drop tasks= or use data=glue.")
    for name in cfg.tasks or []:
        try:
            get_task(name)
        except ValueError as exc:
            raise ConfigError(f"tasks=[...]: {exc}") from None
    if cfg.limit is not None:
        data.max_eval_examples = cfg.limit
    tasks = [dataclasses.replace(data, task=t) for t in cfg.tasks] if cfg.tasks else [data]
    accelerator = make_accelerator(cfg.hardware)
    results, predictions, kinds = {}, {}, set()
    with Progress(console=console, disable=not accelerator.is_main_process) as progress:
        for task_data in tasks:
            model, tokenizer, kind = load_for_eval(path, task_data)
            kinds.add(kind)
            model.to(accelerator.device)
            for split in task_data.eval_splits:
                dataset = tokenize(task_data, split, tokenizer, None)
                name = task_data.split_name(split)
                bar = progress.add_task(f"eval {name}", total=len(dataset))
                result = predict(model, dataset, task_data.task_type, cfg.batch_size, tokenizer.pad_token_id,
                                 accelerator.device, accelerator, progress=lambda n, b=bar: progress.advance(b, n))
                results[name] = score(task_data, result)
                predictions[name] = result
    if accelerator.is_main_process:
        kind = ", ".join(sorted(kinds))
        print_results(results, title=f"{path} [{kind}]")
        save_eval(path, cfg, results, f"lorafit eval {path} ({kind}), suite={cfg.suite}",
                  lambda folder: write_predictions(folder / "predictions.jsonl", predictions))
    return results


def save_eval(path: str, cfg: EvalConfig, results: dict[str, dict], title: str, write_predictions: Any) -> None:
    """Write ``results.json`` / ``results.md`` (and predictions) into ``cfg.output_dir``, if set."""
    from lorafit.files import new_output, publish
    from lorafit.report import write_results

    if not cfg.output_dir:
        console.print("results not saved: pass output_dir=DIR to write results.json and results.md")
        return
    out = Path(cfg.output_dir)
    model = Path(path)
    with new_output(out, "eval", cfg.overwrite, "overwrite=true",
                    protected=[] if is_run_folder(model) else [model]) as tmp:
        write_results(tmp, results, title=title)
        if cfg.save_predictions:
            write_predictions(tmp)
        publish(tmp, out, "eval", {"model": str(model.resolve())})
    console.print(f"results → {out / 'results.json'}, {out / 'results.md'}")


def write_predictions(file: Path, predictions: dict[str, dict]) -> None:
    with open(file, "w") as f:
        for split, result in predictions.items():
            for idx, (label, pred) in enumerate(zip(result.get("labels", []), result.get("predictions", []))):
                record = {"idx": idx, "label": label, "prediction": pred}
                if len(predictions) > 1:
                    record["split"] = split
                f.write(json.dumps(record) + "\n")
