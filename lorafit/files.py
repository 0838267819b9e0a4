"""Files in and out: every read names the file at fault, every write is recoverable, and nothing
lorafit did not write is ever deleted or overwritten.

Reading:

- :func:`read_text` accepts UTF-8 with or without a byte-order mark and any line ending;
  :func:`read_rows` reads a JSON list or JSONL (blank lines allowed) and names the row at fault;
- :func:`load_tensors` (safetensors) and :func:`load_state` (``torch.load(weights_only=True)``,
  which can never run code from the file) turn a truncated or hostile file into a
  :class:`~lorafit.config.ConfigError` naming it.

Writing a folder (``lorafit merge OUT``, ``eval output_dir=``, ``report --output-dir``, ``RUN/adapter``):

1. :func:`claim_output` decides whether the folder may be written: it must be absent or empty,
   or hold lorafit's *marker* for that command (``lorafit_<command>.json``, which lists the
   files written) and nothing else — and then only if the user asked to ``overwrite``;
2. the new content is written into a hidden sibling ``.<name>.lorafit-new`` (marker last);
3. :func:`publish` swaps it in: the old folder goes aside to ``.<name>.lorafit-old``, the new one
   takes its name, the old one is deleted.

POSIX cannot replace a non-empty folder atomically, so a kill -9 can stop between two renames;
:func:`recover`, run before each write, then rolls forward (the new folder is complete: its marker
is there) or back (it is not). Every state a kill can leave is therefore the old folder, the new
one, or one the next command finishes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import torch

from lorafit.config import ConfigError

KILL_AT = "LORAFIT_KILL_AT"
"""Test hook: a process with this variable set to a point's name kills itself there (see :func:`fault_point`)."""


def fault_point(name: str) -> None:
    """Die here with SIGKILL if ``$LORAFIT_KILL_AT`` names this point (tests of crash recovery)."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------------- reading
def read_text(path: Path, what: str = "File") -> str:
    """The text of ``path`` (UTF-8, a byte-order mark dropped, ``\\r\\n`` and ``\\r`` read as ``\\n``)."""
    path = Path(path)
    if not path.is_file():
        hint = " It is a folder; give the file inside it." if path.is_dir() else ""
        raise ConfigError(f"{what} {path} does not exist.{hint} Check the path.")
    try:
        with open(path, encoding="utf-8-sig") as handle:  # universal newlines
            return handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {exc.start}: {exc.reason}). "
                          f"Save it as UTF-8.") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror}.") from None


def read_json(path: Path, what: str = "File") -> Any:
    """Parse a JSON file, naming it and the line of a syntax error."""
    text = read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
                          f"{exc.msg}).") from None


def read_rows(path: Path, required: Iterable[str] = (), what: str = "Data file") -> list[dict]:
    """Rows of a JSON list or a JSONL file (blank lines skipped); each must be an object holding ``required``."""
    text = read_text(path, what)
    if not text.strip():
        raise ConfigError(f"{what} {path} is empty. It must hold a JSON list of objects or one JSON object per line.")
    if text.lstrip().startswith("["):
        rows = read_json(path, what)
        numbered = list(enumerate(rows))
        where = "row"
    else:
        numbered, where = [], "line"
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{what} {path}, line {number}: not valid JSON ({exc.msg}, column {exc.colno}). "
                                  f"Each line of a JSONL file must be one JSON object.") from None
    required = tuple(required)
    for number, row in numbered:
        if not isinstance(row, dict):
            raise ConfigError(f"{what} {path}, {where} {number}: expected a JSON object with the fields "
                              f"{', '.join(required) or '...'}, got {type(row).__name__} {str(row)[:60]!r}.")
        missing = [k for k in required if k not in row]
        if missing:
            raise ConfigError(f"{what} {path}, {where} {number}: missing field(s) {', '.join(missing)} "
                              f"(required: {', '.join(required)}). Fix or drop that {where}.")
    if not numbered:
        raise ConfigError(f"{what} {path} holds no rows.")
    return [row for _, row in numbered]


def load_tensors(path: Path, what: str = "Adapter file") -> dict[str, torch.Tensor]:
    """A safetensors file, or a ConfigError naming it if it is missing, truncated or corrupt."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist. The folder is incomplete; use another checkpoint or "
                          f"train again.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path} is damaged and cannot be read ({' '.join(str(exc).split())}). "
                          f"It was probably cut short; use another checkpoint or train again.") from None


def load_state(path: Path, what: str = "Checkpoint file") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only, so a hostile file cannot run code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist. The checkpoint is incomplete; delete it to resume "
                          f"from the one before, or train again.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and format errors share no base class
        reason = " ".join(str(exc).split())[:300]
        raise ConfigError(f"{what} {path} cannot be loaded safely ({type(exc).__name__}: {reason}). It is damaged, or "
                          f"it holds Python objects beyond tensors and plain data, which lorafit never unpickles. "
                          f"Delete that checkpoint to resume from the one before, or train again.") from None


# ------------------------------------------------------------------------------------- writing
def marker_name(command: str) -> str:
    """The file that marks a folder as written by ``lorafit <command>`` (``lorafit_merge.json``)."""
    return f"lorafit_{command}.json"


