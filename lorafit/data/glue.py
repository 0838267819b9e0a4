"""GLUE benchmark loading: the nine tasks, from local files or the Hugging Face hub.

Local files follow the layout written by the standard GLUE download script::

    <root>/CoLA/{train,dev}.tsv            (no header line)
    <root>/SST-2/{train,dev}.tsv
    <root>/MRPC/{train,dev}.tsv            (starts with a UTF-8 byte-order mark)
    <root>/STS-B/{train,dev}.tsv
    <root>/QQP/{train,dev}.tsv
    <root>/MNLI/{train,dev_matched,dev_mismatched}.tsv
    <root>/QNLI/{train,dev}.tsv
    <root>/RTE/{train,dev}.tsv
    <root>/WNLI/{train,dev}.tsv

Every file is tab separated and read with ``csv.QUOTE_NONE``: quote characters in the
text (common in MNLI and MRPC, sometimes unbalanced) are part of the sentence, not
field quoting. Text is returned exactly as stored (SST-2 sentences keep their trailing
space, as in the hub copy).

Rows come back as plain dicts ``{"idx", "text_a", "text_b", "label"}``; label ids
follow the order of the hub copy ``nyu-mll/glue``.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafit.metrics import ArrayLike, metric_values

HUB_DATASET = "nyu-mll/glue"
"""Hugging Face hub id used by :func:`load_glue_hub`."""

COLA_COLUMNS: tuple[str, ...] = ("source", "label", "original_label", "sentence")
"""Names given to the four positional columns of the header-less CoLA files."""

STSB_SCORE_RANGE: tuple[float, float] = (0.0, 5.0)
"""Inclusive range of STS-B similarity scores."""

_BINARY = ("0", "1")
_NLI_2 = ("entailment", "not_entailment")
_NLI_3 = ("entailment", "neutral", "contradiction")

# Hub split names accepted as synonyms of the file stems.
_HUB_SPLIT_ALIASES = {
    "validation": "dev",
    "validation_matched": "dev_matched",
    "validation_mismatched": "dev_mismatched",
}


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Attributes:
        name: Short task name, e.g. ``"sst2"`` (the hub config name).
        folder: Folder name in the download-script layout, e.g. ``"SST-2"``.
        text_columns: Header names of the one or two text columns (CoLA uses the
            positional names in :data:`COLA_COLUMNS`).
        label_column: Header name of the label column.
        labels: Raw label strings in label-id order; ``None`` for regression.
        dev_splits: File stems of the development splits.
        metrics: Names of the official metrics, as returned by
            :func:`glue_metrics`.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_column: str
    labels: tuple[str, ...] | None
    dev_splits: tuple[str, ...]
    metrics: tuple[str, ...]

    @property
    def num_labels(self) -> int:
        """Number of model outputs: the class count, or 1 for regression."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        """Whether the task has a real-valued target (STS-B)."""
        return self.labels is None

    @property
    def has_header(self) -> bool:
        """Whether the task's files start with a header line (all but CoLA)."""
        return self.name != "cola"


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", "CoLA", ("sentence",), "label", _BINARY, ("dev",), ("mcc",)),
        GlueTask("sst2", "SST-2", ("sentence",), "label", _BINARY, ("dev",), ("accuracy",)),
        GlueTask(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            _BINARY,
            ("dev",),
            ("accuracy", "f1"),
        ),
        GlueTask(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            None,
            ("dev",),
            ("pearson", "spearman"),
        ),
        GlueTask(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            _BINARY,
            ("dev",),
            ("accuracy", "f1"),
        ),
        GlueTask(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            _NLI_3,
            ("dev_matched", "dev_mismatched"),
            ("accuracy",),
        ),
        GlueTask(
            "qnli", "QNLI", ("question", "sentence"), "label", _NLI_2, ("dev",), ("accuracy",)
        ),
        GlueTask(
            "rte", "RTE", ("sentence1", "sentence2"), "label", _NLI_2, ("dev",), ("accuracy",)
        ),
        GlueTask(
            "wnli", "WNLI", ("sentence1", "sentence2"), "label", _BINARY, ("dev",), ("accuracy",)
        ),
    )
}

# Text columns of the hub copy, per task (the hub renames some of them).
_HUB_TEXT_COLUMNS: dict[str, tuple[str, ...]] = {
    "cola": ("sentence",),
    "sst2": ("sentence",),
    "mrpc": ("sentence1", "sentence2"),
    "stsb": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"),
    "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"),
    "rte": ("sentence1", "sentence2"),
    "wnli": ("sentence1", "sentence2"),
}


