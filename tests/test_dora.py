"""DoRA exactness: init identity, the paper's formula, the detached norm, gradcheck of the custom
backward in every recompute mode, bf16, no B·A formed, merge/unmerge, PEFT parity."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lorafit.adapters import adapters_disabled, fold_into_base
from lorafit.adapters.dora import DoRAConfig, DoRALinear, DoRAProduct
from lorafit.assemble import assemble
from lorafit.config import ConfigError


def _randomise(layer: DoRALinear, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) * 0.3)
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
        layer.magnitude.mul_(1 + 0.2 * torch.rand(layer.magnitude.shape, generator=gen))


def _reference_weight(w0: torch.Tensor, A: torch.Tensor, B: torch.Tensor, m: torch.Tensor, s: float) -> torch.Tensor:
    """W' = m ⊙ (W0 + sBA) / ‖W0 + sBA‖_row, straight from methods.md (materialised)."""
    v = w0 + s * B @ A
    return m[:, None] * v / torch.linalg.vector_norm(v, dim=1, keepdim=True)


@pytest.fixture
def layer() -> DoRALinear:
    base = nn.Linear(24, 16)
    dora = DoRAConfig(r=4, alpha=8).wrap(base)
    _randomise(dora, 1)
    return dora


def test_row_norm_without_materialising_matches_direct_norm(layer: DoRALinear) -> None:
    direct = torch.linalg.vector_norm(layer.base.weight + layer.scaling * layer.lora_B @ layer.lora_A, dim=1)
    assert torch.allclose(layer.row_norm(), direct, atol=1e-5)


def test_effective_weight_matches_reference_formula(layer: DoRALinear) -> None:
    x = torch.eye(24)
    effective = (layer(x) - layer.base.bias).T  # column j = W' e_j
    expected = _reference_weight(layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling)
    assert torch.allclose(effective, expected, atol=1e-5)
    assert torch.allclose(layer.merged_weight(), expected, atol=1e-5)


@torch.no_grad()
def test_a_rebasing_init_recomputes_the_cached_norm_of_the_new_base() -> None:
    """After PiSSA rewrites the base to ``W_res = W0 − s·B0A0``, m must be the row norms of the original
    W0 and the layer must apply ``m ⊙ (W_res + sBA)/‖W_res + sBA‖`` once B moves. Kills a stale
    cached ‖W0‖² (the norm of the base before the rebase) left in ``row_norm`` by ``reset_magnitude``."""
    from lorafit.inits.svd import PiSSAInit

    torch.manual_seed(0)
    layer = DoRAConfig(r=4, alpha=8).wrap(nn.Linear(24, 16))
    w0 = layer.base.weight.clone()
    PiSSAInit().apply({"layer": layer})
    assert (layer.base.weight - w0).abs().max() > 1e-2                     # the base really changed
    assert torch.allclose(layer.magnitude, torch.linalg.vector_norm(w0, dim=1), atol=1e-5)
    layer.lora_B.add_(torch.randn(layer.lora_B.shape) * 0.1)
    expected = _reference_weight(layer.base.weight, layer.lora_A, layer.lora_B, layer.magnitude, layer.scaling)
    assert torch.allclose((layer(torch.eye(24)) - layer.base.bias).T, expected, atol=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
def test_norm_is_detached_in_the_gradient(layer: DoRALinear, recompute: bool) -> None:
    """Gradients equal those of the reference with ‖·‖ treated as a constant (paper §4.3), whether
    the magnitude gradient reads the kept output or recomputes W0 x (``adapter.recompute``)."""
    layer.recompute = recompute
    x = torch.randn(5, 24, requires_grad=True)
    layer(x).pow(2).sum().backward()
    A = layer.lora_A.detach().clone().requires_grad_(True)
    B = layer.lora_B.detach().clone().requires_grad_(True)
    m = layer.magnitude.detach().clone().requires_grad_(True)
    v = layer.base.weight + layer.scaling * B @ A
    n = torch.linalg.vector_norm(v, dim=1).detach()
    x_ref = x.detach().clone().requires_grad_(True)
    y = (m / n)[None] * (x_ref @ v.T) + layer.base.bias
    y.pow(2).sum().backward()
    for ours, ref in ((layer.lora_A, A), (layer.lora_B, B), (layer.magnitude, m), (x, x_ref)):
        assert torch.allclose(ours.grad, ref.grad, rtol=1e-4, atol=1e-5)


def test_recompute_keeps_no_output_sized_tensor() -> None:
    """``adapter.recompute=true`` keeps no tensor of the layer's output size for the backward pass,
    ``false`` keeps the output itself, ``auto`` recomputes in square layers only: every saved tensor
    of shape (tokens, 40) that is not the input x must be the output y."""
    cases = (("false", 24, 1), ("true", 24, 0), ("auto", 24, 1), ("auto", 40, 0))
    for recompute, in_features, expected in cases:
        layer = DoRAConfig(r=4, alpha=8, recompute=recompute).wrap(nn.Linear(in_features, 40))
        x = torch.randn(3, 5, in_features, requires_grad=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
        storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
        kept = [t for t in saved if t.shape == (15, 40) and storage(t) != storage(x)]
        assert len(kept) == expected, (recompute, in_features, [tuple(t.shape) for t in saved])
        assert all(storage(t) == storage(y) for t in kept)


def test_recompute_option_values() -> None:
    assert DoRAConfig(recompute=True).recompute == "true"          # a YAML boolean is accepted
    assert DoRAConfig(recompute="False").recompute == "false"
    with pytest.raises(ConfigError, match="adapter.recompute"):
        DoRAConfig(recompute="sometimes")


@pytest.mark.parametrize("tokens", [6, 3])
@pytest.mark.parametrize("recompute", [False, True])
def test_product_gradients_pass_gradcheck_and_gradgradcheck(recompute: bool, tokens: int) -> None:
    """DoRAProduct's hand-written backward (x, h, B, m, W0 and b all with gradients) against finite
    differences in float64, and its double backward (CTR's curvature products) likewise; 6 tokens
    scale W0's rows, 3 (fewer than the 5 input features) the output's."""
    gen = torch.Generator().manual_seed(0)
    def arg(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(True)
    x, h, B, w0, bias = arg(tokens, 5), arg(tokens, 3), arg(4, 3), arg(4, 5), arg(4)
    m = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).requires_grad_(True)
    n = torch.rand(4, generator=gen, dtype=torch.float64) + 0.5
    fn = lambda x, h, B, m, w0, bias: DoRAProduct.apply(x, h, B, m, n, w0, bias, recompute)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, h, B, m, w0, bias))
    assert torch.autograd.gradgradcheck(fn, (x, h, B, m, w0, bias))


