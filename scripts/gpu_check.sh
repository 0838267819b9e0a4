#!/usr/bin/env bash
# The GPU check (one run, under 8 minutes on one GPU): training steps of the TinyLlama-1.1B-shape
# model (batch 4 x 512) on the GPU — every adapter in bf16, LoRA and DoRA side by side with PEFT, and
# nf4 / nf4 + checkpointing against PEFT's QLoRA recipe when bitsandbytes is importable — with step
# time and peak GPU memory. Figures go to $OUT (default runs/gpu_check) and are printed as markdown.
#
# The lent machine has no network and its image lacks hydra-core, omegaconf, datasets and
# bitsandbytes: put their wheels in .whl/ first (docs/benchmarks.md, "GPU check", lists the command);
# they are installed into /tmp/site here. Nothing in CI runs this.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_check}
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__, 'peft', peft.__version__)"

ADAPTERS="lora rslora dora adalora bone bat rosa spectral_a spectral_r lora_dash"
python3 scripts/bench_scale.py --device cuda --threads 8 --out "$OUT" --settings bf16 --adapters $ADAPTERS --markdown
if python3 -c "import bitsandbytes" 2>/dev/null; then
  python3 scripts/bench_scale.py --device cuda --threads 8 --out "$OUT" --settings nf4 nf4_ckpt --adapters lora dora --markdown
else
  echo "bitsandbytes is not importable here: nf4 skipped (carry its wheel in .whl/)"
fi
