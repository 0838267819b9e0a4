"""Produce the pinned values of ``tests/pinned_values.json`` (checked by ``tests/test_pinned.py``).

What is pinned (torchtune-style regression values: they say nothing about correctness, only that
the numbers did not move):

1. Every adapter option of ``configs/adapter/`` (``ADAPTER_CASES``: the ten options, plus DoRA
   with ``recompute=true`` and Bone with a ragged last block). One seeded ``nn.Linear(16, 12)``
   (float32, with bias) is wrapped by the option's config — composed by Hydra exactly as
   ``lorafit train adapter=<option>`` composes it, with small sizes — right after
   ``torch.manual_seed(0)``. Pinned, per case:

   - ``config``: the adapter config used and its schema's defaults;
   - ``init``: the adapter state straight after ``cfg.wrap`` (parameters and buffers; the init maths);
   - then every trainable tensor is set to seeded non-zero values and the layer is put in the state
     where its whole maths is active (RoSA: ``set_mask``; LoRA-Dash: ``launch``; AdaLoRA: a fixed
     rank mask), and for two inputs, ``x_seq`` (3×6×16: 18 tokens) and ``x_rows`` (3×16: 3 tokens;
     DoRA takes another branch with fewer tokens than input features):
     ``out_seq`` / ``out_rows`` (each tensor as: sum, sum of |·|, max |·|, four entries);
   - ``loss`` = ``(out_seq·w_seq).sum() + (out_rows·w_rows).sum()`` (w fixed) and ``grad``, its
     gradient with respect to every trainable tensor and to both inputs;
   - ``merged_weight``: ``merged_weight()`` (the fold);
   - extras: AdaLoRA's orthogonality terms, LoRA-Dash's launched directions, the singular values
     kept by the spectral adapters.

   The spectral adapters' singular vectors are given a canonical sign first (each column of U_r
   with its largest entry positive, V_r flipped alike): ``W0 = U S Vᵀ`` is unchanged, so this is a
   state the layer could have computed itself, and the pins do not depend on LAPACK's choice of sign.

2. Every step rule of ``configs/optimizer/`` (``STEP_RULE_CASES``: the six options, plus CTR with
   the Fisher metric, the exact Hessian and its rank schedule): 4 optimizer steps of
   ``lorafit train model=tiny_llama data=sentiment_demo`` (32 examples, batch 8, no dropout),
   in-process through ``lorafit.cli.main``. Pinned: the per-step training loss and gradient norm
   (``RUN/metrics.jsonl``), the sum of absolute values of the final adapter, and the optimizer
   config the run used together with its schema's defaults (``AdamWConfig().beta2`` and the like:
   the YAML option files set every key, so a changed dataclass default moves no number of a CLI run,
   but it does change what ``AdamWConfig()`` gives a Python caller).

Everything runs on one CPU thread with fixed seeds; running this script twice writes the same
file. **Regenerate the file only on purpose**: a change to it means the maths changed. Commit the
new file together with the change, and list in the commit message every intended numerical change
that moved the values (``git diff tests/pinned_values.json`` shows which pins moved)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/pin_values.py            # writes tests/pinned_values.json
    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/pin_values.py --out FILE  # anywhere else (to compare)

``tests/test_pinned.py`` imports the functions below, so the test and this script share one
implementation of every computation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
PINS_FILE = REPO / "tests" / "pinned_values.json"

IN_FEATURES, OUT_FEATURES = 16, 12
BATCH, SEQ = 3, 6
PARAM_SCALE = 0.2          # std of the values given to every trainable adapter tensor

# case → (option of configs/adapter/, overrides of its keys). Sizes fit the 12×16 layer: r = 4 tiles
# both 16 and 12 (Bone, Bat), r = 5 leaves Bone a ragged last block, density 0.1 keeps 19 entries.
ADAPTER_CASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "lora": ("lora", ("r=4",)),
    "rslora": ("rslora", ("r=4",)),
    "dora": ("dora", ("r=4",)),                       # recompute=auto: 16 ≠ 12, the output is kept
    "dora_recompute": ("dora", ("r=4", "recompute=true")),
    "adalora": ("adalora", ("init_r=6", "target_r=4")),
    "bone": ("bone", ("r=4",)),
    "bone_ragged": ("bone", ("r=5",)),
    "bat": ("bat", ("r=4",)),
    "rosa": ("rosa", ("r=4", "density=0.1")),
    "spectral_a": ("spectral_a", ("r=4",)),
    "spectral_r": ("spectral_r", ("r=4",)),
    "lora_dash": ("lora_dash", ("r=4", "s=3")),
}
ADALORA_KEEP = (True, False, True, True, False, True)   # the rank mask of the adalora case (init_r = 6)

# case → overrides of `lorafit train` (after TRAIN_ARGS). Each rule acts within the 4 steps.
TRAIN_ARGS = ("train", "model=tiny_llama", "data=sentiment_demo", "data.max_train_examples=32",
              "data.max_eval_examples=8", "data.batch_size=8", "max_steps=4", "log_every=1", "progress=false",
              "eval_at_start=false", "model.dropout=0.0", "seed=0")
STEP_RULE_CASES: dict[str, tuple[str, ...]] = {
    "adamw": ("optimizer=adamw",),
    "sgd": ("optimizer=sgd", "optimizer.momentum=0.9"),            # momentum 0 would leave half of SGD unpinned
    "loraplus": ("optimizer=loraplus",),
    "reflora": ("optimizer=reflora", "optimizer.warmup=1"),        # preconditioned from step 2 on
    "reflora_s": ("optimizer=reflora_s", "optimizer.warmup=1"),    # rebalanced from step 2 on
    "ctr": ("optimizer=ctr",),
    "ctr_fisher_rank": ("optimizer=ctr", "optimizer.metric=fisher", "optimizer.curvature=hessian",
                        "optimizer.rank_budget=0.5", "optimizer.rank_every=2"),
}


# ------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread (bit-identical sums run after run), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def summary(t: torch.Tensor) -> dict[str, Any]:
    """sum, sum of |·|, max |·| and four entries (first, second, middle, last of the flattened tensor).

    The test compares ``sum`` / ``abs_sum`` to within a fraction of ``abs_sum`` and the entries to
    within a fraction of ``max_abs``: tolerances on the tensor's scale, not on a sum that cancels.
    """
    flat = t.detach().double().flatten().cpu()
    n = flat.numel()
    idx = sorted({0, min(1, n - 1), n // 2, n - 1}) if n else []
    return {"sum": float(flat.sum()), "abs_sum": float(flat.abs().sum()),
            "max_abs": float(flat.abs().max()) if n else 0.0, "entries": [float(flat[i]) for i in idx]}


def adapter_config(case: str) -> Any:
    """The validated adapter config of ``case``, composed by Hydra like ``lorafit train adapter=...``."""
    from lorafit.cli import compose
    from lorafit.config import schema_of, to_object

    option, overrides = ADAPTER_CASES[case]
    node = compose("train", [f"adapter={option}", *(f"adapter.{o}" for o in overrides)])["adapter"]
    return to_object(node, schema_of(node, "adapter"), "adapter")


def base_linear() -> nn.Linear:
    """The seeded float32 ``nn.Linear(16, 12)`` every adapter case wraps."""
    gen = torch.Generator().manual_seed(1234)
    layer = nn.Linear(IN_FEATURES, OUT_FEATURES)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(OUT_FEATURES, IN_FEATURES, generator=gen) * 0.25)
        layer.bias.copy_(torch.randn(OUT_FEATURES, generator=gen) * 0.1)
    return layer


@torch.no_grad()
def canonical_svd_signs(layer: nn.Module) -> None:
    """Spectral adapters: flip (u_i, v_i) pairs so each u_i has its largest-|·| entry positive."""
    if not (hasattr(layer, "spectral_U") and hasattr(layer, "spectral_V")):
        return
    U = layer.spectral_U
    signs = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True))).squeeze(0)
    layer.spectral_U.mul_(signs)
    layer.spectral_V.mul_(signs)


def config_values(cfg: Any) -> dict[str, Any]:
    """The config the case ran with, and its schema's own defaults (what ``Schema()`` gives in Python)."""
    def plain(obj: Any) -> Any:
        return json.loads(json.dumps(dataclasses.asdict(obj)))
    return {"used": plain(cfg), "schema_defaults": plain(type(cfg)())}


