"""Train MiniLM on real GLUE SST-2 once per adapter (or per init) and tabulate dev accuracy.

    python scripts/sst2_sweep.py --group adapter --glue ../shared/data/glue --out runs/sst2_adapters --markdown
    python scripts/sst2_sweep.py --group init --glue ../shared/data/glue --out runs/sst2_inits --markdown \\
        --plot docs/sst2_init_loss.png

Every run is ``lorafit train`` (MiniLM, batch 32, AdamW linear decay, 300 steps, seed 0, eval
every 100 steps) with nothing but ``adapter=<name>`` (LoRA r=8, α=16 for the inits) or
``init=<name>`` changed, each in its own process, at the learning rate of ``LEARNING_RATE``:
1e-3 for the LoRA-factor adapters and every init (LoRA at 5e-4 ends at 0.828), 5e-4 for Bone, Bat
and Spectral-A, 4e-4 for Spectral-R at its default r=128 (see docs/benchmarks.md), 5e-3 for AdaLoRA (its update is a product of three factors that start at 0 and
N(0, 0.02); at 5e-4 it barely moves in 300 steps: 0.509 dev accuracy at step 100). A finished run (``results.json`` present) is not run
again, so the script can be stopped and restarted. The table lists dev accuracy at steps
100/200/300, the trainable parameters, the mean training loss of steps 1–10 and 91–100, and the
training wall time (which depends on what else the machine was doing). The full runs log every 10th
step only, so for the loss curves each option is run a second time with ``log_every=1`` and stopped
after ``--curve-steps`` (100) steps — same batches, same 300-step schedule, so these are exactly the
full run's first steps; the table gives that run's mean training loss over steps 1–10, 11–25, 26–50
and 51–100, and ``--plot`` draws the curves (matplotlib, a 10-step running mean).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

OPTIONS = {
    "adapter": ["lora", "rslora", "dora", "adalora", "bone", "bat", "rosa", "spectral_a", "spectral_r", "lora_dash"],
    "init": ["kaiming", "gaussian", "pissa", "milora", "olora", "lora_ga"],
}
LEARNING_RATE = {("adapter", "adalora"): "5e-3", ("adapter", "bone"): "5e-4", ("adapter", "bat"): "5e-4",
                 ("adapter", "spectral_a"): "5e-4", ("adapter", "spectral_r"): "4e-4"}  # all others: 1e-3
COMMON = ["model=minilm", "data=glue", "data.task=sst2", "data.batch_size=32", "max_steps=300",
          "eval_every=100", "eval_at_start=false", "seed=0", "progress=false"]


def lr_of(group: str, name: str) -> str:
    return LEARNING_RATE.get((group, name), "1e-3")


def run(group: str, name: str, glue: str, out: Path, threads: int) -> None:
    run_dir = out / name
    if (run_dir / "results.json").is_file():
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lorafit", "train", *COMMON, f"data.path={glue}", f"{group}={name}",
           f"optimizer.lr={lr_of(group, name)}", f"output_dir={run_dir}"]
    print("$", " ".join(cmd[2:]), flush=True)
    log = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(log.stdout + log.stderr)
    if log.returncode:
        print(f"{name} failed (exit {log.returncode}); see {out / (name + '.log')}", flush=True)


def run_curve(group: str, name: str, glue: str, out: Path, threads: int, steps: int) -> None:
    """The same run, logging every step, stopped once ``steps`` steps are logged: identical data
    order and learning-rate schedule (of 300 steps) to the full run, so its first steps are those."""
    run_dir = out / "curves" / name
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
        return
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lorafit", "train", *COMMON, "log_every=1", "eval_every=0", f"data.path={glue}",
           f"{group}={name}", f"optimizer.lr={lr_of(group, name)}", f"output_dir={run_dir}"]
    print("$", " ".join(cmd[2:]), f"(stopped after {steps} steps)", flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None:
        time.sleep(1.0)
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= steps:
            proc.terminate()
            proc.wait()


def curve(name: str, out: Path, steps: int) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "curves" / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "split" not in r and r["step"] <= steps}


def summarise(name: str, out: Path, curve_steps: int) -> dict:
    records = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    acc = {r["step"]: r["eval/accuracy"] for r in records if r.get("split") == "sst2"}
    train = [r for r in records if "split" not in r]
    log_file = out / f"{name}.log"
    trainable = re.search(r"trainable ([\d,]+) of", log_file.read_text()) if log_file.is_file() else None
    has_curve = (out / "curves" / name / "metrics.jsonl").is_file()
    return {"name": name, "acc": acc, "trainable": trainable.group(1) if trainable else "?",
            "curve": curve(name, out, curve_steps) if has_curve else {},
            "train_s": train[-1]["elapsed_s"] if train else float("nan")}


def mean_loss(row: dict, first: int, last: int) -> str:
    values = [v for s, v in row["curve"].items() if first <= s <= last]
    return f"{sum(values) / len(values):.4f}" if values else "–"


WINDOWS = ((1, 10), (11, 25), (26, 50), (51, 100))


def markdown(group: str, rows: list[dict]) -> str:
    windows = " | ".join(f"loss {a}–{b}" for a, b in WINDOWS)
    lines = [f"| {group} | lr | step 100 | step 200 | step 300 | {windows} | trainable params (incl. head) | "
             "train time |", "|---|---:|---:|---:|---:|" + "---:|" * len(WINDOWS) + "---:|---:|"]
    for row in rows:
        acc = row["acc"]
        cells = [f"{acc[s]:.4f}" if s in acc else "–" for s in (100, 200, 300)]
        cells += [mean_loss(row, a, b) for a, b in WINDOWS]
        lines.append(f"| {row['name']} | {lr_of(group, row['name'])} | " + " | ".join(cells) +
                     f" | {row['trainable']} | {row['train_s']:.0f} s |")
    return "\n".join(lines)


def plot(rows: list[dict], file: Path, group: str, window: int = 10) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        xs = sorted(row["curve"])
        ys = [row["curve"][s] for s in xs]
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, label=row["name"])
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training loss ({window}-step running mean)")
    ax.set_title(f"MiniLM on SST-2, LoRA r=8, by {group} (same batches for every run)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--group", choices=sorted(OPTIONS), default="adapter")
    parser.add_argument("--options", nargs="*", help="the options to run (default: all of the group)")
    parser.add_argument("--glue", default="../shared/data/glue", help="GLUE folder (holds SST-2/)")
    parser.add_argument("--out", type=Path, help="runs folder (default: runs/sst2_<group>s)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--markdown", action="store_true", help="print the results table")
    parser.add_argument("--plot", type=Path, help="write the training-loss curves to this PNG")
    parser.add_argument("--curve-steps", type=int, default=100,
                        help="log every step of the first N steps (a second run, stopped at N)")
    args = parser.parse_args()
    if not (Path(args.glue) / "SST-2" / "dev.tsv").is_file():
        sys.exit(f"No SST-2 at {args.glue}/SST-2/dev.tsv. Pass --glue with the folder holding GLUE's SST-2.")
    options = args.options or OPTIONS[args.group]
    out = args.out or Path(f"runs/sst2_{args.group}s")
    out.mkdir(parents=True, exist_ok=True)
    for name in options:
        run(args.group, name, args.glue, out, args.threads)
        if args.curve_steps:
            run_curve(args.group, name, args.glue, out, args.threads, args.curve_steps)
    rows = [summarise(n, out, args.curve_steps) for n in options if (out / n / "metrics.jsonl").is_file()]
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    if args.markdown:
        print(markdown(args.group, rows))
    if args.plot:
        plot(rows, args.plot, args.group)


if __name__ == "__main__":
    main()
