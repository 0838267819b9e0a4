"""``lorafit train -m KEY=a,b KEY2=x,y ...``: a sweep, one training run per combination.

Hydra's compose API (what ``lorafit train`` uses) refuses sweep syntax, so :func:`expand` parses the
overrides with Hydra's own override parser and takes the cartesian product of every sweep override
(``a,b``, ``choice(a,b)``, ``range(1,4)``); the other overrides are common to all runs. Every run's
config is composed and validated before the first one starts (``lorafit.cli``), so a key that one
option lacks (``optimizer.lr`` under ``optimizer=ctr``) stops the sweep before anything is written.

The sweep folder (``output_dir``) holds one run folder per combination, named after its swept
values (``init=pissa,optimizer.lr=0.0003``), and the sweep's marker ``lorafit_sweep.json``, which
lists every run's overrides and folder (the manifest ``lorafit report SWEEP`` reads). Runs go one
after another. Running the same command again skips finished runs (their final adapter is
written) and resumes interrupted ones from their latest checkpoint (``resume=true`` of that run).
A run that fails is reported and the others still run; the command ends with a summary and exit
code 2 (1 if a failure was a bug in lorafit).

Folder rules (those of :mod:`lorafit.files`): the sweep folder must be new, empty, or an earlier
sweep whose marker lists everything in it; the earlier sweep's common overrides must equal this
one's (keys that do not change the maths, like ``progress``, aside). New combinations may be added
to an earlier sweep (another learning rate); nothing lorafit did not write is touched.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from lorafit.config import GROUP_ALIASES, KEY_ALIASES, ConfigError
from lorafit.console import console, results_console
from lorafit.files import marker_name, read_json
from lorafit.train.checkpoint import is_run_folder

SWEEP_MARKER = marker_name("sweep")
"""``lorafit_sweep.json``: marks a sweep folder and lists its runs (their overrides and folders)."""
NOT_SWEPT = ("output_dir", "resume", "overwrite", "hardware.num_processes")
"""Keys a sweep decides itself (the root folder, resuming) or cannot vary (the process count)."""
HARMLESS = ("output_dir", "progress", "eval_every", "save_every", "log_every", "keep_checkpoints", "logging.",
            "tensorboard", "data.eval_batch_size")
"""Common overrides that may change between two invocations of one sweep: they change neither the
training nor the final dev metric (``save_every`` may be added to make the runs resumable)."""


@dataclass
class SweepRun:
    """One combination of a sweep.

    Attributes:
        folder: its run folder's name under the sweep folder.
        swept: the swept keys (canonical: ``optimizer.lr``, not ``optim.lr``) and their values here.
        overrides: the full override list of this run (common ones and its swept values, in the
            order of the command line).
    """

    folder: str
    swept: dict[str, str]
    overrides: list[str]


def canonical_key(key: str) -> str:
    """``+optim.lr`` → ``optimizer.lr``; ``reward.run`` → ``task.reward.run`` (how a key is compared)."""
    bare = key.lstrip("+~")
    head, dot, rest = bare.partition(".")
    if dot and head in KEY_ALIASES:
        return f"{KEY_ALIASES[head]}.{rest}"
    return GROUP_ALIASES.get(head, head) + dot + rest


def parse(overrides: Sequence[str]) -> list:
    """Hydra's parse of the overrides (``Override`` objects); a syntax error becomes a ConfigError."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as exc:
        text = " ".join(str(exc).split())
        raise ConfigError(f"Could not parse the overrides: {text}. Write each as key=value; a sweep as "
                          f"key=a,b,c, key=choice(a,b) or key=range(start,stop[,step]).") from None


def is_sweep(overrides: Sequence[str]) -> Optional[str]:
    """The first override that sweeps several values (``optimizer.lr=1e-4,3e-4``), or None."""
    return next((o.input_line for o in parse(overrides) if o.is_sweep_override()), None)


