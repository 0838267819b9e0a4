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


def _records(folder: Path) -> list[dict]:
    """The rows of ``metrics.jsonl`` (none if absent; a line cut short by a killed run skipped)."""
    file = folder / "metrics.jsonl"
    if not file.is_file():
        return []
    from lorafit.files import read_text

    records = []
    for line in read_text(file, "Metrics file").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _train_curve(folder: Path) -> list[tuple[int, float]]:
    """(step, loss) of the training records of ``metrics.jsonl`` (evaluation rows skipped)."""
    return [(int(r["step"]), float(r["loss"])) for r in _records(folder)
            if "split" not in r and isinstance(r.get("loss"), (int, float)) and "step" in r]


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


# ------------------------------------------------------------------------------ sweep report
LR_KEY = "optimizer.lr"
"""The swept key whose best value is picked per group (every other swept key forms the groups)."""


def is_sweep_folder(folder: Path) -> bool:
    """A folder written by ``lorafit train -m`` (it holds ``lorafit_sweep.json``)."""
    from lorafit.files import marker_name

    return (Path(folder) / marker_name("sweep")).is_file()


def _eval_curve(folder: Path, split: str, metric: str) -> list[tuple[int, float]]:
    """(step, dev metric) of the evaluation records of ``metrics.jsonl`` for one split."""
    return [(int(r["step"]), float(r[f"eval/{metric}"])) for r in _records(folder)
            if r.get("split") == split and isinstance(r.get(f"eval/{metric}"), (int, float))]


def choose_metric(results: list[dict], wanted: Optional[str]) -> tuple[str, str]:
    """(split, metric) that ranks a sweep: ``wanted`` (``NAME`` or ``SPLIT/NAME``), by default the first
    ranked metric of the first split of the first run that has results."""
    found = [res for res in results if res]
    if not found:
        raise ConfigError("No run of this sweep has results yet (results.json is written when a run finishes and "
                          "has dev data). Finish the sweep (run the same `lorafit train -m` command again), then report.")
    available = [(split, name) for res in found for split, values in res.items() if isinstance(values, dict)
                 for name in values if name not in UNRANKED]
    available = list(dict.fromkeys(available))
    if wanted is None:
        if not available:
            raise ConfigError("The sweep's results.json files hold no metric to rank runs by.")
        return available[0]
    split, _, name = wanted.rpartition("/")
    matches = [(s, n) for s, n in available if n == name and (not split or s == split)]
    if not matches:
        shown = ", ".join(f"{s}/{n}" for s, n in available)
        raise ConfigError(f"--metric {wanted} is not in the sweep's results. Available: {shown}. "
                          f"Give one of them (NAME, or SPLIT/NAME when several splits have it).")
    return matches[0]


def _lr_text(value: Optional[str]) -> str:
    """``0.0003`` → ``3e-4`` (learning rates read best in that form)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value) if value is not None else "–"
    mantissa, exponent = f"{number:.2e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}" if number and not 0.1 <= abs(number) < 1000 else f"{number:g}"


def quarters(curve: list[tuple[int, float]]) -> tuple[tuple[int, int], tuple[int, int]]:
    """The first and the last quarter of a run's steps, ``(1, ⌈N/4⌉)`` and ``(N − ⌈N/4⌉ + 1, N)``."""
    end = max(step for step, _ in curve)
    quarter = max(1, math.ceil(end / 4))
    return (1, quarter), (end - quarter + 1, end)


def _mean_loss(curve: list[tuple[int, float]], window: tuple[int, int]) -> Optional[float]:
    """Mean training loss over the logged steps ``first..last`` (inclusive)."""
    values = [loss for step, loss in curve if window[0] <= step <= window[1]]
    return sum(values) / len(values) if values else None