def test_merge_unmerge_roundtrip(layer: DoRALinear) -> None:
    x = torch.randn(7, 24)
    w0 = layer.base.weight.detach().clone()
    before = layer(x)
    layer.merge()
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.merge()  # idempotent
    layer.unmerge()
    assert torch.allclose(layer.base.weight, w0, atol=1e-5)
    assert torch.allclose(layer(x), before, atol=1e-5)


@pytest.mark.parametrize("which", ["minilm", "tiny_llama"])
def test_init_identity_and_fold(which: str, minilm_cfg, tiny_llama_cfg) -> None:
    model_cfg = minilm_cfg if which == "minilm" else tiny_llama_cfg
    task = "classification" if which == "minilm" else "causal_lm"
    assembled = assemble(model_cfg, DoRAConfig(r=4, alpha=8), None, task, 2, seed=0)
    model = assembled.model.eval()
    ids = torch.randint(5, 1000, (2, 9))
    with adapters_disabled(model):
        base_logits = model(input_ids=ids).logits
    assert torch.allclose(model(input_ids=ids).logits, base_logits, atol=1e-5)
    for i, layer in enumerate(assembled.layers.values()):
        _randomise(layer, i)
    adapted = model(input_ids=ids).logits
    assert not torch.allclose(adapted, base_logits, atol=1e-3)
    folded = fold_into_base(copy.deepcopy(model))
    assert not any(isinstance(m, DoRALinear) for m in folded.modules())
    assert torch.allclose(folded(input_ids=ids).logits, adapted, atol=1e-4)


def test_parity_with_peft_dora(minilm_cfg) -> None:
    peft = pytest.importorskip("peft")
    assembled = assemble(minilm_cfg, DoRAConfig(r=4, alpha=8, target_modules=["query", "value"]), None,
                         "classification", 2, seed=0)
    ours = assembled.model.eval()
    for i, layer in enumerate(assembled.layers.values()):
        _randomise(layer, i)
    from transformers import AutoModelForSequenceClassification
    base = AutoModelForSequenceClassification.from_pretrained(minilm_cfg.name_or_path, num_labels=2)
    base.classifier.load_state_dict(ours.classifier.state_dict())
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                       use_dora=True)).eval()
    for name, layer in assembled.layers.items():
        module = theirs.base_model.model.get_submodule(name)
        with torch.no_grad():
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
            module.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    ids = torch.randint(5, 1000, (3, 11))
    assert torch.allclose(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, atol=1e-5)


