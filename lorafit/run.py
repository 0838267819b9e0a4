"""What ``lorafit train`` does, as plain functions (the CLI only parses): claim the run folder,
assemble the model, tokenise the data once, run the trainer, print the results.

``lorafit eval`` is :mod:`lorafit.eval`; ``lorafit merge`` is :mod:`lorafit.merge`."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Optional

from accelerate import Accelerator
from accelerate.utils import set_seed

from lorafit.assemble import assemble
from lorafit.config import ConfigError, TrainConfig, as_dict, flat_config, to_yaml
from lorafit.console import console
from lorafit.data.batches import tokenize
from lorafit.eval.report import print_results
from lorafit.files import recover, staging, swap_in
from lorafit.models import load_model, load_tokenizer, save_base
from lorafit.train.checkpoint import RUN_ENTRIES, RUN_MARKER, is_run_folder, latest_checkpoint
from lorafit.train.trainer import Trainer


def _cache_key(data_cfg: Any, model_cfg: Any) -> str:
    """The tokenised data depend on the data config and on the tokenizer the run names (not on where a
    run folder was copied to)."""
    text = to_yaml(data_cfg) + str(model_cfg.tokenizer or model_cfg.name_or_path)
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
    accelerator = cfg.hardware.accelerator(cfg.trackers(), str(Path(cfg.output_dir) / "tb"))
    set_seed(cfg.seed)
    cfg.data.resolve(cfg.model)   # data=commonsense: a multiple-choice head or SFT, by the model
    cfg.task.prepare(cfg)         # the task checks that model, data and reward fit it
    run_dir = Path(cfg.output_dir)
    claim_run_dir(cfg, accelerator)
    data = cfg.data
    model_cfg = cfg.model
    base_dir = run_dir / "base"      # a built (random) base exists nowhere else: merge and eval find it there
    if model_cfg.build is not None and model_cfg.quantization != "none":
        # quantised as it loads: write the built base first, then load it like any checkpoint
        if accelerator.is_main_process and not (base_dir / "config.json").is_file():
            write_built_base(cfg, base_dir)
        accelerator.wait_for_everyone()
        model_cfg = dataclasses.replace(model_cfg, name_or_path=str(base_dir.resolve()), build=None, tokenizer=None)
    # sharded (FSDP), a quantised base is loaded on the CPU, as an unquantised one always is: fully_shard then
    # moves only this process's shards to the accelerator (a 4-bit 70B never whole on a 24 GB card)
    device = "cpu" if cfg.hardware.sharding == "fsdp" else accelerator.device
    assembled = assemble(model_cfg, cfg.adapter, cfg.init, data.head, data.num_labels, seed=cfg.seed,
                         device=device, data=data)
    if cfg.model.build is not None:
        if accelerator.is_main_process and not (base_dir / "config.json").is_file():
            write_built_base(cfg, base_dir)   # built again from its seed: the weights the adapter was attached to
        assembled.meta["base_model"] = str(base_dir.resolve())
    cache = run_dir / "cache" / _cache_key(data, cfg.model)
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
        console.print(memory_line(cfg, accelerator.num_processes))
    before = trainer.evaluate() if (cfg.eval_at_start and eval_sets and not cfg.resume) else None
    after = trainer.fit()
    if accelerator.is_main_process and after:
        print_results(after, before, title=f"{run_dir} (dev)")
    return after


def memory_line(cfg: TrainConfig, processes: int) -> str:
    """The banner's memory estimate (never in the way of training: a model it cannot trace is skipped)."""
    from lorafit.estimate import estimate

    try:
        return estimate(cfg, processes).line()
    except Exception as exc:  # an architecture the meta-device trace cannot run
        return f"(no memory estimate for this model: {type(exc).__name__})"


# ---------------------------------------------------------------------------------- run folder
# Keys that may change on resume without changing the maths of the remaining steps.
RESUME_HARMLESS = ("output_dir", "resume", "overwrite", "eval_every", "eval_at_start", "save_every", "log_every",
                   "keep_checkpoints", "progress", "tensorboard", "logging.", "data.eval_batch_size", "data.max_eval_examples",
                   "model.name_or_path", "model.tokenizer")   # the base itself is checked by its fingerprint
RESUME_NOTED = ("hardware.grad_accum_steps", "hardware.device", "hardware.num_processes")  # the same update up to round-off


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


def _total_steps_matter(cfg: TrainConfig) -> bool:
    """Does anything in the run depend on the number of steps (a decaying lr, a warm-up ratio, or an
    adapter schedule that declares ``uses_total_steps``, AdaLoRA's budget)?"""
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
        saved = flat_config(OmegaConf.to_container(OmegaConf.load(source)))
    except Exception as exc:  # YAML errors have many types
        raise ConfigError(f"resume=true: {source} cannot be read ({' '.join(str(exc).split())[:200]}). "
                          f"Start a new run instead.") from None
    now = flat_config({k: v for k, v in as_dict(cfg).items() if k != "_target_"})
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


def write_built_base(cfg: TrainConfig, folder: Path) -> None:
    """Build the ``model.build`` base (random weights from ``seed``, unquantised) and write it to ``folder``."""
    tokenizer = load_tokenizer(cfg.model)
    built = dataclasses.replace(cfg.model, quantization="none")
    model = load_model(built, cfg.data.head, cfg.data.num_labels, seed=cfg.seed, tokenizer=tokenizer)
    recover(folder, "config.json")
    tmp, _ = staging(folder)
    save_base(model, tokenizer, tmp)      # whole before the swap: a kill while writing leaves no base
    swap_in(tmp, folder)