def get_task(name: str) -> GlueTask:
    """Look up a GLUE task by name.

    Matching ignores case and hyphens, so the folder names (``"SST-2"``,
    ``"STS-B"``) work as well as the short names.

    Args:
        name: Task name, e.g. ``"sst2"``.

    Returns:
        The task description.

    Raises:
        ValueError: If the name is not one of the nine GLUE tasks.
    """
    key = name.strip().lower().replace("-", "") if isinstance(name, str) else None
    if key in GLUE_TASKS:
        return GLUE_TASKS[key]
    raise ValueError(
        f"Unknown GLUE task {name!r}. The allowed task names are: "
        f"{', '.join(GLUE_TASKS)} (case-insensitive; folder names such as 'SST-2' also work)."
    )


def _resolve_split(task: GlueTask, split: str) -> str:
    """Map a split name to the file stem of ``task``.

    ``"dev"`` means the first dev split (``dev_matched`` for MNLI); hub names such
    as ``"validation"`` are accepted as synonyms.
    """
    stem = split.strip() if isinstance(split, str) else split
    stem = _HUB_SPLIT_ALIASES.get(stem, stem)
    if stem == "dev":
        return task.dev_splits[0]
    allowed = ("train", *task.dev_splits)
    if stem not in allowed:
        names = ", ".join(repr(s) for s in dict.fromkeys(("train", "dev", *task.dev_splits)))
        raise ValueError(
            f"Unknown split {split!r} for GLUE task {task.name!r}. The allowed splits are: "
            f"{names} (the test files carry no labels and are not read)."
        )
    return stem


def _hub_split(stem: str) -> str:
    """Hub split name for a file stem: ``dev*`` becomes ``validation*``."""
    return "validation" + stem[len("dev") :] if stem.startswith("dev") else stem


def _missing_file_message(task: GlueTask, root: Path, path: Path) -> str:
    """One-paragraph explanation of why ``path`` was not found, with a hint."""
    message = (
        f"GLUE task {task.name!r}: expected the file {path}, but it does not exist. "
        f"data.path must point at the folder holding the <TASK>/ sub-folders written by the "
        f"GLUE download script (here {task.folder}/{path.name} under data.path={str(root)!r})."
    )
    if not root.is_dir():
        return message + f" The folder {root} itself does not exist."
    if (root / path.name).is_file():
        return message + (
            f" {root / path.name} exists, so data.path seems to point at the task folder "
            f"itself; use its parent {root.parent} instead."
        )
    folder = root / task.folder
    if folder.is_dir():
        present = sorted(p.name for p in folder.iterdir())
        return message + f" The folder {folder} holds: {', '.join(present) or 'nothing'}."
    near = [p.name for p in root.iterdir() if p.name.lower() == task.folder.lower()]
    if near:
        return message + f" Found {near[0]!r}; the folder name must be exactly {task.folder!r}."
    return message + f" There is no {task.folder}/ folder in {root}."


def _split_path(task: GlueTask, root: Path, stem: str) -> Path:
    """Path of a split file, raising a helpful error when it is missing."""
    path = root / task.folder / f"{stem}.tsv"
    if not path.is_file():
        raise FileNotFoundError(_missing_file_message(task, root, path))
    return path


def _tsv_lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield ``(line_number, fields)`` for each non-blank line of a GLUE file.

    Reads with ``utf-8-sig`` (drops the MRPC byte-order mark) and ``QUOTE_NONE``.
    Line numbers are 1-based and count the header line.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            for fields in reader:
                if fields:
                    yield reader.line_num, fields
    except UnicodeDecodeError as exc:
        raise ValueError(f"GLUE file {path} is not valid UTF-8 text: {exc}.") from exc


def _column_positions(
    task: GlueTask, path: Path, columns: list[str]
) -> tuple[list[int], int]:
    """Positions of the text columns and the label column in ``columns``."""
    positions = []
    for name in (*task.text_columns, task.label_column):
        if name not in columns:
            raise ValueError(
                f"GLUE file {path} (task {task.name!r}) has no column {name!r}; the header "
                f"has the columns {columns}. Is this the original GLUE download-script file "
                f"for {task.folder}?"
            )
        positions.append(columns.index(name))
    return positions[:-1], positions[-1]


def _parse_label(task: GlueTask, path: Path, line: int, value: str) -> int | float:
    """Convert a raw label string to a label id, or a float score for STS-B."""
    if task.labels is not None:
        raw = value.strip()
        if raw in task.labels:
            return task.labels.index(raw)
        raise ValueError(
            f"GLUE file {path}, line {line}: unknown label {value!r} in column "
            f"{task.label_column!r}; the allowed labels for {task.name!r} are "
            f"{list(task.labels)}."
        )
    low, high = STSB_SCORE_RANGE
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not math.isfinite(score):
        raise ValueError(
            f"GLUE file {path}, line {line}: the {task.label_column!r} value {value!r} is not "
            f"a number; {task.name!r} needs a similarity score between {low:g} and {high:g}."
        )
    if not low <= score <= high:
        raise ValueError(
            f"GLUE file {path}, line {line}: the {task.label_column!r} value {value!r} is "
            f"outside the range {low:g}..{high:g} of {task.name!r} similarity scores."
        )
    return score