def test_dropout_in_training_matches_peft_dora() -> None:
    """adapter.dropout > 0 in training: the W0 term of the rescaling sees the dropped input, as in the
    authors' code and PEFT (``W0 x + b + (c−1)·W0·drop(x) + c·s·BA·drop(x)``). Same dropout mask (same
    seed, one draw per forward on both sides): the same output and gradients of A, B, m."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 12))
    ours = DoRAConfig(r=4, alpha=8, dropout=0.3).wrap(copy.deepcopy(base[0]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3,
                                                                       target_modules=["0"], use_dora=True))
    module = theirs.base_model.model[0]
    with torch.no_grad():
        ours.lora_B.normal_(std=0.2)
        ours.magnitude.mul_(1.3)
        module.lora_A["default"].weight.copy_(ours.lora_A)
        module.lora_B["default"].weight.copy_(ours.lora_B)
        module.lora_magnitude_vector["default"].weight.copy_(ours.magnitude)
    ours.train(), theirs.train()
    x = torch.randn(5, 16)
    torch.manual_seed(3)
    y_ours = ours(x)
    torch.manual_seed(3)
    y_theirs = theirs(x)
    assert torch.allclose(y_ours, y_theirs, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(ours.eval()(x), y_ours, atol=1e-3)   # the dropout really acted
    (y_ours * torch.arange(12.0)).sum().backward()
    (y_theirs * torch.arange(12.0)).sum().backward()
    pairs = ((ours.lora_A, module.lora_A["default"].weight), (ours.lora_B, module.lora_B["default"].weight),
             (ours.magnitude, module.lora_magnitude_vector["default"].weight))
    for mine, peft_param in pairs:
        assert torch.allclose(mine.grad, peft_param.grad, atol=1e-5)


@pytest.mark.parametrize("recompute", ["true", "false"])
@pytest.mark.parametrize("precision", ["autocast", "bf16_base"])
def test_half_precision_matches_float32(recompute: str, precision: str) -> None:
    """Under bf16 autocast (``hardware.mixed_precision=bf16``) and on a bf16 base
    (``model.dtype=bfloat16``) the output and every gradient agree with fp32 to bf16 accuracy."""
    torch.manual_seed(0)
    layer = DoRAConfig(r=4, alpha=8, recompute=recompute).wrap(nn.Linear(24, 24))
    _randomise(layer, 0)
    x = torch.randn(2, 5, 24, requires_grad=True)
    reference = layer(x)
    reference.pow(2).sum().backward()
    expected = {name: p.grad.clone() for name, p in layer.named_parameters()} | {"x": x.grad.clone()}
    layer.zero_grad()
    x.grad = None
    if precision == "autocast":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
    else:
        layer.base.to(torch.bfloat16)
        layer.w0_norm_sq = torch.zeros(0)
        y = layer(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16
    y.float().pow(2).sum().backward()
    assert torch.allclose(y.float(), reference, rtol=2e-2, atol=2e-2)
    got = {name: p.grad for name, p in layer.named_parameters()} | {"x": x.grad}
    for name, grad in expected.items():
        assert (got[name].float() - grad).norm() <= 2e-2 * grad.norm(), name


@pytest.mark.parametrize("recompute", ["true", "false"])
def test_training_step_never_forms_B_times_A(recompute: str) -> None:
    """No matrix product in DoRA's forward or backward has the rank r as its inner size and an
    out×in result, i.e. ``B·A`` is never formed (the norm comes from r-sized products)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    products = []

    class RecordProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            packet = func.overloadpacket
            if packet in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
                first = args[1] if packet in (torch.ops.aten.addmm, torch.ops.aten.addmm_) else args[0]
                products.append((first.shape[-1], tuple(out.shape)))
            return out

    layer = DoRAConfig(r=4, alpha=8, recompute=recompute).wrap(nn.Linear(24, 40))
    _randomise(layer, 0)
    x = torch.randn(3, 10, 24, requires_grad=True)
    with RecordProducts():
        layer(x).pow(2).sum().backward()
    assert (4, (30, 40)) in products                 # the mode sees the rank-r product h·(c⊙B)ᵀ
    assert not [p for p in products if p[0] == 4 and p[1][-2:] == (40, 24)], products