def sweep_rows(folder: Path, metric: Optional[str] = None) -> tuple[str, str, list[dict]]:
    """(split, metric, one row per group of runs): each group (the swept values other than the
    learning rate) at its best ``optimizer.lr`` on the dev metric, with every lr's value, the best
    run's dev metric at each evaluation and its mean training loss over the first and last quarter
    of the steps (the loss curve's early mean judges which converges faster)."""
    from lorafit.files import marker_name, read_json

    manifest = read_json(folder / marker_name("sweep"), "Sweep manifest")
    runs = manifest.get("runs") if isinstance(manifest, dict) else None
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"Sweep manifest {folder / marker_name('sweep')} lists no runs. It was damaged or the sweep "
                          f"never started; run `lorafit train -m ...` with output_dir={folder}.")
    results = [_read_json(folder / run["folder"] / "results.json") or {} for run in runs]
    split, name = choose_metric(results, metric)
    lower = name in LOWER_IS_BETTER
    groups: dict[tuple, list[tuple[dict, Optional[float]]]] = {}
    for run, res in zip(runs, results):
        key = tuple((k, v) for k, v in run["swept"].items() if k != LR_KEY)
        value = res.get(split, {}).get(name)
        groups.setdefault(key, []).append((run, value if isinstance(value, (int, float)) else None))
    rows = []
    for key, members in groups.items():
        members.sort(key=lambda m: _sort_number(m[0]["swept"].get(LR_KEY)))
        scored = [m for m in members if m[1] is not None and math.isfinite(m[1])]
        best = (min if lower else max)(scored, key=lambda m: m[1]) if scored else None
        run_dir = folder / best[0]["folder"] if best else None
        curve = _train_curve(run_dir) if run_dir else []
        early, late = quarters(curve) if curve else ((0, 0), (0, 0))
        rows.append({"group": ", ".join(f"{k}={v}" for k, v in key) or "all runs",
                     "best_lr": best[0]["swept"].get(LR_KEY) if best else None,
                     "best": best[1] if best else None,
                     "folder": best[0]["folder"] if best else None,
                     "by_lr": [(m[0]["swept"].get(LR_KEY), m[1]) for m in members],
                     "evals": _eval_curve(run_dir, split, name) if run_dir else [],
                     "early": early, "late": late,
                     "loss_early": _mean_loss(curve, early), "loss_late": _mean_loss(curve, late)})
    return split, name, rows


def _sort_number(value: Optional[str]) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf


def _sweep_cells(row: dict) -> list[str]:
    """group, best lr, metric at best, dev metric at each eval, early / late loss, every lr's metric."""
    def num(v: Optional[float]) -> str:
        return "–" if v is None else f"{v:.4f}"

    evals = ", ".join(f"{step}: {value:.4f}" for step, value in row["evals"]) or "–"
    by_lr = ", ".join(f"{_lr_text(lr)}: {num(v)}" for lr, v in row["by_lr"])
    return [row["group"], _lr_text(row["best_lr"]) if row["best"] is not None else "–", num(row["best"]), evals,
            num(row["loss_early"]), num(row["loss_late"]), by_lr]


def sweep_markdown(folder: Path, split: str, metric: str, rows: list[dict]) -> str:
    """The sweep table as markdown (what ``--markdown`` prints and ``report.md`` holds)."""
    early, late = next(((r["early"], r["late"]) for r in rows if r["loss_early"] is not None), ((0, 0), (0, 0)))
    head = ["group", "best lr", f"{split} {metric}", f"{metric} by step (best lr)",
            f"train loss, steps {early[0]}–{early[1]}", f"train loss, steps {late[0]}–{late[1]}",
            f"{metric} at each lr"]
    lines = [f"Sweep {folder}: each group at its best {LR_KEY} on {split} {metric}.", "",
             "| " + " | ".join(head) + " |", "|---|" + "---:|" * 5 + "---|"]
    lines += ["| " + " | ".join(_sweep_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def sweep_report(folder: Path, metric: Optional[str] = None, markdown: bool = False,
                 output_dir: Optional[str] = None, overwrite: bool = False) -> list[dict]:
    """``lorafit report SWEEP_DIR``: print each group's best learning rate (a rich table, or markdown);
    with ``output_dir`` also write it to ``report.md`` there. Returns the rows."""
    split, name, rows = sweep_rows(folder, metric)
    text = sweep_markdown(folder, split, name, rows)
    if markdown:
        print(text, end="")
    else:
        table = Table(title=f"lorafit report {folder}: each group at its best {LR_KEY} ({split} {name})")
        for column in ("group", "best lr", f"{split} {name}", f"{name} by step", "loss first ¼", "loss last ¼",
                       f"{name} at each lr"):
            table.add_column(column, justify="left" if column == "group" else "right", no_wrap=column == "group")
        for row in rows:
            table.add_row(*_sweep_cells(row))
        results_console.print(table)
        console.print("loss first/last ¼: mean training loss of the best run over the first/last quarter of its "
                      "steps (of the steps logged: log_every=1 logs every one).")
    if output_dir:
        out = Path(output_dir)
        with new_output(out, "report", overwrite, "--overwrite", protected=[folder]) as tmp:
            (tmp / "report.md").write_text("# lorafit report\n\n" + text)
            publish(tmp, out, "report", {"sweep": str(folder.resolve())})
        console.print(f"report → {out / 'report.md'}")
    return rows