def _read_rows(task: GlueTask, path: Path) -> list[dict[str, Any]]:
    """Parse one split file of ``task`` into row dicts."""
    lines = _tsv_lines(path)
    if task.has_header:
        first = next(lines, None)
        if first is None:
            raise ValueError(f"GLUE file {path} is empty: expected a header line and rows.")
        columns = first[1]
    else:
        columns = list(COLA_COLUMNS)
    text_pos, label_pos = _column_positions(task, path, columns)
    needed = max(*text_pos, label_pos) + 1
    rows: list[dict[str, Any]] = []
    for line, fields in lines:
        if len(fields) < needed:
            raise ValueError(
                f"GLUE file {path}, line {line}: the row has {len(fields)} tab-separated "
                f"fields but at least {needed} are needed (columns {columns[:needed]})."
            )
        texts = [fields[i] for i in text_pos]
        rows.append(
            {
                "idx": len(rows),
                "text_a": texts[0],
                "text_b": texts[1] if len(texts) > 1 else None,
                "label": _parse_label(task, path, line, fields[label_pos]),
            }
        )
    if not rows:
        raise ValueError(f"GLUE file {path} is empty: it holds no data rows.")
    return rows


def read_glue_split(task: str, root: str | os.PathLike, split: str) -> list[dict]:
    """Read one split of a GLUE task from the download-script layout.

    Args:
        task: Task name, e.g. ``"mnli"``.
        root: Folder holding the ``<TASK>/`` sub-folders (``data.path``).
        split: ``"train"``, ``"dev"`` (``dev_matched`` for MNLI) or an explicit
            file stem such as ``"dev_mismatched"``.

    Returns:
        Rows ``{"idx": int, "text_a": str, "text_b": str | None, "label": int | float}``
        in file order; ``idx`` is the 0-based row number.

    Raises:
        FileNotFoundError: If the split file is missing.
        ValueError: For an unknown task or split, an empty file, a missing header
            column, a short row, an unknown label or a bad STS-B score.
    """
    spec = get_task(task)
    root_path = Path(root).expanduser()
    path = _split_path(spec, root_path, _resolve_split(spec, split))
    return _read_rows(spec, path)


def _hub_row(task: GlueTask, idx: int, example: dict[str, Any]) -> dict[str, Any]:
    """Convert one hub example to the row format of :func:`read_glue_split`."""
    texts = [example[c] for c in _HUB_TEXT_COLUMNS[task.name]]
    label = example["label"]
    return {
        "idx": idx,
        "text_a": texts[0],
        "text_b": texts[1] if len(texts) > 1 else None,
        "label": float(label) if task.is_regression else int(label),
    }


def load_glue_hub(task: str, split: str) -> list[dict]:
    """Load one split of a GLUE task from the hub copy ``nyu-mll/glue``.

    Needs network access (or a warm ``datasets`` cache).

    Args:
        task: Task name, e.g. ``"rte"``.
        split: ``"train"``, ``"dev"`` or a file stem such as ``"dev_mismatched"``;
            mapped to ``train`` / ``validation`` / ``validation_mismatched``.

    Returns:
        Rows in the same format as :func:`read_glue_split`.

    Raises:
        ValueError: For an unknown task or split.
        ConnectionError: If the hub copy cannot be loaded.
    """
    spec = get_task(task)
    hub_split = _hub_split(_resolve_split(spec, split))
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(
            "Loading GLUE from the hub needs the 'datasets' package; install it or set "
            "data.path to a local copy of the GLUE download-script files."
        ) from exc
    try:
        dataset = datasets.load_dataset(HUB_DATASET, spec.name, split=hub_split)
    except Exception as exc:  # network, auth and cache failures come in many types
        raise ConnectionError(
            f"Could not load GLUE task {spec.name!r} split {hub_split!r} from the Hugging Face "
            f"hub ({HUB_DATASET}): {type(exc).__name__}: {exc}. This needs network access or a "
            f"cached copy. To work offline, set data.path to the folder holding the <TASK>/ "
            f"sub-folders of the GLUE download script (e.g. <data.path>/{spec.folder}/train.tsv)."
        ) from exc
    return [_hub_row(spec, i, example) for i, example in enumerate(dataset)]


def glue_metrics(task: str, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """The official metrics of a GLUE task.

    Args:
        task: Task name, e.g. ``"mrpc"``.
        predictions: Class ids for classification tasks, floats for STS-B.
        labels: Gold class ids or scores, same length as ``predictions``.

    Returns:
        ``{metric_name: value}`` in the task's metric order, e.g.
        ``{"accuracy": 0.8, "f1": 0.85}`` for MRPC; values are Python floats.

    Raises:
        ValueError: For an unknown task or malformed inputs.
    """
    spec = get_task(task)
    return metric_values(spec.metrics, predictions, labels, regression=spec.is_regression)
