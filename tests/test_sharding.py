"""``hardware.sharding=fsdp`` (FSDP2) on 2 CPU processes (gloo): the same training as one process.

With dropout off, a 2-process FSDP run of the tiny Llama ends with the adapter of a 1-process run
(1e-5) and the same losses; its dev split of 15 examples (not a multiple of 2: the second process's
share is padded so both run the same number of forwards, each one a collective) scores the same; a
run stopped at a checkpoint and resumed under FSDP equals the uninterrupted one; the adapter saved
from shards is the single-process format (merge reads it without torch.distributed); and what
cannot run sharded is refused at start with the reason. QLoRA (an nf4 base) runs sharded too, with
the adapter of one process.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.test_train import SENTIMENT, TINY, adapter_of, max_diff, train, train_records, two_processes

COMMON = (*TINY, *SENTIMENT, "data.max_eval_examples=15", "model.dropout=0.0", "optimizer.lr=2e-3",
          "max_grad_norm=1.0")


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_evaluates_resumes_and_merges_like_one(tmp_path: Path, run_cli) -> None:
    one = train(tmp_path / "one", *COMMON, "max_steps=4", "hardware=cpu")
    proc = two_processes(tmp_path / "fsdp", *COMMON, "max_steps=4", "save_every=2", "hardware.sharding=fsdp")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fsdp = tmp_path / "fsdp"
    held = re.search(r"this process holds ([\d,]+) of ([\d,]+) values", " ".join(proc.stderr.split()))
    assert held and int(held[1].replace(",", "")) <= int(held[2].replace(",", "")) // 2 + 1000
    assert max_diff(adapter_of(fsdp), adapter_of(one)) < 1e-5
    for a, b in zip(train_records(one), train_records(fsdp), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    results = [json.loads((r / "results.json").read_text()) for r in (one, fsdp)]
    assert results[0] == results[1] and results[0]["sentiment_demo"]["n"] == 15

    # killed just after the step-2 checkpoint (its folder keeps that checkpoint and the config), then
    # resumed under FSDP: the optimizer state, gathered by name and re-sharded, gives the same run
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    shutil.copy(fsdp / "config.yaml", resumed / "config.yaml")
    proc = two_processes(resumed, *COMMON, "max_steps=4", "save_every=2", "hardware.sharding=fsdp", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout + proc.stderr
    assert max_diff(adapter_of(resumed), adapter_of(fsdp)) < 1e-6
    tail = [(r["step"], r["loss"]) for r in train_records(fsdp)][2:]
    assert [(r["step"], pytest.approx(r["loss"], abs=1e-6)) for r in train_records(resumed)] == tail

    result = run_cli("merge", str(fsdp), str(tmp_path / "merged"))
    assert result.code == 0, result.text


def test_what_cannot_run_sharded_is_refused_with_the_reason(tmp_path: Path, run_cli) -> None:
    result = run_cli("train", f"output_dir={tmp_path / 'a'}", *TINY, "+adapter=adalora", "hardware.sharding=fsdp",
                     "model.quantization=int8", "max_steps=2")
    assert result.code == 2 and "Traceback" not in result.text
    assert "hardware=fsdp cannot run this" in result.text and "RankAllocator" in result.text
    assert "one process" in result.text and "hardware=ddp" in result.text
    assert "model.quantization=int8: bitsandbytes' Linear8bitLt" in result.text and "nf4 or fp4" in result.text


@pytest.mark.slow
def test_qlora_on_two_fsdp_processes_trains_resumes_and_merges_like_one(tmp_path: Path, run_cli) -> None:
    """An nf4 base sharded as bitsandbytes stores it (uint8 shards; the gathered weight is read with the
    layer's quant_state). Quantisation is deterministic, so the two runs compute with the same 4-bit
    codes and scales and differ only by the order of fp32 sums (about 5e-7 after 3 steps): 1e-5 holds.
    What it catches: PiSSA re-quantises W0 into its residual, and a gathered weight read with the
    load-time quant_state (stale) moves the adapter by 8e-3; DoRA dequantises W0 for its row norm
    inside the forward, where the weight is the gathered plain tensor (read unquantised: a crash)."""
    args = (*COMMON, "model.quantization=nf4", "+adapter=dora", "init=pissa", "hardware.gradient_checkpointing=true",
            "max_steps=3", "save_every=2")
    one = train(tmp_path / "one", *args, "hardware=cpu")
    fsdp = tmp_path / "fsdp"
    proc = two_processes(fsdp, *args, "hardware.sharding=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    held = re.search(r"this process holds ([\d,]+) of ([\d,]+) values", " ".join(proc.stderr.split()))
    assert held and int(held[1].replace(",", "")) <= int(held[2].replace(",", "")) // 2 + 1000
    assert max_diff(adapter_of(fsdp), adapter_of(one)) < 1e-5
    results = [json.loads((r / "results.json").read_text()) for r in (one, fsdp)]
    assert results[0] == results[1] and results[0]["sentiment_demo"]["n"] == 15

    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    shutil.copy(fsdp / "config.yaml", resumed / "config.yaml")
    proc = two_processes(resumed, *args, "hardware.sharding=fsdp", "resume=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(adapter_of(resumed), adapter_of(fsdp)) < 1e-6

    result = run_cli("merge", str(fsdp), str(tmp_path / "merged"))     # onto the full-precision base
    assert result.code == 0, result.text
    assert json.loads((tmp_path / "merged" / "lorafit_merge.json").read_text())["dtype"] == "float32"


@pytest.mark.slow
def test_dora_with_checkpointing_trains_sharded_like_one_process(tmp_path: Path) -> None:
    """DoRA's own backward (the magnitude's gradient through the detached norm) and transformers'
    checkpointing recompute run inside FSDP's gathered layers: the same adapter as one process."""
    args = (*COMMON, "+adapter=dora", "hardware.gradient_checkpointing=true", "max_steps=3")
    one = train(tmp_path / "one", *args, "hardware=cpu")
    proc = two_processes(tmp_path / "fsdp", *args, "hardware.sharding=fsdp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(adapter_of(tmp_path / "fsdp"), adapter_of(one)) < 1e-5


@pytest.mark.slow
def test_rl_samples_in_step_under_fsdp_and_learns_what_ddp_learns(tmp_path: Path) -> None:
    """generate(synced_gpus=True): a process whose completions ended keeps running forwards until both
    have finished; the samples, rewards and adapter are those of 2 DDP processes (same seeds)."""
    from tests.test_rlhf import RL_ARGS, TOY

    args = (*TINY, *RL_ARGS, TOY, "max_steps=3", "optimizer.lr=1e-2")
    ddp, fsdp = (two_processes(tmp_path / mode, *args, f"hardware.sharding={mode}") for mode in ("none", "fsdp"))
    assert ddp.returncode == 0 and fsdp.returncode == 0, fsdp.stderr[-3000:]
    assert max_diff(adapter_of(tmp_path / "fsdp"), adapter_of(tmp_path / "none")) < 1e-6
    assert [r["reward_mean"] for r in train_records(tmp_path / "fsdp")] == \
        [r["reward_mean"] for r in train_records(tmp_path / "none")]


def test_a_failing_process_started_by_lorafit_ends_in_its_paragraph_not_a_traceback(tmp_path: Path) -> None:
    proc = two_processes(tmp_path / "run", *TINY, "data=instruct", f"data.path={tmp_path / 'missing.json'}",
                         "max_steps=1")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text
    assert "missing.json does not exist" in text and "Traceback" not in text
