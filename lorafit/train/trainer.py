"""The training loop: one method, one step, on ``accelerate``.

The trainer knows nothing of any method. It owns the data order, accumulation, precision,
clipping, logging, evaluation and checkpoints; what is optimised comes from the task
(:class:`lorafit.task.Task`: ``count_units``, ``forward``, ``evaluate``), and adapters, inits and step
rules reach in only through the callback events of :mod:`lorafit.callbacks`.

What one optimizer step does (:meth:`Trainer.train_step`):

1. take the step's global batch (``data.batch_size`` examples, from a per-epoch permutation
   seeded by ``seed``), keep this process's share, split it into ``grad_accum_steps`` micro-batches;
2. count the loss terms of the whole step on every process (``task.count_units``: examples, or
   labelled tokens);
3. for each micro-batch: ``task.forward`` under autocast, the *summed* loss × processes / global
   count, backward (gradient sync only on the last micro-batch); callbacks may add a regulariser;
4. ``after_backward`` → clip → ``before_optimizer_step`` → the step → ``after_optimizer_step`` →
   scheduler step → zero the gradients.

The step is the optimizer's ``step()``, unless a callback owns it (``Callback.owns_step``, CTR's
trust region): that callback's ``take_step(trainer, closure)`` gets a :class:`StepClosure` that
re-runs the step's forward per micro-batch, and there is no torch optimizer, no scheduler and no
clipping (the rule bounds its own step). Plain optimizers never see a closure.

Normalising by the global count makes the gradient the exact mean over the global batch, so
one process, two processes or several accumulation steps give the same update up to round-off,
and the data order depends only on the step, so a resumed run sees exactly the batches an
uninterrupted one would.

Faults: a step whose loss (or, outside fp16 loss scaling, gradient norm) is NaN or inf stops the
run before the optimizer applies it (:class:`~lorafit.config.ConfigError` naming the step); the
last checkpoint stays as it was and no final adapter is written. SIGINT/SIGTERM let the current
step finish, write a checkpoint and raise :class:`Interrupted`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import torch
from accelerate import Accelerator
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from lorafit.adapters import adapter_state_dict, load_adapter_state, trainable_parameters
from lorafit.adapters.io import Assembled, adapter_files, read_adapter_weights, save_adapter
from lorafit.callbacks import Callback
from lorafit.config import ConfigError, TrainConfig, as_dict, flat_config, to_yaml
from lorafit.console import console
from lorafit.data.batches import collate, collate_packed, pack
from lorafit.files import fault_point, load_state, read_json
from lorafit.models import enable_gradient_checkpointing
from lorafit.train.checkpoint import (checkpoint_dir, latest_checkpoint, prune_checkpoints, rng_state,
                                      set_rng_state)
from lorafit.train import sharding

Batch = dict[str, torch.Tensor]

class StepClosure:
    """The step's forward again, per micro-batch, for the callback that owns the step.

    torch's LBFGS convention (a closure that re-evaluates the loss), widened for a second-order
    rule: ``pieces[i]()`` re-runs this process's micro-batch ``i`` (``batches[i]``) and returns ``(outputs, loss_i)``
    with the graph to the trainable parameters, where the sum of ``loss_i`` over micro-batches and
    processes (:attr:`reduce`) is the step's mean loss. Forwards use the unwrapped model (no
    gradient sync) under the run's autocast. :attr:`start_loss` is that mean loss at the step's
    parameters as the trainer's own forward computed it (shared, not recomputed);
    :meth:`every` gives the same closure over a sub-batch, :meth:`of_step` over another step's batch.
    """

    def __init__(self, trainer: "Trainer", batches: list[Batch], units: float, start_loss: float) -> None:
        model, task, acc = trainer.unwrapped(), trainer.cfg.task, trainer.accelerator

        def piece(batch: Batch):
            def run() -> tuple[Optional[torch.Tensor], torch.Tensor]:
                with acc.autocast():
                    outputs, summed = task.forward(trainer, batch, model)
                return outputs, summed / units
            return run

        self.trainer, self.batches, self.start_loss = trainer, batches, start_loss
        self.pieces = [piece(b) for b in batches]
        self.reduce = ((lambda t: t) if acc.num_processes == 1
                       else (lambda t: acc.reduce(t.to(acc.device), "sum").to(t.device)))

    def every(self, stride: int) -> "StepClosure":
        """The closure over every ``stride``-th row of the step's global batch (rows 0, stride, 2·stride, …
        by position in the global batch, so the choice does not depend on the number of processes or
        micro-batches; with packing, packed rows), its pieces summing to the mean loss over those rows.
        ``stride=1``: itself."""
        if stride == 1:
            return self
        sizes = [len(b["input_ids"]) for b in self.batches]
        offset = self.trainer.accelerator.process_index * sum(sizes)   # this process's first row
        kept = []
        for batch, size in zip(self.batches, sizes):
            rows = [i for i in range(size) if (offset + i) % stride == 0]
            offset += size
            if rows:
                index = torch.tensor(rows, device=batch["input_ids"].device)
                kept.append({k: v.index_select(0, index) for k, v in batch.items()})
        return self._over(kept)

    def of_step(self, step: int) -> "StepClosure":
        """The closure over the global batch of optimizer step ``step`` (its start loss not computed)."""
        return self._over(self.trainer.step_batches(step))

    def _over(self, batches: list[Batch]) -> "StepClosure":
        """A closure over other micro-batches of this process, normalised by their global unit count;
        its start loss is not computed (NaN)."""
        units = float(sum(self.trainer.cfg.task.count_units(b) for b in batches))
        units = float(self.reduce(torch.tensor(units, dtype=torch.float64)))
        return StepClosure(self.trainer, batches, max(units, 1.0), float("nan"))

    @torch.no_grad()
    def loss(self) -> float:
        """The step's mean loss at the current parameters (float64 sum over micro-batches and processes)."""
        total = torch.zeros((), dtype=torch.float64)
        for run in self.pieces:
            total += run()[1].double().cpu()
        return float(self.reduce(total))