def adapter_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's adapter state: everything in its state dict except ``base.*``."""
    return {k: v for k, v in layer.state_dict().items() if not k.startswith("base.")}


def trainable(layer: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in layer.named_parameters() if p.requires_grad}


@torch.no_grad()
def activate(layer: nn.Module, gen: torch.Generator) -> dict[str, Any]:
    """Seeded non-zero values for every trainable tensor and the state where all of the maths is on.

    Returns the extra pins of that state (AdaLoRA's mask, LoRA-Dash's chosen directions).
    """
    def fill(p: torch.Tensor) -> None:
        p.copy_(torch.randn(p.shape, generator=gen) * PARAM_SCALE)

    extras: dict[str, Any] = {}
    for name, p in trainable(layer).items():
        if name == "magnitude":          # DoRA: positive, near W0's row norms
            p.copy_(layer.base.weight.norm(dim=1) * (1 + PARAM_SCALE * torch.randn(p.shape, generator=gen)))
        else:
            fill(p)
    if hasattr(layer, "set_mask") and hasattr(layer, "sparse_values"):     # RoSA: choose the sparse mask
        layer.set_mask(torch.rand(layer.base.weight.shape, generator=gen))
        fill(layer.sparse_values)                                          # set_mask zeroes them
    if hasattr(layer, "launch") and hasattr(layer, "dash_d"):              # LoRA-Dash: launch the directions
        extras["launched"] = [int(i) for i in layer.launch()]
        fill(layer.dash_d)                                                 # launch zeroes d
    if hasattr(layer, "apply_mask") and hasattr(layer, "rank_mask"):       # AdaLoRA: a pruned rank pattern
        layer.apply_mask(torch.tensor(ADALORA_KEEP))
        extras["rank_mask"] = [bool(k) for k in layer.rank_mask]
    return extras


