"""Inits that rewrite W0 (PiSSA, MiLoRA, OLoRA): identity, the SVD/QR references, PEFT parity, and
adapters that still apply to the unmodified base model (issue 4).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.adapters import adapters_disabled
from lorafit.adapters.dora import DoRAConfig
from lorafit.adapters.lora import LoRAConfig
from lorafit.adapters.io import save_adapter
from lorafit.assemble import assemble, load_adapted
from lorafit.inits.svd import MiLoRAInit, OLoRAInit, PiSSAInit
from lorafit.models import load_model, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

INITS = {"pissa": PiSSAInit(), "pissa_fast": PiSSAInit(niter=4), "milora": MiLoRAInit(), "olora": OLoRAInit()}
ADAPTERS = {"lora": LoRAConfig(r=4, alpha=8), "rslora": LoRAConfig(r=4, alpha=8, use_rslora=True),
            "dora": DoRAConfig(r=4, alpha=8)}


def probe_ids() -> torch.Tensor:
    return torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(3))


@torch.no_grad()
def logits(model, ids=None) -> torch.Tensor:
    return model.eval()(input_ids=probe_ids() if ids is None else ids).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(params=["minilm", "llama"])
def arch(request, minilm_cfg, tiny_llama_cfg):
    return (minilm_cfg, "classification") if request.param == "minilm" else (tiny_llama_cfg, "causal_lm")


@pytest.mark.parametrize("adapter", list(ADAPTERS))
@pytest.mark.parametrize("init", list(INITS))
def test_init_identity_and_the_original_base_when_disabled(init: str, adapter: str, arch) -> None:
    model_cfg, task = arch
    base = logits(load_model(model_cfg, task, 2, seed=0, tokenizer=load_tokenizer(model_cfg)))
    assembled = assemble(model_cfg, ADAPTERS[adapter], INITS[init], task, 2, seed=0)
    layers = assembled.layers.values()
    assert all(layer.rebased for layer in layers)
    assert all(torch.count_nonzero(layer.lora_B) > 0 for layer in layers)   # not the trivial B = 0 start
    assert relative(logits(assembled.model), base) <= 1e-4
    with torch.no_grad():
        for layer in layers:
            layer.lora_B.mul_(1.5)
    assert relative(logits(assembled.model), base) > 1e-3
    with adapters_disabled(assembled.model):            # switched off = the original W0, not the residual
        assert relative(logits(assembled.model), base) <= 1e-4


def _layer(minilm_cfg, init, adapter="lora", name="bert.encoder.layer.2.attention.self.key"):
    assembled = assemble(minilm_cfg, ADAPTERS[adapter], init, "classification", 2, seed=0)
    w0 = load_model(minilm_cfg, "classification", 2).get_submodule(name).weight.detach().double()
    return assembled.layers[name], w0


@pytest.mark.parametrize("which", ["pissa", "pissa_fast", "milora"])
def test_svd_inits_take_the_right_singular_triplets(which: str, minilm_cfg) -> None:
    layer, w0 = _layer(minilm_cfg, INITS[which])
    U, S, Vh = torch.linalg.svd(w0, full_matrices=False)
    picked = slice(len(S) - 4, len(S)) if which == "milora" else slice(0, 4)
    U, S, Vh = U[:, picked], S[picked], Vh[picked]
    A, B, s = layer.lora_A.double(), layer.lora_B.double(), layer.scaling
    if which == "pissa_fast":
        # randomised SVD with q = r (as in the paper's fast PiSSA): on this flat spectrum it finds a
        # near-top subspace, not the exact one; s·BA is rank r with nearly the top singular values,
        # and the base is exactly W0 − s·BA
        found = torch.linalg.svdvals(s * B @ A)[:4]
        assert (found >= 0.9 * S).all() and (found <= S * (1 + 1e-6)).all()
        assert relative(layer.base.weight.double(), w0 - s * B @ A) <= 1e-5
        return
    assert relative(s * B @ A, (U * S) @ Vh) <= 1e-4          # s·BA = U_r S_r V_rᵀ (sign-free)
    # A's rows are ±√(S_i/s) v_i and B's columns ±√(S_i/s) u_i, the same sign in a pair
    signs = torch.sign((A * Vh).sum(1))
    assert relative(A, signs[:, None] * (S / s).sqrt()[:, None] * Vh) <= 1e-4
    assert relative(B, signs[None, :] * U * (S / s).sqrt()[None, :]) <= 1e-4
    assert relative(layer.base.weight.double(), w0 - (U * S) @ Vh) <= 1e-4


def test_olora_is_the_qr_start(minilm_cfg) -> None:
    layer, w0 = _layer(minilm_cfg, OLoRAInit())
    Q, R = torch.linalg.qr(w0)
    assert relative(layer.lora_B.double(), Q[:, :4]) <= 1e-5
    assert relative(layer.lora_A.double(), R[:4]) <= 1e-5
    assert relative(layer.base.weight.double(), w0 - layer.scaling * Q[:, :4] @ R[:4]) <= 1e-5


# (The randomised PiSSA draws its random test matrix from the global RNG in a different order on
# each side, so only the exact inits can agree factor for factor.)
@pytest.mark.parametrize("init,peft_name", [("pissa", "pissa"), ("olora", "olora")])
def test_parity_with_peft(init: str, peft_name: str, minilm_cfg) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    targets = ["query", "value"]
    torch.manual_seed(0)
    ours = assemble(minilm_cfg, LoRAConfig(r=4, alpha=8, target_modules=targets), INITS[init],
                    "classification", 2, seed=0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_cfg.name_or_path, num_labels=2)
    base.classifier.load_state_dict(ours.model.classifier.state_dict())
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                       init_lora_weights=peft_name))
    for name, layer in ours.layers.items():
        module = theirs.base_model.model.get_submodule(name)
        A, B = module.lora_A["default"].weight, module.lora_B["default"].weight
        # PiSSA's singular vectors are each defined up to sign (PEFT's LAPACK SVD and our Gram route
        # may pick either): a pair (row i of A, column i of B) may flip together — the same s·BA and
        # the same training, mirrored; the rows themselves must match, to PEFT's fp32 SVD's accuracy
        # (its top vectors here are ~1e-5 off the fp64 SVD's, ours ~1e-8). OLoRA's Householder QR: exactly.
        signs = torch.sign((layer.lora_A * A).sum(1)) if init == "pissa" else torch.ones(A.shape[0])
        tol = 1e-4 if init == "pissa" else 1e-5
        assert relative(layer.lora_A, signs[:, None] * A) <= tol
        assert relative(layer.lora_B, B * signs[None, :]) <= tol
        assert relative(layer.base.weight, module.base_layer.weight) <= tol
    with torch.no_grad():
        ids = probe_ids()
        assert relative(ours.model.eval()(input_ids=ids).logits, theirs.eval()(input_ids=ids).logits) <= 1e-4


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_saved_adapter_applies_to_the_original_base(adapter: str, minilm_cfg, tmp_path: Path) -> None:
    assembled = assemble(minilm_cfg, ADAPTERS[adapter], PiSSAInit(), "classification", 2, seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():   # as after training
        for layer in assembled.layers.values():
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=gen) * 0.05)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=gen) * 0.05)
    save_adapter(tmp_path / "adapter", assembled.model, assembled.meta)
    state = load_file(str(tmp_path / "adapter" / "lorafit_adapter.safetensors"))
    assert sum(k.endswith(".init_A") for k in state) == len(assembled.layers)   # the stored init factors
    loaded = load_adapted(tmp_path / "adapter")                # onto the original, unmodified base
    assert all(layer.rebased for layer in loaded.layers.values())
    assert relative(logits(loaded.model), logits(assembled.model)) <= 1e-5


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_lorafit_merge_onto_the_original_base_reproduces_the_trained_model(adapter: str, tmp_path: Path,
                                                                          run_cli) -> None:
    from transformers import AutoModelForSequenceClassification

    run, merged = tmp_path / "run", tmp_path / "merged"
    args = ("model=tiny_llama", "data=sentiment_demo", "data.max_train_examples=16", "data.max_eval_examples=8",
            "data.batch_size=8", "max_steps=3", "optimizer.lr=1e-2", "progress=false", "eval_at_start=false",
            f"adapter={adapter}", "adapter.r=4", "init=pissa", "init.niter=2", f"output_dir={run}")
    assert (r := run_cli("train", *args)).code == 0, r.text
    assert (r := run_cli("merge", str(run), str(merged))).code == 0, r.text
    # the run's base folder holds the original random Llama (load_adapted checks its fingerprint),
    # and the adapter is rebuilt on it from the stored init factors
    adapted = load_adapted(run / "adapter")
    assert all(layer.rebased for layer in adapted.layers.values())
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    ids = probe_ids()
    assert relative(logits(plain, ids), logits(adapted.model, ids)) <= 1e-4
    with adapters_disabled(adapted.model):
        assert relative(logits(adapted.model, ids), logits(plain, ids)) > 1e-4