def staging(folder: Path) -> tuple[Path, Path]:
    """The hidden siblings used while replacing ``folder``: (new content, old content set aside)."""
    folder = Path(folder)
    return folder.with_name(f".{folder.name}.lorafit-new"), folder.with_name(f".{folder.name}.lorafit-old")


def recover(folder: Path, marker: str) -> None:
    """Finish or undo a replacement of ``folder`` that a killed process left half done."""
    new, old = staging(folder)
    if not folder.exists() and old.exists():
        if (new / marker).is_file():
            os.replace(new, folder)      # the new folder was complete: roll forward
        else:
            os.replace(old, folder)      # it was not: roll back
    for leftover in (new, old):
        if leftover.exists():
            shutil.rmtree(leftover)


def _same_or_inside(path: Path, other: Path) -> bool:
    path, other = path.resolve(), other.resolve()
    return path == other or other in path.parents


def claim_output(folder: Path, command: str, overwrite: bool, flag: str,
                 protected: Iterable[Path] = ()) -> Path:
    """Check that ``lorafit <command>`` may write ``folder``; return the empty staging folder to write into.

    Args:
        folder: the output folder the user named.
        command: ``merge``, ``eval``, ``report`` … (names the marker file).
        overwrite: the user asked to replace an earlier output of the same command.
        flag: how the user says so, for the message (``--overwrite`` or ``overwrite=true``).
        protected: folders the output must neither be nor lie inside (the run being merged).

    Raises:
        ConfigError: the folder holds files lorafit did not write, an output of another command, an
            output of this command without ``overwrite``, or lies inside a protected folder.
    """
    folder = Path(folder)
    marker = marker_name(command)
    for guarded in protected:
        if _same_or_inside(folder, Path(guarded)) or _same_or_inside(Path(guarded), folder):
            raise ConfigError(f"The output folder {folder} is, or lies inside or around, {guarded}, which this command "
                              f"reads. Writing there would destroy its input. Choose a folder outside it, e.g. "
                              f"{Path(guarded).resolve().parent / (Path(guarded).name + '-' + command)}.")
    recover(folder, marker)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"The output path {folder} is a file, not a folder. Choose another output path.")
    entries = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    if entries:
        written = _written_files(folder / marker)
        if written is None:
            shown = ", ".join(entries[:5]) + (", …" if len(entries) > 5 else "")
            raise ConfigError(f"The output folder {folder} already exists and holds files lorafit did not write "
                              f"({shown}). lorafit never deletes or overwrites what it did not write: choose a new "
                              f"or empty folder.")
        foreign = [e for e in entries if e not in written and e != marker]
        if foreign:
            raise ConfigError(f"The output folder {folder} holds an earlier `lorafit {command}` output plus files "
                              f"lorafit did not write ({', '.join(foreign[:5])}). Move those files away, or choose "
                              f"another folder.")
        if not overwrite:
            raise ConfigError(f"The output folder {folder} holds an earlier `lorafit {command}` output. Pass {flag} "
                              f"to replace it, or choose another folder.")
    new, _ = staging(folder)
    new.mkdir(parents=True)
    return new


@contextlib.contextmanager
def new_output(folder: Path, command: str, overwrite: bool, flag: str,
               protected: Iterable[Path] = ()) -> Iterator[Path]:
    """:func:`claim_output`, then yield the staging folder; it is removed if the block fails
    (the block ends with :func:`publish`)."""
    tmp = claim_output(folder, command, overwrite, flag, protected)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _written_files(marker: Path) -> Optional[set[str]]:
    """The file names a marker says its command wrote, or None if there is no readable marker."""
    if not marker.is_file():
        return None
    try:
        files = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (json.JSONDecodeError, OSError, AttributeError, UnicodeDecodeError):
        return None
    return set(files) if isinstance(files, list) else None


def publish(new: Path, folder: Path, command: str, record: Optional[dict] = None) -> None:
    """Write the marker into ``new`` (last), then swap ``new`` in as ``folder`` (see the module docstring)."""
    from lorafit import __version__

    marker = marker_name(command)
    files = sorted(p.name for p in new.iterdir() if p.name != marker)
    content = {"command": command, "lorafit_version": __version__, **(record or {}), "files": files}
    (new / marker).write_text(json.dumps(content, indent=2))
    swap_in(new, folder)


def swap_in(new: Path, folder: Path) -> None:
    """Replace ``folder`` (if any) by the complete folder ``new`` through the ``.lorafit-old`` sibling."""
    _, old = staging(folder)
    if folder.exists():
        os.replace(folder, old)
        fault_point("publish:old-moved")
        os.replace(new, folder)
        fault_point("publish:new-in-place")
        shutil.rmtree(old)
    else:
        os.replace(new, folder)


def check_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing ``needed`` bytes under ``folder`` if the disk has less room than that."""
    probe = Path(folder).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise ConfigError(f"Not enough disk space for {what} in {folder}: it needs about {needed / 2**30:.2f} GiB "
                          f"(the new copy is written before the old one is removed), and {probe} has "
                          f"{free / 2**30:.2f} GiB free. Free some space or choose another output folder.")
