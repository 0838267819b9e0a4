"""Held-out pairwise accuracy of a reward model, every pair held out once (k-fold).

    python scripts/rm_folds.py --data ../shared/data/preference/dpo_en_demo.json --folds 5 --out runs/rm_folds

One held-out split of 60 pairs measures accuracy to ±0.065 (one standard error), too coarse to
tell a small reward model from chance. This script trains ``k`` reward models, ``lorafit train
task=reward`` each, fold ``i`` holding out the ``i``-th ``1/k`` of the file (the file is rotated
so that this fold comes last and ``data.eval_fraction=1/k`` takes it). It reads the held-out
accuracy each run logged at its **last** step (never the best step: choosing on the held-out split
would bias it), pools the ``k`` folds into one accuracy over every pair, and gives the two-sided
binomial test against chance (``scipy.stats.binomtest``; ties count as wrong). Extra arguments go to
``lorafit train``. A finished fold (``results.json`` present) is not trained again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from scipy.stats import binomtest

ROOT = Path(__file__).resolve().parents[1]
SETTING = ["model=minilm", "task=reward", "data=preference", "data.max_length=256", "data.batch_size=16",
           "max_steps=45", "optimizer.lr=2e-3", "seed=0", "progress=false", "eval_at_start=false"]


def read_rows(path: Path) -> list:
    text = path.read_text()
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


def write_rotated(rows: list, fold: int, folds: int, out: Path) -> tuple[Path, int]:
    """The rows with fold ``fold`` moved to the end; returns the file and the fold's size."""
    n = len(rows)
    lo, hi = n * fold // folds, n * (fold + 1) // folds
    out.parent.mkdir(parents=True, exist_ok=True)
    rotated = rows[:lo] + rows[hi:] + rows[lo:hi]
    if out.suffix == ".jsonl":   # keep the input's format: PreferenceData reads .jsonl line by line
        out.write_text("".join(json.dumps(row) + "\n" for row in rotated))
    else:
        out.write_text(json.dumps(rotated))
    return out, hi - lo


def last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "split" in r]
    if not evals:
        raise SystemExit(f"{run}: no held-out evaluation in metrics.jsonl")
    return evals[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="preference JSON / JSONL")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    parser.add_argument("overrides", nargs="*", help="extra lorafit train overrides")
    args = parser.parse_args()
    rows = read_rows(args.data)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    correct = total = 0
    print("| fold | held-out pairs | accuracy | margin | loss |")
    print("|---:|---:|---:|---:|---:|")
    for fold in range(args.folds):
        run = args.out / f"fold{fold}"
        data, n_held = write_rotated(rows, fold, args.folds, args.out / "data" / f"fold{fold}{args.data.suffix}")
        if not (run / "results.json").is_file():
            cmd = [sys.executable, "-m", "lorafit", "train", *SETTING, f"data.path={data}",
                   f"data.eval_fraction={n_held / len(rows)}", f"output_dir={run}", *args.overrides]
            log = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            (args.out / f"fold{fold}.log").write_text(log.stdout + log.stderr)
            if log.returncode:
                raise SystemExit(f"fold {fold} failed (exit {log.returncode}); see {args.out / f'fold{fold}.log'}")
        ev = last_eval(run)
        n = int(ev["eval/n"])
        acc = ev["eval/pairwise_accuracy"]
        correct += round(acc * n)
        total += n
        print(f"| {fold} | {n} | {acc:.3f} | {ev['eval/margin_mean']:+.3f} | {ev['eval/loss']:.3f} |", flush=True)
    test = binomtest(correct, total, 0.5)
    low, high = test.proportion_ci(0.95)
    print(f"\npooled: {correct}/{total} = {correct / total:.3f} (95% CI {low:.3f}–{high:.3f}); "
          f"two-sided binomial test against 0.5: p = {test.pvalue:.3g}")


if __name__ == "__main__":
    main()
