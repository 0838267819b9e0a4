#!/usr/bin/env python
"""The merge that fits, measured: peak memory of ``lorafit merge`` against the base's size, and the cost
of the base fingerprint (seconds per GB read).

    python scripts/bench_merge.py --model runs/bench_scale/model-1.1b --out runs/bench_merge

``--model`` is a checkpoint folder (``scripts/bench_scale.py`` writes the random TinyLlama-1.1B-shape
one, fp32); a copy in ``--dtype`` (bf16 by default: a 2.2 GB base, stored as modern LLMs are) is
written next to it. The script builds a LoRA r=16 adapter on all projections of that base with
seeded non-zero factors, writes it as a run folder, then runs
``lorafit merge RUN OUT --max-shard-size …`` in a fresh process started with
``MALLOC_MMAP_THRESHOLD_=65536`` and reports its peak RSS (``ru_maxrss`` of the child) minus the
RSS of a process that only imports lorafit and transformers (the interpreter and libraries), as a
multiple of the base's size in its dtype. The fingerprint is timed on the checkpoint files twice
(the second read comes from the page cache).
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
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GB = 1e9


def write_run(model_dir: str, dtype: str, run: Path) -> dict:
    import torch

    from lorafit.adapters.io import save_adapter
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.assemble import assemble
    from lorafit.config import ModelConfig

    built = assemble(ModelConfig(name_or_path=model_dir, dtype=dtype), LoRAConfig(r=16, alpha=32, target_modules=TARGETS),
                     None, "causal_lm", 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in built.layers.values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.01)
    save_adapter(run / "adapter", built.model, built.meta)
    base_bytes = sum(p.numel() * p.element_size() for n, p in built.model.named_parameters() if "lora_" not in n)
    return {"base_bytes": base_bytes, "layers": len(built.layers)}


PEAK_WRAPPER = """
import sys
code = 0
if sys.argv[1:]:
    from lorafit.cli import main
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code or 0
else:
    import lorafit.merge, transformers, torch  # noqa: F401  (the interpreter and libraries alone)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print("PEAK", peak * 1024, file=sys.stderr)     # this process's own high-water mark (ru_maxrss inherits the parent's)
sys.exit(code)
"""


def child_peak(argv: list[str], env: dict) -> tuple[int, float, str]:
    """(peak RSS of one child process running ``lorafit ARGV`` in bytes, wall seconds, its stderr tail)."""
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", PEAK_WRAPPER, *argv], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    peak = int(next(line.split()[1] for line in done.stderr.splitlines() if line.startswith("PEAK ")))
    return peak, wall, done.stderr[-600:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "runs" / "bench_scale" / "model-1.1b"))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_merge")
    p.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    p.add_argument("--max-shard-size", default="500MB")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stored = Path(f"{args.model}-{args.dtype}")
    if not (stored / "config.json").is_file():            # the base in its own dtype, as LLMs are shipped
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).save_pretrained(
            stored, max_shard_size="2GB")
        AutoTokenizer.from_pretrained(args.model).save_pretrained(stored)
    args.model = str(stored)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    result: dict = {"model": args.model, "dtype": args.dtype, "max_shard_size": args.max_shard_size}

    # 1. the fingerprint's cost: every backbone tensor read in chunks from the safetensors files
    import torch

    from lorafit.models import DTYPES, base_fingerprint, head_module_names
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(args.model))
    heads = head_module_names(skeleton)
    names = [n for n, _ in skeleton.named_parameters() if not any(n.startswith(h + ".") for h in heads)]
    file_bytes = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
    for attempt in ("first", "cached"):
        t0 = time.perf_counter()
        base_fingerprint(skeleton, names, args.model, DTYPES[args.dtype])
        seconds = time.perf_counter() - t0
        result[f"fingerprint_{attempt}_s"] = seconds
        result[f"fingerprint_{attempt}_s_per_gb"] = seconds / (file_bytes / GB)
    result["checkpoint_gb"] = file_bytes / GB

    # 2. the merge's peak memory, in a fresh process
    run = args.out / "run"
    if not (run / "adapter" / "lorafit_adapter.json").is_file():
        subprocess.run([sys.executable, __file__, "--write-run", "--model", args.model, "--dtype", args.dtype,
                        "--out", str(args.out)], check=True, env=env)
    info = json.loads((args.out / "run_info.json").read_text())
    floor, _, _ = child_peak([], env)
    out = args.out / "merged"
    peak, wall, tail = child_peak(["merge", str(run), str(out), "--overwrite", "--max-shard-size", args.max_shard_size],
                                  env)
    shard = max(f.stat().st_size for f in out.glob("*.safetensors"))
    result.update(base_bytes=info["base_bytes"], layers=info["layers"], interpreter_peak=floor, merge_peak=peak,
                  merge_peak_above_interpreter=peak - floor, merge_s=wall, largest_shard=shard,
                  ratio_to_base=(peak - floor) / info["base_bytes"],
                  ratio_to_base_plus_shard=(peak - floor) / (info["base_bytes"] + shard),
                  self_check=json.loads((out / "lorafit_merge.json").read_text()), stderr_tail=tail)
    (args.out / "results.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k not in ("self_check", "stderr_tail")}, indent=1))


if __name__ == "__main__":
    if "--write-run" in sys.argv:
        sys.argv.remove("--write-run")
        parsed = argparse.ArgumentParser()
        parsed.add_argument("--model")
        parsed.add_argument("--dtype")
        parsed.add_argument("--out", type=Path)
        a = parsed.parse_args()
        info = write_run(a.model, a.dtype, a.out / "run")
        (a.out / "run_info.json").write_text(json.dumps(info))
    else:
        main()