def expand(overrides: Sequence[str]) -> tuple[list[str], list[SweepRun]]:
    """(the common overrides, one :class:`SweepRun` per combination of the sweep overrides).

    Raises:
        ConfigError: an ``interval(...)`` sweep (a range of reals has no finite product), a key swept
            twice, or a key the sweep decides itself (:data:`NOT_SWEPT`).
    """
    parsed = parse(overrides)
    swept, common, seen = [], [], set()
    for o in parsed:
        key = canonical_key(o.get_key_element())
        if not o.is_sweep_override():
            common.append(o.input_line)
            continue
        if "INTERVAL" in o.value_type.name:
            raise ConfigError(f"{o.input_line}: an interval sweep draws real numbers at random, which only an "
                              f"optimiser of hyperparameters can use. List the values instead, e.g. "
                              f"{o.get_key_element()}=1e-4,3e-4,1e-3.")
        if key in seen:
            raise ConfigError(f"{key} is swept twice ({o.input_line}). Give all its values in one override, "
                              f"e.g. {key}=a,b,c.")
        if key.startswith(NOT_SWEPT):
            raise ConfigError(f"{o.input_line}: {key} cannot be swept. output_dir is the sweep folder (one run "
                              f"folder per combination goes inside it), a sweep resumes its runs by itself, and "
                              f"every run of a sweep uses the same processes. Give one value.")
        seen.add(key)
        swept.append((o, key, [str(v) for v in o.sweep_string_iterator()]))
    runs = []
    for values in itertools.product(*(vals for _, _, vals in swept)):
        chosen = {id(o): value for (o, _, _), value in zip(swept, values)}
        full = [f"{o.get_key_element()}={chosen[id(o)]}" if id(o) in chosen else o.input_line for o in parsed]
        named = {key: value for (_, key, _), value in zip(swept, values)}
        runs.append(SweepRun(folder=folder_name(named), swept=named, overrides=full))
    _distinct_folders(runs)
    return common, runs


def folder_name(swept: dict[str, str]) -> str:
    """A run folder's name from its swept values: ``init=pissa,optimizer.lr=0.0003`` with every
    character but letters, digits and ``._=,+-`` replaced by ``_`` (``run`` if nothing is swept)."""
    text = ",".join(f"{k}={v}" for k, v in swept.items()) or "run"
    name = re.sub(r"[^\w.=,+-]", "_", text)
    if len(name) > 120 or name.startswith("."):
        name = name[:100].lstrip(".") + "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return name


def _distinct_folders(runs: list[SweepRun]) -> None:
    """Two combinations whose names differ only in replaced characters get a hash of their values."""
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.folder] = counts.get(run.folder, 0) + 1
    for run in runs:
        if counts[run.folder] > 1:
            run.folder += "-" + hashlib.sha1(json.dumps(run.swept).encode()).hexdigest()[:8]


# ------------------------------------------------------------------------------ the sweep folder
def comparable(common: Sequence[str]) -> list[str]:
    """The common overrides that change what a run computes or reports, canonical and sorted (what
    two invocations of one sweep must agree on; :data:`HARMLESS` aside)."""
    out = []
    for item in common:
        key, _, value = item.partition("=")
        key = canonical_key(key)
        if not key.startswith(HARMLESS):
            out.append(f"{key}={value}")
    return sorted(out)


def claim_sweep(root: Path, common: list[str], recipe: Optional[str], runs: list[SweepRun]) -> dict:
    """Check that the sweep may use ``root``; the manifest to write there (an earlier one extended).

    Raises:
        ConfigError: ``root`` is a file, holds files lorafit did not write, holds a single run, or
            holds a sweep with other common overrides (or another recipe).
    """
    if root.exists() and not root.is_dir():
        raise ConfigError(f"output_dir={root} is a file, not a folder. Choose another output_dir for the sweep.")
    entries = sorted(p.name for p in root.iterdir() if p.name != _TMP) if root.is_dir() else []
    recipe_text = _recipe_id(recipe)
    manifest = {"command": "sweep", "common": list(common), "recipe": recipe_text, "runs": [], "files": []}
    if entries:
        marker = root / SWEEP_MARKER
        if not marker.is_file():
            what = ("a single `lorafit train` run" if is_run_folder(root) else
                    "files lorafit did not write (" + ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "") + ")")
            raise ConfigError(f"output_dir={root} holds {what}, not a sweep. lorafit never deletes or overwrites what "
                              f"it did not write, and a sweep needs a folder of its own: choose a new or empty "
                              f"output_dir.")
        earlier = read_json(marker, "Sweep manifest")
        if not isinstance(earlier, dict) or not isinstance(earlier.get("runs"), list) or "common" not in earlier:
            raise ConfigError(f"Sweep manifest {marker} is damaged (it lacks the runs or common overrides lorafit "
                              f"writes). Choose a new output_dir for the sweep.")
        foreign = [e for e in entries if e != SWEEP_MARKER and e not in earlier.get("files", [])]
        if foreign:
            raise ConfigError(f"The sweep folder {root} holds files lorafit did not write ({', '.join(foreign[:5])}). "
                              f"Move them away, or choose another output_dir.")
        before, now = comparable(earlier["common"]), comparable(common)
        if before != now or earlier.get("recipe") != recipe_text:
            gone = [o for o in before if o not in now]
            new = [o for o in now if o not in before]
            recipe_note = (f" The recipe was {earlier.get('recipe')} and is now {recipe_text}."
                           if earlier.get("recipe") != recipe_text else "")
            raise ConfigError(f"The sweep folder {root} holds a sweep started with other settings: "
                              f"{'; '.join(gone) or 'nothing'} then, {'; '.join(new) or 'nothing'} now.{recipe_note} "
                              f"Its finished runs would not be comparable with new ones. Re-run it with the earlier "
                              f"settings (to finish or extend it), or choose another output_dir.")
        manifest["common"] = earlier["common"]
        manifest["runs"] = list(earlier["runs"])
    known = {r["folder"] for r in manifest["runs"]}
    manifest["runs"] += [asdict(r) for r in runs if r.folder not in known]
    manifest["files"] = [r["folder"] for r in manifest["runs"]]
    for run in runs:
        folder = root / run.folder
        if folder.is_dir() and any(folder.iterdir()) and not is_run_folder(folder):
            raise ConfigError(f"The sweep's run folder {folder} holds files lorafit did not write. Move them away, "
                              f"or choose another output_dir.")
    return manifest


