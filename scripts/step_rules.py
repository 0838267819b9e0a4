"""Compare the step rules on real data: training loss vs step and vs wall-clock, dev accuracy.

    python scripts/step_rules.py --glue ../shared/data/glue --out runs/step_rules --markdown \\
        --plot docs/step_rules_loss.png

Every run is ``lorafit train`` on MiniLM with the same adapter (``--adapter``, default LoRA r=8,
α=16), the same data (``--task`` sst2 or rte; batch 32, seed 0 or each of ``--seeds``), the same number of optimizer
steps (``--steps``, default 100) and ``log_every=1``, and only the step rule changed, each in its
own process with ``--threads`` torch threads (nothing else should run meanwhile: the wall-clock
axis is the point). The rules and their settings (``RULES``):

- ``adamw``: lr 1e-3, linear decay (the SST-2 sweep's setting for LoRA);
- ``loraplus``: lr_A 2.5e-4, λ = 16 (lr_B = 4e-3), linear decay;
- ``reflora``: lr 1e-3, preconditioning after a 10-step warm-up (the default 100 would leave a
  100-step run unpreconditioned);
- ``ctr``: the defaults (GGN curvature, Euclidean trust region, Δ0 = 0.1, ≤ 5 CG iterations,
  curvature products on a quarter of the batch);
- ``ctr_secant``: the defaults without ``relative_damping`` (λ from the secant alone);
- ``ctr_fixed``: the defaults without ``adaptive_damping`` and ``relative_damping`` (λ = 0);
- ``ctr_full``: curvature products on the whole batch with ≤ 10 CG iterations and no damping (the
  defaults before the cost change), for the side-by-side comparison;
- ``ctr_next``: the defaults with ρ judged on the next step's batch (``rho_batch=next``).

A finished run (``results.json`` present) is not run again. The table gives the mean training loss
over the first and last 10 % of steps (``--window N``: N steps), dev accuracy at the end, wall time,
time per step relative to AdamW, and CTR's acceptance rate and mean CG iterations. Time per step is given twice: wall-clock
(meaningful on a quiet machine) and process CPU seconds (``cpu_s`` of ``metrics.jsonl``; with
``--threads 1`` it is the wall time a quiet machine would show, and it does not move when other
work shares the CPUs), each as a ratio to AdamW's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RULES = {
    "adamw": ["optimizer=adamw", "optimizer.lr=1e-3"],
    "loraplus": ["optimizer=loraplus", "optimizer.lr=2.5e-4", "optimizer.ratio=16"],
    "reflora": ["optimizer=reflora", "optimizer.lr=1e-3", "optimizer.warmup=10"],
    "ctr": ["optimizer=ctr"],
    "ctr_secant": ["optimizer=ctr", "optimizer.relative_damping=0"],
    "ctr_fixed": ["optimizer=ctr", "optimizer.adaptive_damping=false", "optimizer.relative_damping=0"],
    "ctr_full": ["optimizer=ctr", "optimizer.curvature_batch=1.0", "optimizer.cg_iters=10", "optimizer.adaptive_damping=false",
                 "optimizer.relative_damping=0"],
    "ctr_next": ["optimizer=ctr", "optimizer.rho_batch=next"],
}
TASK_DIR = {"sst2": "SST-2", "rte": "RTE"}


def run_dir(out: Path, name: str, seed: int) -> Path:
    """``OUT/NAME`` for seed 0 (as before seeds were an option), ``OUT/NAME-seedK`` otherwise."""
    return out / (name if seed == 0 else f"{name}-seed{seed}")


def run(name: str, seed: int, args: argparse.Namespace) -> None:
    run_dir_ = run_dir(args.out, name, seed)
    if (run_dir_ / "results.json").is_file():
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lorafit", "train", "model=minilm", "data=glue", f"data.task={args.task}",
           f"data.path={args.glue}", "data.batch_size=32", f"max_steps={args.steps}", "log_every=1",
           "eval_at_start=false", f"seed={seed}", "progress=false", f"adapter={args.adapter}", *RULES[name],
           f"output_dir={run_dir_}"]
    print("$", " ".join(cmd[2:]), flush=True)
    log = subprocess.run(cmd, env=env, capture_output=True, text=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (run_dir_.parent / f"{run_dir_.name}.log").write_text(log.stdout + log.stderr)
    if log.returncode:
        print(f"{run_dir_.name} failed (exit {log.returncode}); see {run_dir_}.log", flush=True)


def summarise(name: str, run: Path, window: int = 0) -> dict:
    """The figures of one run; the first and last ``window`` steps (0: 10 % of the run) make the
    early and late loss."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "split" not in r]
    evals = [r for r in records if "split" in r]
    tenth = window or max(1, len(train) // 10)
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    row = {"name": name, "steps": [r["step"] for r in train], "loss": [r["loss"] for r in train],
           "wall": [r["elapsed_s"] for r in train], "acc": evals[-1].get("eval/accuracy") if evals else None,
           "loss_first": mean([r["loss"] for r in train[:tenth]]), "loss_last": mean([r["loss"] for r in train[-tenth:]]),
           "train_s": train[-1]["elapsed_s"] if train else float("nan"),
           "cpu_s": train[-1].get("cpu_s", float("nan")) if train else float("nan")}
    if train and "accepted" in train[0]:
        row["accept_rate"] = mean([r["accepted"] for r in train])
        row["cg_iters"] = mean([r["cg_iters"] for r in train])
        row["final_radius"] = train[-1]["radius"]
    return row


def average(rows: list[dict]) -> dict:
    """One rule's row over its seeds: the mean of every figure (and of the loss curves, step by step)."""
    if len(rows) == 1:
        return rows[0]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out = {"name": rows[0]["name"], "steps": rows[0]["steps"], "seeds": len(rows)}
    for key in ("loss", "wall"):
        out[key] = [mean(values) for values in zip(*(r[key] for r in rows))]
    for key, value in rows[0].items():
        if key not in out and isinstance(value, (int, float)):
            out[key] = mean([r[key] for r in rows if r.get(key) is not None]) if value is not None else None
    out["acc"] = mean([r["acc"] for r in rows]) if all(r["acc"] is not None for r in rows) else None
    return out


def markdown(rows: list[dict], window: int = 0) -> str:
    base = next((r["train_s"] / len(r["steps"]) for r in rows if r["name"] == "adamw"), None)
    base_cpu = next((r["cpu_s"] / len(r["steps"]) for r in rows if r["name"] == "adamw"), None)
    span = f"{window} steps" if window else "10 %"
    lines = [f"| rule | settings | loss, first {span} | loss, last {span} | dev accuracy | wall time | s/step | "
             "× AdamW | CPU s/step | × AdamW (CPU) | accepted | CG iters |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        per_step, cpu_step = row["train_s"] / len(row["steps"]), row["cpu_s"] / len(row["steps"])
        ratio = f"{per_step / base:.2f}" if base else "–"
        cpu_ratio = f"{cpu_step / base_cpu:.2f}" if base_cpu else "–"
        acc = f"{row['acc']:.4f}" if row["acc"] is not None else "–"
        accepted = f"{row['accept_rate']:.0%}" if "accept_rate" in row else "–"
        cg = f"{row['cg_iters']:.1f}" if "cg_iters" in row else "–"
        settings = " ".join(RULES[row["name"]][1:]) or "defaults"
        lines.append(f"| {row['name']} | {settings} | {row['loss_first']:.4f} | {row['loss_last']:.4f} | {acc} | "
                     f"{row['train_s']:.0f} s | {per_step:.2f} | {ratio} | {cpu_step:.2f} | {cpu_ratio} | {accepted} | {cg} |")
    return "\n".join(lines)


def plot(rows: list[dict], file: Path, title: str, window: int = 10) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for row in rows:
        ys = row["loss"]
        smooth = [sum(ys[max(0, i - window + 1):i + 1]) / len(ys[max(0, i - window + 1):i + 1]) for i in range(len(ys))]
        by_step.plot(row["steps"], smooth, label=row["name"])
        by_time.plot(row["wall"], smooth, label=row["name"])
    by_step.set_xlabel("optimizer step")
    by_time.set_xlabel("wall-clock seconds")
    by_step.set_ylabel(f"training loss ({window}-step running mean)")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
    by_time.legend()
    fig.suptitle(title)
    fig.tight_layout()
    file.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(file, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rules", nargs="*", default=list(RULES), choices=list(RULES))
    parser.add_argument("--task", choices=sorted(TASK_DIR), default="sst2")
    parser.add_argument("--adapter", default="lora")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--glue", default="../shared/data/glue", help="GLUE folder (holds SST-2/, RTE/)")
    parser.add_argument("--out", type=Path, default=Path("runs/step_rules"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0],
                        help="seeds to run each rule with; the table gives the means over them")
    parser.add_argument("--window", type=int, default=0,
                        help="steps in the 'first'/'last' loss windows (default 10 %% of --steps)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--plot", type=Path, help="write loss vs step and vs wall-clock to this PNG")
    args = parser.parse_args()
    if not (Path(args.glue) / TASK_DIR[args.task] / "dev.tsv").is_file():
        sys.exit(f"No {TASK_DIR[args.task]} at {args.glue}. Pass --glue with the GLUE folder.")
    for seed in args.seeds:
        for name in args.rules:
            run(name, seed, args)
    rows = []
    for name in args.rules:
        runs = [run_dir(args.out, name, seed) for seed in args.seeds]
        if all((r / "metrics.jsonl").is_file() for r in runs):
            per_seed = [summarise(name, r, args.window) for r in runs]
            rows.append(average(per_seed))
            rows[-1]["loss_first_per_seed"] = [r["loss_first"] for r in per_seed]
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    if args.markdown:
        print(markdown(rows, args.window))
        if len(args.seeds) > 1:
            print(f"\nloss over the first window, per seed ({', '.join(map(str, args.seeds))}):")
            for row in rows:
                print(f"  {row['name']}: " + " / ".join(f"{x:.3f}" for x in row["loss_first_per_seed"]))
    if args.plot:
        seeds = f"seed {args.seeds[0]}" if len(args.seeds) == 1 else f"mean of seeds {', '.join(map(str, args.seeds))}"
        plot(rows, args.plot, f"MiniLM on {TASK_DIR[args.task]}, adapter={args.adapter}, {seeds}, "
                              f"{args.steps} steps of batch 32")


if __name__ == "__main__":
    main()