class Interrupted(Exception):
    """Training stopped on SIGINT/SIGTERM after writing a checkpoint (the message says where)."""


def diverged(step: int, loss: float, grad_norm: Optional[float], cfg: TrainConfig, last: Optional[Path]) -> ConfigError:
    """The paragraph for a step whose loss or gradient is not finite."""
    what = f"the loss is {loss}" if not math.isfinite(loss) else f"the gradient norm is {grad_norm}"
    kept = (f"The last checkpoint, {last}, is intact" if last is not None else "No checkpoint was written before it")
    lr = getattr(cfg.optimizer, "lr", None)
    cause = (f"the learning rate (optimizer.lr={lr}) is too high for this model and data" if lr is not None
             else "the step rule's settings let the step grow too large")
    fp16 = " or fp16 overflowed (try hardware.mixed_precision=bf16)" if cfg.hardware.mixed_precision == "fp16" else ""
    return ConfigError(f"Training diverged at step {step + 1}: {what}. The update was not applied. {kept}; no "
                       f"final adapter was written. The likely cause: {cause}{fp16}. Train again with a lower "
                       f"optimizer.lr, or with gradient clipping (max_grad_norm=1.0).")


class Trainer:
    """Fit an assembled model on a tokenised training set.

    Args:
        cfg: the validated run config.
        assembled: model + tokenizer + adapter metadata from :func:`lorafit.assemble.assemble`.
        train_set: tokenised training examples (a ``datasets.Dataset``).
        eval_sets: tokenised evaluation splits by result name (``{"sst2": ds}``).
        callbacks: event listeners gathered from the adapter, init and optimizer configs.
        accelerator: the ``accelerate.Accelerator`` of this process.
    """

    def __init__(self, cfg: TrainConfig, assembled: Assembled, train_set: Any, eval_sets: dict[str, Any],
                 callbacks: list[Callback], accelerator: Accelerator) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.output_dir)
        self.assembled = assembled
        self.head = assembled.meta["task"]
        self.pad_id = assembled.tokenizer.pad_token_id
        self.train_set = train_set
        self.eval_sets = eval_sets
        self.callbacks = callbacks
        self.accelerator = accelerator
        self.step = 0  # optimizer steps taken; every schedule counts these

        processes, accum = accelerator.num_processes, cfg.hardware.grad_accum_steps
        batch = cfg.data.batch_size
        if batch % (processes * accum):
            raise ConfigError(f"data.batch_size={batch} is the global batch per optimizer step and must divide "
                              f"evenly across {processes} process(es) × hardware.grad_accum_steps={accum}. "
                              f"Choose a multiple of {processes * accum}.")
        self.micro_batch = batch // (processes * accum)
        self.steps_per_epoch = len(train_set) // batch
        if self.steps_per_epoch == 0:
            raise ConfigError(f"The training set has {len(train_set)} examples, fewer than one global batch "
                              f"(data.batch_size={batch}). Lower data.batch_size.")
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.num_epochs * self.steps_per_epoch))

        if cfg.hardware.gradient_checkpointing:
            enable_gradient_checkpointing(assembled.model)
        self.sharded = cfg.hardware.sharding == "fsdp"
        if self.sharded:
            sharding.check(cfg, callbacks)
            said = sharding.shard(assembled.model, accelerator.device)
            if accelerator.is_main_process:
                console.print(said)
        named = trainable_parameters(assembled.model)
        self.params = [p for _, p in named]
        owners = [cb for cb in callbacks if cb.owns_step]
        if len(owners) > 1:
            raise ConfigError(f"Two callbacks want to own the optimizer step ({', '.join(type(o).__name__ for o in owners)}); "
                              f"only one step rule can run at a time.")
        self.step_owner: Optional[Callback] = owners[0] if owners else None
        optimizer = cfg.optimizer.build(named)        # None when a callback owns the step
        self.scheduler = cfg.optimizer.make_scheduler(optimizer, self.total_steps) if optimizer is not None else None
        if self.sharded:                  # sharded already: accelerate must not wrap it in DDP
            self.model, self.optimizer = assembled.model, optimizer
        elif optimizer is None:
            if self.step_owner is None:
                raise ConfigError(f"optimizer={type(cfg.optimizer).__name__} builds no optimizer and no callback owns "
                                  f"the step; nothing would update the parameters.")
            self.model, self.optimizer = accelerator.prepare(assembled.model), None
        else:
            self.model, self.optimizer = accelerator.prepare(assembled.model, optimizer)
        self._epoch_order: tuple[int, torch.Tensor] = (-1, torch.empty(0))
        self._tracking = False
        self._last_eval: dict[str, dict] = {}

    # ----------------------------------------------------------------- data order
    def step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This process's micro-batches for optimizer step ``step`` (a function of the step alone)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._epoch_order[0] != epoch:
            gen = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            self._epoch_order = (epoch, torch.randperm(len(self.train_set), generator=gen))
        batch = self.cfg.data.batch_size
        share = batch // self.accelerator.num_processes
        chosen = self._epoch_order[1][k * batch:(k + 1) * batch]
        mine = chosen[self.accelerator.process_index * share:(self.accelerator.process_index + 1) * share].tolist()
        device = self.accelerator.device
        if getattr(self.cfg.data, "packing", False):   # the same examples, in rows of max_length tokens
            rows = pack(list(self.train_set.select(mine)), self.cfg.data.max_length)
            batches = [collate_packed(rows[i:i + self.micro_batch], self.pad_id)
                       for i in range(0, len(rows), self.micro_batch)]
        else:
            batches = [collate(list(self.train_set.select(mine[i:i + self.micro_batch])), self.pad_id)
                       for i in range(0, share, self.micro_batch)]
        return [{key: v.to(device) for key, v in batch.items()} for batch in batches]

    # ----------------------------------------------------------------- one step
    def train_step(self, micro_batches: list[Batch]) -> dict[str, float]:
        acc, task = self.accelerator, self.cfg.task
        self.model.train()
        units = sum(task.count_units(b) for b in micro_batches)
        global_units = acc.reduce(torch.tensor(float(units), device=acc.device), "sum").item()
        scale = acc.num_processes / max(global_units, 1.0)
        loss_total = torch.zeros((), dtype=torch.float64, device=acc.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with contextlib.nullcontext() if last else acc.no_sync(self.model):
                with acc.autocast():
                    summed = task.forward(self, batch, self.model)[1]
                    loss = summed * scale
                    if last:
                        for extra in filter(None, (cb.extra_loss(self) for cb in self.callbacks)):
                            loss = loss + extra
                acc.backward(loss)
            loss_total += summed.detach().double()
        mean_loss = acc.reduce(loss_total, "sum").item() / max(global_units, 1.0)
        for cb in self.callbacks:
            cb.after_backward(self)
        grad_norm = None
        if self.cfg.max_grad_norm > 0 and self.sharded:
            grad_norm = sharding.grad_norm(self.params, self.cfg.max_grad_norm)
        elif self.cfg.max_grad_norm > 0 and self.step_owner is None:
            grad_norm = float(acc.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        elif self.cfg.max_grad_norm > 0:   # logged, not clipped: the owner's rule bounds the step
            grad_norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None]))
        scaled = self.cfg.hardware.mixed_precision == "fp16"  # fp16 loss scaling skips inf gradients itself
        if not math.isfinite(mean_loss) or (grad_norm is not None and not math.isfinite(grad_norm) and not scaled):
            self.zero_grad()
            raise diverged(self.step, mean_loss, grad_norm, self.cfg, latest_checkpoint(self.run_dir))
        for cb in self.callbacks:
            cb.before_optimizer_step(self)
        if self.step_owner is not None:
            self.step_owner.take_step(self, StepClosure(self, micro_batches, max(global_units, 1.0), mean_loss))
        else:
            self.optimizer.step()
        for cb in self.callbacks:
            cb.after_optimizer_step(self)
        if self.scheduler is not None:
            self.scheduler.step()
        self.zero_grad()
        self.step += 1
        return {"loss": mean_loss, "grad_norm": grad_norm}

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    @property
    def lr(self) -> float:
        """The learning rate of the first parameter group (0 when a callback owns the step)."""
        return self.scheduler.get_last_lr()[0] if self.scheduler is not None else 0.0

    # ----------------------------------------------------------------- the loop
    def start_tracking(self) -> None:
        """Start the experiment trackers of ``logging.backends`` (accelerate's), with the run's config;
        MLflow, unless ``MLFLOW_TRACKING_URI`` says otherwise, keeps its store in ``RUN/mlflow.db``."""
        settings = self.cfg.logging
        if not self.accelerator.log_with:
            return
        if "mlflow" in self.cfg.trackers() and "MLFLOW_TRACKING_URI" not in os.environ and self.accelerator.is_main_process:
            import mlflow
            mlflow.set_tracking_uri(f"sqlite:///{(self.run_dir / 'mlflow.db').resolve()}")
        name = settings.run_name or self.run_dir.resolve().name
        flat = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_config(as_dict(self.cfg)).items()}
        self.accelerator.init_trackers(settings.project, config=flat, init_kwargs={
            "mlflow": {"run_name": name, "logging_dir": str((self.run_dir / "mlflow").resolve())},
            "wandb": {"name": name, "dir": str(self.run_dir.resolve())}})
        self._tracking = True

    def fit(self) -> dict[str, dict]:
        """Train to ``total_steps`` (resuming if asked), evaluate, save ``RUN/adapter``."""
        self.maybe_resume()
        self.start_tracking()
        for cb in self.callbacks:
            cb.on_train_start(self)
        cfg, acc = self.cfg, self.accelerator
        start_step = self.step
        t0, cpu0 = time.perf_counter(), time.process_time()
        with self.progress_bar() as progress, self.stop_on_signals():
            task_id = progress.add_task("train", total=self.total_steps, completed=self.step, info="")
            while self.step < self.total_steps:
                if self.stop_requested():
                    self.stop()
                t_step = time.perf_counter()
                stats = self.train_step(self.step_batches(self.step))
                stats.update(step=self.step, epoch=self.step / self.steps_per_epoch,
                             lr=self.lr,
                             samples_per_s=cfg.data.batch_size / (time.perf_counter() - t_step),
                             elapsed_s=time.perf_counter() - t0, cpu_s=time.process_time() - cpu0)
                progress.update(task_id, advance=1, info=f"loss {stats['loss']:.4f}  lr {stats['lr']:.2e}  "
                                                          f"{stats['samples_per_s']:.1f} ex/s")
                per_step = {k: v for cb in self.callbacks for k, v in cb.step_metrics(self).items()}
                stats.update(per_step)
                if per_step or (cfg.log_every and (self.step % cfg.log_every == 0 or self.step == self.total_steps)):
                    self.log(stats)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < self.total_steps:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
        results = self.evaluate() if self.eval_sets else {}
        self.save_final()
        if acc.is_main_process:
            steps = self.step - start_step
            console.print(f"[green]done[/]: {steps} steps in {time.perf_counter() - t0:.1f}s; "
                          f"adapter in {self.run_dir / 'adapter'}")
        return results

    # ----------------------------------------------------------------- signals
    @contextlib.contextmanager
    def stop_on_signals(self):
        """While training, SIGINT/SIGTERM ask the loop to stop after the current step (a second
        SIGINT stops at once)."""
        self._signal: Optional[str] = None
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def request(signum: int, frame: Any) -> None:
            if self._signal is not None and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._signal = signal.Signals(signum).name
            if self.accelerator.is_main_process:
                console.print(f"\n[yellow]{self._signal}: stopping after step {self.step + 1}, writing a checkpoint "
                              f"(press Ctrl-C again to stop at once)[/]")

        previous = {sig: signal.signal(sig, request) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """Did any process receive a stop signal? (All processes must agree before stopping.)"""
        asked = self._signal is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor(float(asked), device=self.accelerator.device)
            asked = bool(self.accelerator.reduce(flag, "sum").item() > 0)
        return asked

    def stop(self) -> None:
        """Write a checkpoint of the current step and raise :class:`Interrupted`."""
        found = latest_checkpoint(self.run_dir)
        folder = found if found is not None and found == checkpoint_dir(self.run_dir, self.step) else None
        if folder is None and self.step > 0:
            folder = self.save_checkpoint()
        where = (f"The checkpoint of step {self.step} is in {folder}." if folder is not None
                 else "No step was completed, so there is nothing to resume.")
        raise Interrupted(f"Training stopped by {self._signal or 'a signal'} after step {self.step} of "
                          f"{self.total_steps}. {where}")

    def evaluate(self) -> dict[str, dict]:
        results = {}
        for name, dataset in self.eval_sets.items():
            results[name] = self.cfg.task.evaluate(self, dataset)
            self.log({"step": self.step, "split": name, **{f"eval/{k}": v for k, v in results[name].items()}})
        for cb in self.callbacks:
            cb.on_evaluate(self, results)
        self._last_eval = results
        return results

    # ----------------------------------------------------------------- output
    def progress_bar(self) -> Progress:
        return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                        console=console, disable=not (self.cfg.progress and self.accelerator.is_main_process))

    def log(self, record: dict[str, Any]) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {k: v for k, v in record.items() if v is not None}
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tracking:
            split = record.get("split")
            self.accelerator.log({f"{split or 'train'}/{key.removeprefix('eval/')}": value
                                  for key, value in record.items()
                                  if isinstance(value, (int, float)) and key not in ("step", "split")},
                                 step=record["step"])
        if "split" in record:
            shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4f}" for k, v in record.items()
                              if k.startswith("eval/") and k != "eval/n")
            console.print(f"step {record['step']}: eval {record['split']}: {shown}")

    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)

    def adapter_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors, whole (every process calls it: gathering a sharded model is a collective)."""
        state = adapter_state_dict(self.unwrapped(), self.assembled.meta["modules_to_save"])
        return sharding.full_tensors(state) if self.sharded else state

    def save_final(self) -> None:
        self.accelerator.wait_for_everyone()
        state = self.adapter_state()
        if self.accelerator.is_main_process:
            save_adapter(self.run_dir / "adapter", self.unwrapped(), self.assembled.meta, state)
            if self._last_eval:
                (self.run_dir / "results.json").write_text(json.dumps(self._last_eval, indent=2))
        if self._tracking:
            self.accelerator.end_training()
        self.accelerator.wait_for_everyone()

    def save_checkpoint(self) -> Path:
        """Write ``checkpoints/step-N`` atomically (every process adds its RNG state)."""
        acc = self.accelerator
        final = checkpoint_dir(self.run_dir, self.step)
        tmp = final.with_name(final.name + ".tmp")
        acc.wait_for_everyone()
        state = self.adapter_state()
        optimizer = (None if self.optimizer is None else sharding.optimizer_state(self.model, self.optimizer)
                     if self.sharded else self.optimizer.state_dict())
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a run killed while saving this step
            save_adapter(tmp / "adapter", self.unwrapped(), self.assembled.meta, state)
            (tmp / "config.yaml").write_text(to_yaml(self.cfg))
            torch.save({"step": self.step, "optimizer": optimizer,
                        "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
                        "callbacks": [cb.state_dict() for cb in self.callbacks],
                        "num_processes": acc.num_processes, "grad_accum_steps": self.cfg.hardware.grad_accum_steps},
                       tmp / "trainer_state.pt")
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng_state_{acc.process_index}.pt")
        acc.wait_for_everyone()
        if acc.is_main_process:
            fault_point("checkpoint:written")
            tmp.rename(final)
            prune_checkpoints(self.run_dir, self.cfg.keep_checkpoints)
        for cb in self.callbacks:
            cb.on_save(self, final)
        acc.wait_for_everyone()
        return final

    def maybe_resume(self) -> None:
        if not self.cfg.resume:  # lorafit.run.train refused a fresh run over checkpoints already
            return
        found = latest_checkpoint(self.run_dir)
        if found is None:
            if self.accelerator.is_main_process:
                console.print(f"[yellow]resume=true but no checkpoint in {self.run_dir}; starting from step 0[/]")
            return
        saved_meta = read_json(adapter_files(found / "adapter")[0], "Checkpoint adapter config")
        if saved_meta.get("base_fingerprint") != self.assembled.meta["base_fingerprint"]:
            raise ConfigError(f"resume=true: the base model '{self.cfg.model.name_or_path}' is not the one the checkpoint "
                              f"{found} was trained on (weights fingerprint {self.assembled.meta['base_fingerprint']}, "
                              f"expected {saved_meta.get('base_fingerprint')}). Point model.name_or_path at the original "
                              f"base ('{saved_meta.get('base_model')}').")
        adapter = read_adapter_weights(found / "adapter", "Checkpoint adapter file")
        if self.sharded:
            sharding.load_adapter(self.model, adapter)
        else:
            load_adapter_state(self.unwrapped(), adapter)
        state = load_state(found / "trainer_state.pt")
        if self.optimizer is not None and self.sharded:
            sharding.load_optimizer(self.model, self.optimizer, state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        elif self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        for cb, cb_state in zip(self.callbacks, state["callbacks"]):
            cb.load_state_dict(cb_state)
        self.step = state["step"]
        rng_file = found / f"rng_state_{self.accelerator.process_index}.pt"
        if rng_file.is_file():
            set_rng_state(load_state(rng_file))
        if self.accelerator.is_main_process:
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            console.print(f"resumed from {found} (step {self.step} of {self.total_steps})")
            before = state.get("num_processes")
            if before is not None and before != self.accelerator.num_processes:
                console.print(f"note: the run had {before} process(es) and now has {self.accelerator.num_processes}; "
                              f"the update is the same up to round-off")
