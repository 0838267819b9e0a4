"""Results people can read: the results table on screen, ``results.json`` + ``results.md`` in an
eval output folder, and ``lorafit report``.

``lorafit report RUN_DIR [RUN_DIR ...] [--output-dir DIR]`` puts runs side by side: each folder's
``results.json`` (a training run's final dev metrics or a ``lorafit eval`` output folder) becomes a
column of one metrics table (best value per row in bold), each ``config.yaml`` a row of a run
table, and each ``metrics.jsonl`` a training-loss curve in ``loss.png``. The tables are printed
and written to ``DIR/report.md`` (default ``DIR``: ``report/``).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Optional

from rich.table import Table

from lorafit.config import ConfigError, EvalConfig
from lorafit.console import console, results_console
from lorafit.files import new_output, publish
from lorafit.train.checkpoint import is_run_folder

LOWER_IS_BETTER = ("loss", "perplexity", "no_answer")
UNRANKED = ("n", "protocol")


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_markdown(results: dict[str, dict], title: str = "") -> str:
    """One run's results as a markdown table: a row per task, a column per metric."""
    metrics = list(dict.fromkeys(k for values in results.values() for k in values))
    lines = [f"# {title}", ""] if title else []
    lines.append("| task | " + " | ".join(metrics) + " |")
    lines.append("|---|" + "---|" * len(metrics))
    for task, values in results.items():
        lines.append(f"| {task} | " + " | ".join(_fmt(values.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


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
    results_console.print(table)


def save_eval(path: str, cfg: EvalConfig, results: dict[str, dict], title: str, write_predictions: Any) -> None:
    """Write ``results.json`` / ``results.md`` (and predictions) into ``cfg.output_dir``, if set."""
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


def write_results(out_dir: Path, results: dict[str, dict], title: str = "") -> None:
    """Write ``results.json`` and its markdown table ``results.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.md").write_text(results_markdown(results, title))


# ------------------------------------------------------------------------------------ report
def _labels(folders: list[Path]) -> list[str]:
    """Short, distinct column names: the folder names, or paths below their common parent."""
    names = [f.name for f in folders]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(f.resolve()) for f in folders]))
    return [str(f.resolve().relative_to(common)) or f.name for f in folders]


def _read_json(file: Path) -> Optional[dict]:
    from lorafit.files import read_json

    if not file.is_file():
        return None
    data = read_json(file, "Results file")
    if not isinstance(data, dict):
        raise ConfigError(f"Results file {file} holds a JSON {type(data).__name__}, not the {{task: metrics}} object "
                          f"lorafit writes. Re-run the command that wrote it.")
    return data


def _train_curve(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) of the training records of ``metrics.jsonl`` (evaluation rows skipped)."""
    file = folder / "metrics.jsonl"
    if not file.is_file():
        return []
    curve = []
    from lorafit.files import read_text

    for line in read_text(file, "Metrics file").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
        if "split" not in record and isinstance(record.get("loss"), (int, float)) and "step" in record:
            curve.append((int(record["step"]), float(record["loss"])))
    return curve


def _run_summary(folder: Path) -> dict[str, str]:
    """model / adapter / optimizer / data of a training run's ``config.yaml`` (empty if none)."""
    file = folder / "config.yaml"
    if not file.is_file():
        return {}
    from omegaconf import OmegaConf

    try:
        cfg = OmegaConf.to_container(OmegaConf.load(file))
    except Exception as exc:  # YAML errors come in many types
        raise ConfigError(f"Run config {file} cannot be read ({' '.join(str(exc).split())[:200]}). It was damaged; "
                          f"leave that folder out of the report.") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"Run config {file} is not a mapping of config keys. Leave that folder out of the report.")

    def name(group: str) -> str:
        node = cfg.get(group) or {}
        return str(node.get("_target_", "")).rsplit(".", 1)[-1].removesuffix("Config").removesuffix("Data")

    adapter = cfg.get("adapter") or {}
    optimizer = cfg.get("optimizer") or {}
    data = cfg.get("data") or {}
    model = Path(str((cfg.get("model") or {}).get("name_or_path", "")))
    return {"model": f"{model.parent.name}/{model.name}" if model.name == "model" else model.name,
            "adapter": f"{name('adapter')} r={adapter.get('r', '')}",
            "optimizer": f"{name('optimizer')} lr={optimizer.get('lr', '')}",
            "data": f"{name('data')} {data.get('task') or ','.join(data.get('tasks') or [])}".strip(),
            "steps": str(cfg.get("max_steps") or "")}


def _best(values: list[Any], metric: str) -> Optional[float]:
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if metric in UNRANKED or len(numbers) < 2:
        return None
    return min(numbers) if metric in LOWER_IS_BETTER else max(numbers)


def comparison_rows(results: list[dict[str, dict]]) -> list[tuple[str, str, list[Any]]]:
    """(task, metric, value per run) for every task and metric any run reports (tasks and their
    metrics in first-seen order, the rows of one task together)."""
    keys: dict[str, dict[str, None]] = {}
    for res in results:
        for task, values in res.items():
            if isinstance(values, dict):
                keys.setdefault(task, {}).update(dict.fromkeys(values))
    def order(metric: str) -> int:  # the protocol first, the counts last
        return {"protocol": 0, "n": 2}.get(metric, 1)

    return [(task, metric, [res.get(task, {}).get(metric) for res in results])
            for task, metrics in keys.items() for metric in sorted(metrics, key=order)]


def comparison_markdown(labels: list[str], results: list[dict[str, dict]]) -> str:
    """The side-by-side metrics table (the best value of each row in bold)."""
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---|" * len(labels)]
    for task, metric, values in comparison_rows(results):
        best = _best(values, metric)
        cells = [f"**{_fmt(v)}**" if best is not None and v == best else _fmt(v) for v in values]
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_losses(curves: dict[str, list[tuple[int, float]]], file: Path) -> None:
    """Training loss against optimizer step, one line per run, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, curve in curves.items():
        steps, losses = zip(*curve)
        ax.plot(steps, losses, marker="." if len(curve) < 30 else None, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(file, dpi=120)
    plt.close(fig)


def report(run_dirs: list[str], output_dir: str = "report", overwrite: bool = False) -> Path:
    """``lorafit report``: compare runs; write ``report.md`` (+ ``loss.png``) into ``output_dir``.

    Raises:
        ConfigError: a folder that does not exist or holds neither results.json nor metrics.jsonl, or an
            output folder that holds anything but an earlier report (replaced only with ``overwrite``).
    """
    folders = [Path(d) for d in run_dirs]
    for folder in folders:
        if not folder.is_dir():
            raise ConfigError(f"'{folder}' does not exist. Give training run folders or `lorafit eval` output folders.")
        if not (folder / "results.json").is_file() and not (folder / "metrics.jsonl").is_file():
            raise ConfigError(f"'{folder}' holds neither results.json nor metrics.jsonl, so there is nothing to "
                              f"report. Give a folder written by `lorafit train` or `lorafit eval ... output_dir=`.")
    labels = _labels(folders)
    results = [_read_json(f / "results.json") or {} for f in folders]
    out = Path(output_dir)
    with new_output(out, "report", overwrite, "--overwrite", protected=folders) as tmp:
        curves = _write_report(folders, labels, results, tmp)
        publish(tmp, out, "report", {"runs": [str(f.resolve()) for f in folders]})
    _print(labels, results, curves, out)
    return out / "report.md"


def _write_report(folders: list[Path], labels: list[str], results: list[dict], out: Path) -> dict:
    """report.md (and loss.png) into ``out``; the loss curves drawn."""
    parts = ["# lorafit report", "", "Runs: " + ", ".join(f"`{lab}` = {f}" for lab, f in zip(labels, folders)), ""]
    summaries = {lab: _run_summary(f) for lab, f in zip(labels, folders)}
    if any(summaries.values()):
        cols = ["model", "adapter", "optimizer", "data", "steps"]
        parts += ["| run | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
        parts += [f"| {lab} | " + " | ".join(s.get(c, "") for c in cols) + " |" for lab, s in summaries.items()]
        parts.append("")
    if any(results):
        parts += ["## Metrics", "", comparison_markdown(labels, results)]
    curves = {lab: c for lab, f in zip(labels, folders) if (c := _train_curve(f))}
    if curves:
        plot_losses(curves, out / "loss.png")
        parts += ["## Training loss", "", "![training loss](loss.png)", ""]
    (out / "report.md").write_text("\n".join(parts))
    return curves


def _print(labels: list[str], results: list[dict], curves: dict, out: Path) -> None:
    table = Table(title="lorafit report")
    for name in ("task", "metric", *labels):
        table.add_column(name, justify="left" if name in ("task", "metric") else "right")
    for task, metric, values in comparison_rows(results):
        best = _best(values, metric)
        table.add_row(task, metric, *[f"[bold]{_fmt(v)}[/]" if best is not None and v == best else _fmt(v)
                                      for v in values])
    results_console.print(table)
    extra = f", {out / 'loss.png'}" if curves else ""
    console.print(f"report → {out / 'report.md'}{extra}")