# ----------------------------------------------------------------------------------- 1. adapters
def adapter_values(case: str) -> dict[str, Any]:
    """The pins of one adapter case (see the module docstring)."""
    with one_thread():
        cfg = adapter_config(case)
        base = base_linear()
        problem = cfg.check("layer", base)
        assert problem is None, problem
        torch.manual_seed(0)                              # the adapter's own init draws from it
        layer = cfg.wrap(base)
        layer.base.weight.requires_grad_(False)           # as `attach` leaves it: only the adapter trains
        layer.base.bias.requires_grad_(False)
        canonical_svd_signs(layer)
        values: dict[str, Any] = {"config": config_values(cfg), "class": type(layer).__name__}
        values["init"] = {k: summary(v) for k, v in sorted(adapter_tensors(layer).items())}

        gen = torch.Generator().manual_seed(4321)
        values.update(activate(layer, gen))
        if hasattr(layer, "spectral_S"):
            values["singular_values"] = [float(s) for s in layer.spectral_S]
        params = trainable(layer)
        assert params and all(p.abs().sum() > 0 for p in params.values()), "an adapter tensor is still zero"

        x_seq = torch.randn(BATCH, SEQ, IN_FEATURES, generator=gen).requires_grad_(True)
        x_rows = torch.randn(BATCH, IN_FEATURES, generator=gen).requires_grad_(True)
        w_seq = torch.randn(BATCH, SEQ, OUT_FEATURES, generator=gen)
        w_rows = torch.randn(BATCH, OUT_FEATURES, generator=gen)
        out_seq, out_rows = layer(x_seq), layer(x_rows)
        values["out_seq"], values["out_rows"] = summary(out_seq), summary(out_rows)
        loss = (out_seq * w_seq).sum() + (out_rows * w_rows).sum()
        values["loss"] = float(loss.detach())
        loss.backward()
        grads = {name: summary(p.grad) for name, p in sorted(params.items())}
        grads["x_seq"], grads["x_rows"] = summary(x_seq.grad), summary(x_rows.grad)
        values["grad"] = grads
        with torch.no_grad():
            values["merged_weight"] = summary(layer.merged_weight())
            if hasattr(layer, "orthogonality"):
                values["orthogonality"] = [float(t) for t in layer.orthogonality()]
        return values


# --------------------------------------------------------------------------------- 2. step rules
def train_run(case: str, out_dir: Path) -> Path:
    """4 steps of ``lorafit train`` for ``case`` into ``out_dir/run`` (in-process, output captured)."""
    from lorafit.cli import main

    run = Path(out_dir) / "run"
    out, err = io.StringIO(), io.StringIO()
    code = None
    with one_thread(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*TRAIN_ARGS, *STEP_RULE_CASES[case], f"output_dir={run}"])
        except SystemExit as exc:
            code = exc.code
    if code not in (0, None):
        raise RuntimeError(f"lorafit train for {case} exited with {code}: {' '.join(err.getvalue().split())}")
    return run


def step_rule_values(case: str, out_dir: Path) -> dict[str, Any]:
    """The pins of one step-rule case: per-step loss and grad norm, |final adapter| summed."""
    from safetensors.torch import load_file

    from lorafit.config import load_run_config

    run = train_run(case, out_dir)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "split" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4], [r.get("step") for r in rows]
    state = load_file(str(run / "adapter" / "lorafit_adapter.safetensors"))
    return {
        "overrides": list(STEP_RULE_CASES[case]),
        "config": config_values(load_run_config(run).optimizer),
        "loss": [float(r["loss"]) for r in rows],
        "grad_norm": [float(r["grad_norm"]) for r in rows],
        "adapter_abs_sum": float(sum(v.double().abs().sum() for v in state.values())),
        "adapter_tensors": len(state),
    }


# ------------------------------------------------------------------------------------------ main
def all_values() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        return {
            "_about": "Pinned regression values written by scripts/pin_values.py; regenerate only on purpose "
                      "and list the intended numerical changes in the commit message.",
            "adapters": {case: adapter_values(case) for case in ADAPTER_CASES},
            "step_rules": {case: step_rule_values(case, Path(tmp) / case) for case in STEP_RULE_CASES},
        }


def to_json(values: dict[str, Any]) -> str:
    return json.dumps(values, indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PINS_FILE, help=f"where to write (default: {PINS_FILE})")
    args = parser.parse_args(argv)
    text = to_json(all_values())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}: {len(json.loads(text)['adapters'])} adapter cases, "
          f"{len(json.loads(text)['step_rules'])} step-rule cases", file=sys.stderr)


if __name__ == "__main__":
    main()
