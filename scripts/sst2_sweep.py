"""Train every adapter on real GLUE SST-2 with its documented defaults and tabulate dev accuracy.

    python scripts/sst2_adapters.py --glue ../shared/data/glue --out runs/sst2_adapters --markdown

Each adapter runs ``lorafit train`` (MiniLM, batch 32, AdamW lr 5e-4 linear decay, 300 steps,
seed 0, eval every 100 steps) with nothing but ``adapter=<name>`` changed, in its own process —
except AdaLoRA's learning rate, 5e-3 (its update is a product of three factors that start at 0 and
N(0, 0.02), so at 5e-4 it barely moves in 300 steps: 0.509 dev accuracy at step 100).
A finished run (``results.json`` present) is not run again, so the script can be stopped and
restarted. The table lists dev accuracy at steps 100/200/300, trainable parameters and the
training wall time (which depends on what else the machine was doing).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ADAPTERS = ["lora", "rslora", "dora", "adalora", "bone", "bat", "rosa", "spectral_a", "spectral_r", "lora_dash"]
LEARNING_RATE = {"adalora": "5e-3"}  # every other adapter: 5e-4
COMMON = ["model=minilm", "data=glue", "data.task=sst2", "data.batch_size=32", "max_steps=300", "eval_every=100", "eval_at_start=false", "seed=0", "progress=false"]


def run(name: str, glue: str, out: Path, threads: int) -> None:
    run_dir = out / name
    if (run_dir / "results.json").is_file():
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "lorafit", "train", *COMMON, f"data.path={glue}", f"adapter={name}",
           f"optimizer.lr={LEARNING_RATE.get(name, '5e-4')}", f"output_dir={run_dir}"]
    print("$", " ".join(cmd[2:]), flush=True)
    log = subprocess.run(cmd, env=env, capture_output=True, text=True)
    (out / f"{name}.log").write_text(log.stdout + log.stderr)
    if log.returncode:
        print(f"{name} failed (exit {log.returncode}); see {out / (name + '.log')}", flush=True)


def summarise(name: str, out: Path) -> dict:
    run_dir = out / name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    acc = {r["step"]: r["eval/accuracy"] for r in records if r.get("split") == "sst2"}
    train = [r for r in records if "split" not in r]
    log = (out / f"{name}.log").read_text()
    trainable = re.search(r"trainable ([\d,]+) of", log)
    return {"adapter": name, "acc": acc, "trainable": trainable.group(1) if trainable else "?",
            "train_s": train[-1]["elapsed_s"] if train else float("nan"), "final_loss": train[-1]["loss"]}


def markdown(rows: list[dict]) -> str:
    lines = ["| adapter | lr | step 100 | step 200 | step 300 | trainable params (incl. head) | train time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        acc = row["acc"]
        cells = [f"{acc[s]:.4f}" if s in acc else "–" for s in (100, 200)]
        final = acc.get(300)
        cells.append("–" if final is None else (f"**{final:.4f}**" if final >= 0.83 else f"{final:.4f}"))
        lines.append(f"| {row['adapter']} | {LEARNING_RATE.get(row['adapter'], '5e-4')} | " + " | ".join(cells) + f" | {row['trainable']} | {row['train_s']:.0f} s |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue", default="../shared/data/glue", help="GLUE folder (holds SST-2/)")
    parser.add_argument("--out", default="runs/sst2_adapters", type=Path)
    parser.add_argument("--adapters", nargs="*", default=ADAPTERS)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--markdown", action="store_true", help="print the results table")
    args = parser.parse_args()
    if not (Path(args.glue) / "SST-2" / "dev.tsv").is_file():
        sys.exit(f"No SST-2 at {args.glue}/SST-2/dev.tsv. Pass --glue with the folder holding GLUE's SST-2.")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.adapters:
        run(name, args.glue, args.out, args.threads)
    rows = [summarise(n, args.out) for n in args.adapters if (args.out / n / "metrics.jsonl").is_file()]
    (args.out / "summary.json").write_text(json.dumps(rows, indent=2))
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