_TMP = f".{SWEEP_MARKER}.tmp"


def _recipe_id(recipe: Optional[str]) -> Optional[str]:
    """A recipe as the manifest records it: its path and a hash of its text (an edited recipe differs)."""
    if recipe is None:
        return None
    digest = hashlib.sha256(Path(recipe).read_bytes()).hexdigest()[:12]
    return f"{recipe} (sha256 {digest})"


def write_manifest(root: Path, manifest: dict) -> None:
    """Write ``lorafit_sweep.json`` whole (a temporary file renamed over it)."""
    from lorafit import __version__

    root.mkdir(parents=True, exist_ok=True)
    tmp = root / _TMP
    tmp.write_text(json.dumps({**manifest, "lorafit_version": __version__}, indent=2))
    os.replace(tmp, root / SWEEP_MARKER)


def finished(folder: Path) -> bool:
    """Has this run written its final adapter? (Written whole, last but for results.json.)"""
    from lorafit.adapters.io import ADAPTER_CONFIG

    return (folder / "adapter" / ADAPTER_CONFIG).is_file()


# --------------------------------------------------------------------------------------- running
Failure = Callable[[BaseException, Path], tuple[int, str, str]]


def run_sweep(root: Path, runs: list[SweepRun], configs: list, train_one: Callable, describe: Failure) -> int:
    """Train each run in turn (finished ones skipped, interrupted ones resumed); a summary; the exit code.

    Args:
        root: the sweep folder (claimed, manifest written).
        runs, configs: each combination and its validated config.
        train_one: trains one validated config (``lorafit.run.train``).
        describe: (exit code, label, paragraph) of a run's failure (the CLI's error boundary).

    A failed run is reported and the others still run; Ctrl-C or SIGTERM stops the whole sweep after
    writing the current run's checkpoint (running the command again resumes it).
    """
    from lorafit.train.trainer import Interrupted

    outcome: list[tuple[SweepRun, str, str]] = []
    codes = []
    for number, (run, cfg) in enumerate(zip(runs, configs), start=1):
        folder = root / run.folder
        head = f"sweep run {number}/{len(runs)}: {run.folder}"
        if finished(folder):
            console.print(f"[bold]{head}[/]: finished earlier, skipped")
            outcome.append((run, "skipped", "finished earlier"))
            continue
        cfg.output_dir = str(folder)
        cfg.resume = folder.is_dir() and any(folder.iterdir())
        console.print(f"[bold]{head}[/]{' (resuming)' if cfg.resume else ''} → {folder}")
        try:
            train_one(cfg)
            outcome.append((run, "done", ""))
        except (Interrupted, KeyboardInterrupt):
            raise
        except Exception as exc:  # any failure of one run: say why, go on with the others
            code, label, text = describe(exc, folder)
            console.print(f"[bold red]{head}: {label}:[/] ", end="")
            console.print(text, markup=False, highlight=False)
            outcome.append((run, "failed", text))
            codes.append(code)
        finally:
            _release_memory()
    _summary(root, outcome)
    return max(codes, default=0)


def _release_memory() -> None:
    """Free the finished run's model before the next one is built."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _summary(root: Path, outcome: list[tuple[SweepRun, str, str]]) -> None:
    from rich.table import Table

    table = Table(title=f"lorafit train -m: {root}")
    for column in ("run", "status", "note"):
        table.add_column(column)
    for run, status, note in outcome:
        style = {"failed": "red", "done": "green"}.get(status, "")
        table.add_row(run.folder, f"[{style}]{status}[/]" if style else status, note[:120])
    results_console.print(table)
    failed = sum(1 for _, status, _ in outcome if status == "failed")
    tail = (f"{failed} of {len(outcome)} runs failed (messages above); fix the cause and run the same command "
            f"again: finished runs are skipped." if failed else "")
    console.print(f"{tail} Compare the runs: lorafit report {root}".strip())
