"""The run folder and its step checkpoints: adapter + optimizer/scheduler/RNG/callback state.

A run folder (``output_dir``) holds what :data:`RUN_ENTRIES` lists, marked by ``lorafit_train.json``.

``RUN/checkpoints/step-000050/`` holds the adapter files (as ``RUN/adapter/``), the run's
``config.yaml``, and ``trainer_state.pt`` (optimizer, scheduler, step, callbacks, process layout)
plus ``rng_state_<rank>.pt`` for each process. Every ``.pt`` file holds tensors and plain Python
data only, and is read with ``torch.load(weights_only=True)``: a checkpoint from an untrusted source
cannot run code. A checkpoint is written into ``step-000050.tmp`` and renamed when complete, so a
run killed at any moment leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

STEP_DIR = re.compile(r"^step-(\d+)$")

RUN_MARKER = "lorafit_train.json"
RUN_ENTRIES = ("config.yaml", "metrics.jsonl", "results.json", "adapter", "checkpoints", "cache", "base", "tb",
               "mlflow.db", "mlflow", "wandb", "error.log", RUN_MARKER)
"""What ``lorafit train`` writes into a run folder; ``overwrite=true`` removes these and nothing else."""


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain data (numpy's array becomes a list)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The complete checkpoint with the highest step, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return max(found)[1] if found else None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    root = Path(run_dir) / "checkpoints"
    found = sorted(p for p in root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def is_run_folder(folder: Path) -> bool:
    """A folder written by ``lorafit train``: this version's marker, an earlier version's layout, or
    step checkpoints (a run's ``checkpoints/`` copied elsewhere to resume from)."""
    return ((folder / RUN_MARKER).is_file() or latest_checkpoint(folder) is not None
            or ((folder / "config.yaml").is_file() and any(
                (folder / name).exists() for name in ("adapter", "checkpoints", "metrics.jsonl"))))
