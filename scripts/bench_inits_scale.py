#!/usr/bin/env python
"""Data-driven inits on a real LLM's shape: init time and peak memory, fp32 and nf4.

    python scripts/bench_inits_scale.py --model runs/bench_scale/model-1.1b --markdown

The model is ``scripts/bench_scale.py``'s random TinyLlama-1.1B-shape checkpoint; LoRA r=16, α=32 on
all seven projections of the 22 blocks (154 layers). Each variant runs in a fresh process (glibc's
mmap threshold fixed at 64 KiB, so RSS follows live memory): the base is loaded and the adapter
attached, then the init runs, and the figures are its wall time, its peak RSS above the RSS before
it (the model's own memory excluded), what is still held after it — the adapter state it creates
(the rebasing inits' starting factors ``init_A``, ``init_B``; Spectral's ``U_r``, ``V_r`` and its
trainable ``B_U``, ``B_V``, where LoRA's trainable A, B are allocated before the measurement) and
the code it loads — and the difference, the init's working memory, next to the size of the largest
target layer's weight in fp32, the "one layer" that working memory is to stay near. Every floating
weight is first copied out of the memory-mapped checkpoint into anonymous memory (swap is off, so
those pages stay): the kernel may drop clean mapped pages at any time and read them again later,
which made figures taken on the mapping move with the other jobs' memory (an exact PiSSA once
measured 58 MiB where MiLoRA, the same code path, held 96).

- ``pissa`` (exact SVD per layer), ``pissa_fast`` (``niter=4``), ``milora``, ``olora``;
- ``spectral``: Spectral-A's top-r SVD per layer as it wraps the layers (``adapter=spectral_a``);
- ``lora_ga``: LoRA-GA's mean gradient over 2 batches of 2 × 128 tokens (its running sums: one fp32
  out×in matrix per target, 3.9 GB here), then ``lora_ga_gmX``: the same with
  ``init.gradient_memory=X`` (GiB: the targets in groups whose sums fit, one pass each; X = 1 by
  default, 0.25, 0.05 and auto — the largest target's size — on request). Its gradient pass keeps a
  training step's activations, so next to it: the peak of one ordinary training backward on the same
  batch (LoRA trainable), measured first in the same process, and the difference, the init's extra.

On ``--quantization nf4`` the SVD inits dequantise one layer at a time and quantise the residual
again; LoRA-GA takes W0's gradients from hooks.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from bench_scale import TARGETS, Poller, rss  # noqa: E402

VARIANTS = ["olora", "pissa_fast", "pissa", "milora", "spectral", "lora_ga", "lora_ga_gm1", "lora_ga_gm0.25",
            "lora_ga_gm0.05", "lora_ga_gmauto"]
MiB = 2 ** 20


def worker(args) -> dict:
    import torch

    from lorafit.adapters import attach, find_targets
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.adapters.spectral import SpectralConfig
    from lorafit.config import ModelConfig
    from lorafit.inits.lora_ga import GradientInit, LoRAGAInit
    from lorafit.inits.svd import MiLoRAInit, OLoRAInit, PiSSAInit
    from lorafit.models import head_module_names, load_model
    from lorafit.task import head_loss

    torch.set_num_threads(args.threads)
    model = load_model(ModelConfig(name_or_path=args.model, dtype="float32", quantization=args.quantization,
                                   compute_dtype="bfloat16"), "causal_lm")
    targets = find_targets(model, TARGETS, head_module_names(model))
    biggest = max(model.get_submodule(t).out_features * model.get_submodule(t).in_features for t in targets) * 4
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": (ids := torch.randint(3, 32000, (2, 128), generator=gen)),
                "attention_mask": torch.ones_like(ids), "labels": ids} for _ in range(2)]
    method = args.worker
    layers, passes = None, None
    if method != "spectral":
        layers = attach(model, LoRAConfig(r=16, alpha=32), targets)
    with torch.no_grad():     # out of the mapped checkpoint: its pages could come and go mid-measurement
        for p in model.parameters():
            if p.is_floating_point():
                p.data = p.data.clone()
    step_peak = None
    if method.startswith("lora_ga"):   # what a training step on the same batches holds anyway (activations)
        before = rss()
        with Poller(0.002) as poller:
            batch = batches[0]
            head_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], "causal_lm").backward()
        model.zero_grad(set_to_none=True)
        step_peak = poller.peak - before
    before = rss()
    t0 = time.perf_counter()
    with Poller(0.002) as poller:
        if method == "spectral":
            attach(model, SpectralConfig(r=16), targets)
        elif method.startswith("lora_ga"):
            memory = method.partition("_gm")[2] or 0
            cfg = LoRAGAInit(batches=2, batch_size=2, gradient_memory=memory if memory == "auto" else float(memory))
            factors = {}
            init = GradientInit(cfg)
            passes = len(init.groups(layers))
            from lorafit.inits.lora_ga import gradient_sums, lora_ga_factors

            def loss_of(batch):
                return head_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"], "causal_lm")

            for group in init.groups(layers):
                sums = gradient_sums(model, group, batches, loss_of, show=False)
                for name in list(sums):
                    factors[name] = lora_ga_factors(sums.pop(name) / len(batches), 16, cfg.gamma)
            for name, layer in layers.items():
                layer.rebase(*factors.pop(name))
        else:
            {"pissa": PiSSAInit(), "pissa_fast": PiSSAInit(niter=4), "milora": MiLoRAInit(),
             "olora": OLoRAInit()}[method].apply(layers)
    seconds = time.perf_counter() - t0
    return {"variant": method, "quantization": args.quantization, "init_s": seconds,
            "peak_above_model": poller.peak - before, "held_after": rss() - before,
            "largest_layer_fp32": biggest, "layers": len(targets),
            "training_step_peak": step_peak, "passes": passes}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "bench_scale" / "model-1.1b"))
    p.add_argument("--variants", nargs="*", default=VARIANTS[:7], choices=VARIANTS)
    p.add_argument("--quantization", nargs="*", default=["none", "nf4"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_inits_scale.json")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.quantization = args.quantization[0]
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    for quantization in args.quantization:
        for variant in args.variants:
            key = f"{variant}:{quantization}"
            if key in results:
                continue
            print("$", key, flush=True)
            done = subprocess.run([sys.executable, __file__, "--worker", variant, "--model", args.model,
                                   "--quantization", quantization, "--threads", str(args.threads)],
                                  env=env, capture_output=True, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                print(done.stderr[-3000:])
                continue
            results[key] = json.loads(line[len("RESULT "):])
            args.out.write_text(json.dumps(results, indent=1))
    if args.markdown:
        print("| init | base | passes | time | peak above the model | × the largest layer (fp32) | held after | "
              "working (peak − held) | × the largest layer | a training step's peak | the init's extra (peak − step's) |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for key, r in results.items():
            step, layer, peak = r.get("training_step_peak"), r["largest_layer_fp32"], r["peak_above_model"]
            held = r.get("held_after")
            working = "| | " if held is None else (f"| {held / MiB:,.0f} MiB | {(peak - held) / MiB:,.0f} MiB "
                                                  f"| {(peak - held) / layer:.1f} ")
            versus_step = "| | |" if step is None else f"| {step / MiB:,.0f} MiB | {(peak - step) / MiB:,.0f} MiB |"
            print(f"| {r['variant']} | {r['quantization']} | {r.get('passes') or ''} | {r['init_s']:.0f} s "
                  f"| {peak / MiB:,.0f} MiB | {peak / layer:.1f} {working}{versus_step}")


if __name__ == "__main__":
    main()
