"""Trajectory parity with PEFT through the whole trainer (scripts/peft_trajectory.py, docs/benchmarks.md).

``lorafit train model=minilm adapter=lora`` runs in-process for a dozen steps with dropout off; a plain
transformers + PEFT model gets lorafit's start state (LoRA factors, head, every base tensor), the same
examples in the same order tokenised by the tokenizer itself, and a plain torch loop (AdamW without
decay, a warm-up + linear decay written in the script, ``clip_grad_norm_``, the model's own mean loss).
The per-step losses must agree to 1e-4 relative.

What it catches, beyond the layer-level logit tests (test_lora.py): a warm-up or decay off by one step
(the lr of step 2 differs: the loss of step 3 moves), a loss that is not the batch mean, clipping over
another set of tensors or at another norm, a trainable set that differs from PEFT's (the head's bias,
the pooler's LoRA), weight decay by default, and for pairs a batch without ``token_type_ids``, another
truncation of the pair, or other padding (the batches are also compared tensor by tensor).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import peft_trajectory  # noqa: E402  (scripts/peft_trajectory.py: the one implementation of the check)

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

GLUE = REPO / "tests" / "fixtures" / "glue"


def check(result: peft_trajectory.Parity, steps: int) -> None:
    assert len(result.lorafit) == len(result.peft) == steps
    assert result.same_batches
    assert result.trainable[0] == result.trainable[1]
    # the copy did the work: the PEFT load started elsewhere (a head and A factors of another seed)
    assert any(".lora_A." in d for d in result.differed) and any(d.startswith("classifier.") for d in result.differed)
    assert max(result.rel) <= 1e-4, list(zip(result.lorafit, result.peft))
    assert max(result.lorafit) - min(result.lorafit) > 1e-3      # the losses move: training happened
    assert result.accuracy[0] == result.accuracy[1]                # lorafit's evaluation = the twin's


def test_single_sentence_trajectory_equals_a_plain_peft_loop(tmp_path: Path) -> None:
    # 48 examples, 8 per step: 6 steps per epoch, so the 12 steps cross an epoch boundary; 3 warm-up steps
    result = peft_trajectory.parity("demo", 12, clip=True, out=tmp_path / "run", warmup=3,
                                    extra=("data.max_train_examples=48", "data.max_eval_examples=16",
                                           "data.batch_size=8"))
    check(result, 12)


def test_pair_trajectory_equals_a_plain_peft_loop(tmp_path: Path) -> None:
    # RTE pairs (token_type_ids), cut to 24 tokens (the longest-first truncation of a pair), 4 per step, no clipping
    result = peft_trajectory.parity("rte", 10, clip=False, out=tmp_path / "run", data_path=str(GLUE), warmup=2,
                                    extra=("data.batch_size=4", "data.max_length=24"))
    check(result, 10)
