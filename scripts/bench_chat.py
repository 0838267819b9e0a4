#!/usr/bin/env python
"""SFT speed, side by side: lorafit (packed and not) vs the HF Trainer + PEFT and TRL's SFTTrainer.

    python scripts/bench_chat.py --markdown                 # all four, at 10 and 40 steps
    python scripts/bench_chat.py --tools lorafit_packed trl_packed --steps 5 20
    pip install -e ".[bench]"                               # TRL, for the trl_packed column

The data are the shared alpaca demo (1,000 rows, ``../shared/data/instruct/alpaca_en_demo.json``)
rendered with the alpaca prompt and tokenised with the shared Llama-2 tokenizer by lorafit's own
``data=instruct`` encoder (prompt masked, response + EOS learnt, at most 512 tokens); the same token
ids and labels go to every tool. The model is a randomly initialised Llama (hidden 512, 4 layers,
intermediate 1376, 8 heads, vocab 32,000, fp32), saved once under ``--out``; every tool trains LoRA
r=8, α=16 on all seven projections, AdamW lr 2e-4, gradient clipping 1.0, batch 8, in fp32 on the CPU.

- ``lorafit``: ``lorafit train model.name_or_path=MODEL data=instruct data.packing=false …``: each
  step's 8 examples padded to the longest; ``lorafit_packed``: ``data.packing=true``, the same 8
  examples packed into rows of 512 tokens.
- ``hf_peft``: ``transformers.Trainer`` on ``peft.get_peft_model(model, LoraConfig(...))`` with
  ``DataCollatorForSeq2Seq`` (dynamic padding): what most users run.
- ``trl_packed``: ``trl.SFTTrainer`` with ``packing=True`` (best-fit decreasing into rows of 512,
  ``completion_mask`` from the labels), ``per_device_train_batch_size=8`` packed rows.

Each measurement is a fresh process, timed whole (imports, model load, tokenisation, training, the
final save) at two step counts; the difference of labelled tokens over the difference of wall time
is the throughput, so start-up cancels. Labelled tokens are counted as each tool feeds its model
(tokens with a label after the shift). For lorafit the time spent building each step's batches (row
selection and collation in the training process) is reported too.
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
SHARED = ROOT.parent / "shared" / "data"
ALPACA = SHARED / "instruct" / "alpaca_en_demo.json"
LLAMA2 = SHARED / "tokenizers" / "llama2"
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=1024, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH, MAX_LENGTH, LR, RANK = 8, 512, 2e-4, 8
TOOLS = ("lorafit_packed", "lorafit", "hf_peft", "trl_packed")


# ------------------------------------------------------------------------------------ set-up
def prepare(out: Path) -> tuple[Path, Path]:
    """The model folder (random weights, the Llama-2 tokenizer) and the tokenised alpaca set."""
    import datasets
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from lorafit.data.chat import InstructData, instruction_turns

    model_dir, data_dir = out / "model", out / "alpaca_tokenised"
    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        tokenizer = AutoTokenizer.from_pretrained(str(LLAMA2))
        LlamaForCausalLM(LlamaConfig(**SHAPE)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
    if not (data_dir / "dataset_info.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        data = InstructData(path=str(ALPACA), max_length=MAX_LENGTH, eval_fraction=0.0)
        data.configure(tokenizer)
        rows = json.loads(ALPACA.read_text())
        encoded = [data.encode({"messages": instruction_turns(r)}, tokenizer) for r in rows]
        datasets.Dataset.from_list([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in encoded]
                                   ).save_to_disk(str(data_dir))
    return model_dir, data_dir


def labelled(labels) -> int:
    """Tokens with a label after the next-token shift (what the loss averages over)."""
    return int((labels[..., 1:] != -100).sum())


# ------------------------------------------------------------------------------------ the tools
def run_lorafit(model_dir: Path, steps: int, out: Path, packed: bool) -> dict:
    from lorafit.cli import main
    from lorafit.data.batches import count_loss_units
    from lorafit.train.trainer import Trainer

    counted = {"tokens": 0, "data_s": 0.0}
    original = Trainer.step_batches

    def timed(self, step):
        t = time.perf_counter()
        batches = original(self, step)
        counted["data_s"] += time.perf_counter() - t
        counted["tokens"] += sum(count_loss_units(b) for b in batches)
        return batches

    Trainer.step_batches = timed
    try:
        main(["train", f"model.name_or_path={model_dir}", "data=instruct", f"data.path={ALPACA}",
              f"data.max_length={MAX_LENGTH}", f"data.batch_size={BATCH}", "data.eval_fraction=0",
              f"data.packing={str(packed).lower()}", f"adapter.r={RANK}", f"adapter.alpha={2 * RANK}",
              "adapter.dropout=0", f"adapter.target_modules=[{','.join(TARGETS)}]", f"optimizer.lr={LR}",
              f"max_steps={steps}", "eval_at_start=false", "progress=false", "log_every=0", "hardware=cpu",
              f"output_dir={out}", "overwrite=true"])
    except SystemExit as exc:
        if exc.code:
            raise
    return counted


def count_labels(model) -> dict:
    """Count the labelled tokens of every training forward of ``model`` (a hook on its kwargs)."""
    counted = {"tokens": 0}

    def hook(module, args, kwargs):
        if module.training and kwargs.get("labels") is not None:
            counted["tokens"] += labelled(kwargs["labels"])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return counted


def peft_model(model_dir: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype="float32")
    return base, get_peft_model(base, LoraConfig(r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0,
                                                 target_modules=TARGETS, task_type="CAUSAL_LM"))


def run_hf_peft(model_dir: Path, data_dir: Path, steps: int, out: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    base, model = peft_model(model_dir)
    counted = count_labels(base)
    dataset = datasets.load_from_disk(str(data_dir))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR,
                             max_steps=steps, max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=10_000,
                             save_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True,
                             dataloader_num_workers=0, seed=0, optim="adamw_torch")
    Trainer(model=model, args=args, train_dataset=dataset,
            data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)).train()
    model.save_pretrained(str(out / "adapter"))
    return counted


def run_trl_packed(model_dir: Path, data_dir: Path, steps: int, out: Path) -> dict:
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.unk_token
    base, model = peft_model(model_dir)
    counted = count_labels(base)
    dataset = datasets.load_from_disk(str(data_dir)).map(
        lambda e: {"completion_mask": [int(label != -100) for label in e["labels"]]}, remove_columns=["labels"])
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, learning_rate=LR, max_steps=steps,
                     max_grad_norm=1.0, lr_scheduler_type="constant", logging_steps=10_000, save_strategy="no",
                     report_to="none", disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, seed=0,
                     optim="adamw_torch", packing=True, max_length=MAX_LENGTH, completion_only_loss=True)
    SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    model.save_pretrained(str(out / "adapter"))
    return counted


def child(tool: str, steps: int, out: Path, result: Path) -> None:
    model_dir, data_dir = out / "model", out / "alpaca_tokenised"
    work = out / f"{tool}-{steps}"
    if tool.startswith("lorafit"):
        counted = run_lorafit(model_dir, steps, work, packed=tool == "lorafit_packed")
    elif tool == "hf_peft":
        counted = run_hf_peft(model_dir, data_dir, steps, work)
    else:
        counted = run_trl_packed(model_dir, data_dir, steps, work)
    result.write_text(json.dumps(counted))


# ------------------------------------------------------------------------------------ the parent
def measure(tool: str, steps: int, out: Path) -> dict:
    result = out / f"result-{tool}-{steps}.json"
    result.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--child", tool, "--steps", str(steps), str(steps), "--out", str(out),
                           "--result", str(result)], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{tool} at {steps} steps failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, **json.loads(result.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--steps", nargs=2, type=int, default=[10, 40], metavar=("FEW", "MANY"))
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_chat")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.steps[0], args.out, args.result)
        return
    if not ALPACA.is_file() or not (LLAMA2 / "tokenizer.model").is_file():
        raise SystemExit(f"needs the shared alpaca demo and Llama-2 tokenizer under {SHARED}")
    args.out.mkdir(parents=True, exist_ok=True)
    prepare(args.out)
    few, many = args.steps
    rows = {}
    for tool in args.tools:
        a, b = measure(tool, few, args.out), measure(tool, many, args.out)
        rate = (b["tokens"] - a["tokens"]) / (b["wall_s"] - a["wall_s"])
        rows[tool] = {"few": a, "many": b, "labelled_tokens_per_s": rate,
                      "data_share": (b.get("data_s", 0) - a.get("data_s", 0)) / (b["wall_s"] - a["wall_s"])}
        print(f"{tool}: {a['wall_s']:.1f}s/{few} steps, {b['wall_s']:.1f}s/{many} steps, "
              f"{b['tokens'] - a['tokens']} labelled tokens in between → {rate:.0f} tokens/s", flush=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=2))
    if args.markdown:
        base = rows.get("hf_peft", {}).get("labelled_tokens_per_s")
        print(f"\n| tool | wall {few} steps (s) | wall {many} steps (s) | labelled tokens/s | × HF Trainer+PEFT |")
        print("|---|---:|---:|---:|---:|")
        for tool, r in rows.items():
            ratio = f"{r['labelled_tokens_per_s'] / base:.2f}" if base else "–"
            print(f"| {tool} | {r['few']['wall_s']:.1f} | {r['many']['wall_s']:.1f} | "
                  f"{r['labelled_tokens_per_s']:.0f} | {ratio} |")


if __name__ == "__main__":
    main()
