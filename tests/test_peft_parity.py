"""Parity with Hugging Face PEFT where it has the method: Bone and Bat (PEFT's MiSS) and AdaLoRA.

LoRA, rsLoRA and DoRA parity live in ``test_lora.py`` and ``test_dora.py``. Each test loads the
same (random, non-zero) adapter weights into both implementations on the real MiniLM and compares
logits within 1e-5; for AdaLoRA also the budget schedule step by step, and the masks chosen when
both rank allocators see the same gradients, the orthogonality penalty and the rank pattern.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorafit.adapters.adalora import AdaLoRAConfig, RankAllocator, budget_schedule
from lorafit.adapters.bone import BatConfig, BoneConfig
from lorafit.assemble import assemble

peft = pytest.importorskip("peft")

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

# query, value, attention.output.dense (384→384), intermediate.dense (384→1536), output.dense (1536→384);
# one regex, which both libraries read as a full match of the module name.
PATTERN = r".*\.(query|value|intermediate\.dense|output\.dense)"
TARGETS = [PATTERN]


def pair(minilm_cfg, ours_cfg, peft_cfg):
    """(our adapted MiniLM, PEFT's adapted MiniLM) with the same classifier head."""
    from transformers import AutoModelForSequenceClassification

    assembled = assemble(minilm_cfg, ours_cfg, None, "classification", 2, seed=0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_cfg.name_or_path, num_labels=2)
    base.classifier.load_state_dict(assembled.model.classifier.state_dict())
    theirs = peft.get_peft_model(base, peft_cfg)
    return assembled, theirs


def probe_ids() -> torch.Tensor:
    return torch.randint(5, 1000, (3, 11), generator=torch.Generator().manual_seed(5))


def assert_same_logits(ours, theirs, atol: float = 1e-5) -> float:
    ids = probe_ids()
    with torch.no_grad():
        a, b = ours.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits
    diff = float((a - b).abs().max())
    assert diff <= atol, diff
    return diff


@pytest.mark.parametrize("kind", ["bone", "bat"])
def test_bone_and_bat_match_peft_miss(kind: str, minilm_cfg) -> None:
    r = 20 if kind == "bone" else 16      # Bone with a ragged last block (384 = 19·20 + 4)
    ours_cfg = (BoneConfig if kind == "bone" else BatConfig)(r=r, target_modules=TARGETS)
    peft_cfg = peft.MissConfig(r=r, target_modules=PATTERN, init_weights="bat" if kind == "bat" else True)
    assembled, theirs = pair(minilm_cfg, ours_cfg, peft_cfg)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, layer in assembled.layers.items():
            D = layer.bone_D if kind == "bone" else layer.bat_D
            D.copy_(torch.randn(D.shape, generator=gen) * 0.02)
            theirs.base_model.model.get_submodule(name).miss_block["default"].copy_(D)
    assert len(assembled.layers) == 30
    base_ids = probe_ids()
    with torch.no_grad(), theirs.disable_adapter():
        base = theirs(input_ids=base_ids).logits
    assert float((assembled.model(input_ids=base_ids).logits - base).abs().max()) > 1e-3   # not trivial
    assert_same_logits(assembled.model, theirs)


def _adalora_pair(minilm_cfg, total: int, tinit: int, tfinal: int):
    ours_cfg = AdaLoRAConfig(init_r=6, target_r=3, alpha=8, tinit=tinit, tfinal=tfinal, target_modules=TARGETS)
    peft_cfg = peft.AdaLoraConfig(init_r=6, target_r=3, lora_alpha=8, tinit=tinit, tfinal=tfinal, deltaT=1,
                                  beta1=0.85, beta2=0.85, orth_reg_weight=0.5, total_step=total,
                                  target_modules=PATTERN)
    assembled, theirs = pair(minilm_cfg, ours_cfg, peft_cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, layer in assembled.layers.items():
            layer.lora_E.copy_(torch.randn(6, generator=gen) * 0.5)
            module = theirs.base_model.model.get_submodule(name)
            for pname in ("lora_A", "lora_E", "lora_B"):
                getattr(module, pname)["default"].copy_(getattr(layer, pname).view_as(getattr(module, pname)["default"]))
    return ours_cfg, assembled, theirs


def test_adalora_forward_and_orthogonal_penalty_match_peft(minilm_cfg) -> None:
    cfg, assembled, theirs = _adalora_pair(minilm_cfg, total=10, tinit=1, tfinal=2)
    assert_same_logits(assembled.model, theirs)
    ids, labels = probe_ids(), torch.tensor([0, 1, 1])
    theirs.eval()  # no dropout: both sides see the same logits; AdaLoraModel.forward adds the penalty
    peft_loss = theirs.base_model(input_ids=ids, labels=labels).loss        # cross-entropy + orth_reg · R
    model = assembled.model.eval()
    trainer = SimpleNamespace(unwrapped=lambda: model)
    ours = F.cross_entropy(model(input_ids=ids).logits, labels) + RankAllocator(cfg).extra_loss(trainer)
    assert abs(float(ours - peft_loss)) <= 1e-5
    assert float(RankAllocator(cfg).extra_loss(trainer)) > 1e-2


def test_adalora_budget_schedule_matches_peft(minilm_cfg) -> None:
    total, tinit, tfinal = 40, 5, 8
    _, assembled, theirs = _adalora_pair(minilm_cfg, total, tinit, tfinal)
    allocator = theirs.base_model.rankallocator
    b0, bT = 6 * len(assembled.layers), 3 * len(assembled.layers)
    seen = set()
    for t in range(1, total + 1):
        budget, mask = budget_schedule(t, total, b0, bT, tinit, tfinal, 1)
        assert (budget, mask) == allocator.budget_schedule(t), t
        seen.add(budget)
    assert b0 in seen and bT in seen and len(seen) > 10      # the cubic decrease really happened


def test_adalora_masks_match_peft_given_the_same_gradients(minilm_cfg) -> None:
    """Both allocators see identical gradients and parameter moves; after every step the E
    entries (pruned ones zeroed) and the rank patterns agree, through the final freeze."""
    total, tinit, tfinal = 8, 1, 2
    cfg, assembled, theirs = _adalora_pair(minilm_cfg, total, tinit, tfinal)
    model = assembled.model
    ours = RankAllocator(cfg)
    peft_modules = {name: theirs.base_model.model.get_submodule(name) for name in assembled.layers}
    gen = torch.Generator().manual_seed(2)
    pruned_at_some_point = False
    for t in range(1, total + 1):
        with torch.no_grad():
            for name, layer in assembled.layers.items():
                for pname in ("lora_A", "lora_E", "lora_B"):
                    mine, other = getattr(layer, pname), getattr(peft_modules[name], pname)["default"]
                    grad = torch.randn(mine.shape, generator=gen)
                    mine.sub_(0.01 * grad)                              # the same "optimizer step" on both
                    other.sub_(0.01 * grad.view_as(other))
                    mine.grad, other.grad = grad.clone(), grad.view_as(other).clone()
        trainer = SimpleNamespace(step=t - 1, total_steps=total, unwrapped=lambda: model,
                                  assembled=SimpleNamespace(meta={"adapter": {}}))
        ours.after_optimizer_step(trainer)
        theirs.base_model.update_and_allocate(t)
        for name, layer in assembled.layers.items():
            other_E = peft_modules[name].lora_E["default"].view(-1)
            assert torch.equal(layer.lora_E == 0, other_E == 0), (t, name)
            assert torch.allclose(layer.lora_E, other_E, atol=1e-7)
        if t >= tinit + 1:
            pattern = theirs.peft_config["default"].rank_pattern
            got = trainer.assembled.meta["adapter"].get("kept_triplets") or ours.kept_triplets
            for name in assembled.layers:
                assert got[name] == pattern[f"{name}.lora_E.default"], (t, name)
            pruned_at_some_point |= any(not all(v) for v in got.values())
    assert pruned_at_some_point
    kept = sum(sum(v) for v in ours.kept_triplets.values())
    assert kept == 3 * len(assembled.layers)                      # target_r per layer on average
    assert_same_logits(model, theirs)
