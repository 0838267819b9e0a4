"""The step rules of the optimizer group: LoRA+, RefLoRA and RefLoRA-S (docs/step_rules.md).

1. LoRA+: the parameter groups of ``optimizer=loraplus`` composed from the CLI on MiniLM (LoRA and
   DoRA, head included), on RoSA / LoRA-Dash layers and a trainable bias inside an adapter layer;
   weight decay in every group; ``ratio=1`` steps exactly like ``optimizer=adamw``; adapters
   without LoRA factors are refused (all three rules) before anything trains.
2. RefLoRA: the preconditioned gradients equal ``S⁻¹ grad_A``, ``grad_B S`` with S the geometric
   mean ``(AAᵀ)⁻¹ # BᵀB`` computed here independently (scipy ``sqrtm``, float64, and checked
   against the Riccati equation ``S (AAᵀ) S = BᵀB``); one preconditioned SGD step equals "refactor
   with P (P Pᵀ = S⁻¹), take the SGD step there, map back"; nothing happens during warm-up.
3. RefLoRA-S: after a step, ‖A‖ = ‖B‖ per layer with B A unchanged and the AdamW moments rescaled
   by 1/p, 1/p², p, p²; nothing during warm-up; zero factors are skipped, not divided by.
4. The CLI: each rule trains the tiny Llama end to end; RefLoRA-S resumed before and after its
   warm-up ends with exactly the adapter of the uninterrupted run.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors.torch import load_file
from torch import nn

from lorafit.adapters import trainable_parameters
from lorafit.adapters.adalora import AdaLoRAConfig
from lorafit.adapters.bone import BoneConfig
from lorafit.adapters.lora import LoRAConfig, LoRALinear
from lorafit.adapters.lora_dash import LoRADashConfig
from lorafit.adapters.rosa import RoSAConfig
from lorafit.adapters.spectral import SpectralConfig
from lorafit.config import ConfigError
from lorafit.optim.loraplus import LoRAPlusConfig
from lorafit.optim.reflora import RefLoRAConfig, RefLoRASConfig

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    """id(parameter) → its parameter group (each parameter must be in exactly one)."""
    found: dict[int, dict] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            assert id(param) not in found
            found[id(param)] = group
    return found


def lr_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {k: g["lr"] for k, g in group_of(optimizer).items()}


def trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def frozen_base(layer: nn.Module, keep_bias: bool = False) -> nn.Module:
    """``cfg.wrap`` alone leaves the base trainable (``attach`` freezes it): freeze it here."""
    layer.base.weight.requires_grad_(False)
    if layer.base.bias is not None:
        layer.base.bias.requires_grad_(keep_bias)
    return layer


@torch.no_grad()
def randomise(layer: LoRALinear, gen: torch.Generator, b_scale: float = 0.3) -> LoRALinear:
    """Non-trivial factors: A, B random and of full rank (B = 0 would make S singular)."""
    layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=gen) / layer.lora_A.shape[1] ** 0.5)
    layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * b_scale)
    return layer


def lora_layer(in_features: int, out_features: int, r: int, gen: torch.Generator) -> LoRALinear:
    return randomise(frozen_base(LoRAConfig(r=r, alpha=2 * r).wrap(nn.Linear(in_features, out_features))), gen)


def trainer_for(model: nn.Module, step: int, optimizer: Any = None) -> SimpleNamespace:
    """What the callbacks read from the trainer: the model, the step, the optimizer."""
    return SimpleNamespace(unwrapped=lambda: model, step=step, optimizer=optimizer)


# ------------------------------------------------------------------------------------ 1. LoRA+
@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_loraplus_groups_on_minilm(adapter: str) -> None:
    from lorafit.assemble import assemble
    from lorafit.cli import compose
    from lorafit.config import validate

    cfg = validate(compose("train", ["model=minilm", f"adapter={adapter}", "adapter.r=4", "optimizer=loraplus",
                                     "optimizer.lr=1e-3", "optimizer.ratio=4", "optimizer.weight_decay=0.01"]))
    assert type(cfg.optimizer) is LoRAPlusConfig
    assembled = assemble(cfg.model, cfg.adapter, cfg.init, "classification", 2)
    named = trainable_parameters(assembled.model)
    optimizer = cfg.optimizer.build(named)
    groups = group_of(optimizer)
    assert len(groups) == len(named)                                 # every trainable tensor, once
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(decay[id(p)] == (0.0 if n.endswith("bias") else 0.01) for n, p in named)   # as PEFT / the authors
    assert optimizer.param_groups[0]["lr"] == 1e-3                   # the logged lr is lr, not λ·lr
    lr = lr_of(optimizer)
    for layer in assembled.layers.values():
        assert lr[id(layer.lora_A)] == pytest.approx(1e-3)
        assert lr[id(layer.lora_B)] == pytest.approx(4e-3)
        if adapter == "dora":
            assert lr[id(layer.magnitude)] == pytest.approx(4e-3)
    head = assembled.model.classifier
    assert lr[id(head.weight)] == pytest.approx(1e-3) and lr[id(head.bias)] == pytest.approx(4e-3)  # 1-D: like B
    assert len(optimizer.param_groups) == 3                          # lr; λ·lr decayed; λ·lr, the bias, not

    # the schedule scales every group alike: λ stays 4 throughout the lr warm-up
    cfg.optimizer.warmup_steps = 5
    scheduler = cfg.optimizer.make_scheduler(optimizer, 10)
    for _ in range(3):
        optimizer.step()
        scheduler.step()
        a, *others = (g["lr"] for g in optimizer.param_groups)
        assert all(b == pytest.approx(4 * a) for b in others) and a < 1e-3


def test_loraplus_extra_tensors_of_rosa_and_lora_dash() -> None:
    model = nn.ModuleDict({
        "rosa": frozen_base(RoSAConfig(r=2, density=0.05, sparse_lr=2e-4).wrap(nn.Linear(20, 10))),
        "rosa_default": frozen_base(RoSAConfig(r=2, density=0.05).wrap(nn.Linear(20, 10))),
        "dash": frozen_base(LoRADashConfig(r=2, s=2).wrap(nn.Linear(20, 10)), keep_bias=True),
        "head": nn.Linear(10, 3),
    })
    optimizer = LoRAPlusConfig(lr=1e-3, ratio=4, weight_decay=0.01).build(trainable(model))
    lr = lr_of(optimizer)
    assert len(lr) == len(trainable(model))
    assert lr[id(model["rosa"].sparse_values)] == 2e-4              # its own lr (adapter.sparse_lr)
    assert lr[id(model["rosa_default"].sparse_values)] == 1e-3      # entries of ΔW: like A, not B
    assert lr[id(model["dash"].dash_d)] == pytest.approx(4e-3)      # 1-D adapter tensor
    assert lr[id(model["dash"].base.bias)] == pytest.approx(4e-3)   # a bias inside an adapter layer
    for name in ("rosa", "rosa_default", "dash"):
        assert lr[id(model[name].lora_A)] == 1e-3
        assert lr[id(model[name].lora_B)] == pytest.approx(4e-3)
    assert lr[id(model["head"].weight)] == 1e-3 and lr[id(model["head"].bias)] == pytest.approx(4e-3)
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model["dash"].base.bias)] == decay[id(model["head"].bias)] == 0.0
    assert decay[id(model["dash"].dash_d)] == decay[id(model["head"].weight)] == 0.01


def test_loraplus_with_ratio_one_is_adamw_weight_decay_included() -> None:
    """λ = 1 is AdamW with the authors' decay groups: every tensor decayed but the biases."""
    gen = torch.Generator().manual_seed(1)
    model = nn.Sequential(lora_layer(12, 8, 3, gen), nn.Linear(8, 2))
    twin = copy.deepcopy(model)
    x = torch.randn(5, 12, generator=gen)
    opt_plus = LoRAPlusConfig(lr=1e-2, ratio=1, weight_decay=0.5).build(trainable(model))
    named = trainable(twin)
    opt_adamw = torch.optim.AdamW([{"params": [p for n, p in named if not n.endswith("bias")], "weight_decay": 0.5},
                                   {"params": [p for n, p in named if n.endswith("bias")], "weight_decay": 0.0}],
                                  lr=1e-2)
    for _ in range(2):
        for m, opt in ((model, opt_plus), (twin, opt_adamw)):
            opt.zero_grad()
            m(x).pow(2).sum().backward()
            opt.step()
    for (name, a), (_, b) in zip(model.named_parameters(), twin.named_parameters()):
        assert torch.equal(a, b), name
    # and ratio 4 really moves B differently (the comparison above could not pass by accident)
    opt4 = LoRAPlusConfig(lr=1e-2, ratio=4, weight_decay=0.5).build(trainable(model))
    before = model[0].lora_B.detach().clone()
    opt4.zero_grad()
    model(x).pow(2).sum().backward()
    opt4.step()
    assert (model[0].lora_B - before).abs().max() > 2 * 1e-2


def no_factor_layers() -> dict[str, nn.Module]:
    return {
        "bone": BoneConfig(r=4).wrap(nn.Linear(16, 16)),
        "adalora": AdaLoRAConfig(init_r=4, target_r=2).wrap(nn.Linear(16, 16)),
        "spectral_a": SpectralConfig(r=4).wrap(nn.Linear(16, 16)),
    }


OPTION = {LoRAPlusConfig: "loraplus", RefLoRAConfig: "reflora", RefLoRASConfig: "reflora_s"}


@pytest.mark.parametrize("option", list(OPTION))
def test_adapters_without_lora_factors_are_refused(option: type) -> None:
    for name, layer in no_factor_layers().items():
        named = [(f"model.q.{n}", p) for n, p in trainable(frozen_base(layer))] + \
                [(f"classifier.{n}", p) for n, p in nn.Linear(16, 2).named_parameters()]
        with pytest.raises(ConfigError) as err:
            option().build(named)
        message = str(err.value)
        assert "adapter=lora" in message and "bone" in message and "\n" not in message
        assert f"optimizer={OPTION[option]}" in message
        kind = {"bone": "bone_D", "adalora": "lora_E", "spectral_a": "spectral_"}[name]
        assert kind in message, message


# ----------------------------------------------------------------------------------- 2. RefLoRA
def reference_metric(A: torch.Tensor, B: torch.Tensor) -> np.ndarray:
    """S = X # Y = X^½ (X^-½ Y X^-½)^½ X^½ with X = (A Aᵀ)⁻¹, Y = BᵀB (float64, scipy)."""
    A64, B64 = A.detach().double().numpy(), B.detach().double().numpy()
    X, Y = np.linalg.inv(A64 @ A64.T), B64.T @ B64
    X_half = scipy.linalg.sqrtm(X).real
    X_mhalf = np.linalg.inv(X_half)
    S = X_half @ scipy.linalg.sqrtm(X_mhalf @ Y @ X_mhalf).real @ X_half
    np.testing.assert_allclose(S @ (A64 @ A64.T) @ S, Y, rtol=1e-8, atol=1e-10)   # G X⁻¹ G = Y
    return S


def relative_error(got: torch.Tensor, want: np.ndarray) -> float:
    return float(np.abs(got.detach().double().numpy() - want).max() / np.abs(want).max())


def test_reflora_gradients_are_the_geometric_mean_preconditioned() -> None:
    gen = torch.Generator().manual_seed(2)
    # two ranks and three shapes: the batched eigendecompositions must keep layers apart
    model = nn.Sequential(lora_layer(24, 16, 4, gen), lora_layer(16, 32, 4, gen), lora_layer(32, 24, 2, gen))
    layers = list(model)
    grads = {}
    for layer in layers:
        layer.lora_A.grad = torch.randn(layer.lora_A.shape, generator=gen)
        layer.lora_B.grad = torch.randn(layer.lora_B.shape, generator=gen)
        grads[layer] = (layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
    callback = RefLoRAConfig(warmup=5).callbacks()[0]

    callback.on_train_start(trainer_for(model, 4))
    callback.before_optimizer_step(trainer_for(model, 4))            # step 4 < warmup: untouched
    assert all(torch.equal(layer.lora_A.grad, grads[layer][0]) and torch.equal(layer.lora_B.grad, grads[layer][1])
               for layer in layers)

    callback.before_optimizer_step(trainer_for(model, 5))
    for layer in layers:
        S = reference_metric(layer.lora_A, layer.lora_B)
        g_A, g_B = (g.double().numpy() for g in grads[layer])
        assert relative_error(layer.lora_A.grad, np.linalg.solve(S, g_A)) < 1e-5
        assert relative_error(layer.lora_B.grad, g_B @ S) < 1e-5
        assert relative_error(layer.lora_B.grad, g_B) > 1e-2           # it really changed


def test_reflora_leaves_a_layer_with_zero_b_alone() -> None:
    gen = torch.Generator().manual_seed(3)
    layer = lora_layer(12, 8, 2, gen)
    with torch.no_grad():
        layer.lora_B.zero_()
    layer.lora_A.grad = torch.zeros_like(layer.lora_A)                 # = s·Bᵀ(...) with B = 0
    layer.lora_B.grad = torch.randn(layer.lora_B.shape, generator=gen)
    expected = layer.lora_B.grad.clone()
    RefLoRAConfig(warmup=0).callbacks()[0].before_optimizer_step(trainer_for(layer, 0))
    assert torch.equal(layer.lora_B.grad, expected) and torch.equal(layer.lora_A.grad, torch.zeros_like(layer.lora_A))


def test_reflora_sgd_step_equals_sgd_on_the_refactored_factors() -> None:
    gen = torch.Generator().manual_seed(4)
    layer = lora_layer(24, 16, 4, gen)
    x, target = torch.randn(8, 24, generator=gen), torch.randn(8, 16, generator=gen)
    A0, B0 = layer.lora_A.detach().double().clone(), layer.lora_B.detach().double().clone()
    lr, s = 0.1, layer.scaling

    # lorafit: backward, RefLoRA's callback, a plain SGD step
    optimizer = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=lr)
    (layer(x) - target).pow(2).mean().backward()
    plain_B = (B0 - lr * layer.lora_B.grad.double()).numpy()
    RefLoRAConfig(warmup=0).callbacks()[0].before_optimizer_step(trainer_for(layer, 0))
    optimizer.step()

    # reference (float64): refactor B̃ = B P, Ã = P⁻¹ A with P Pᵀ = S⁻¹ (a Cholesky factor, not
    # symmetric: any such P gives the same step), take the SGD step there, map back
    S = reference_metric(A0, B0)
    P = torch.from_numpy(np.linalg.cholesky(np.linalg.inv(S)))
    A_t = torch.linalg.solve(P, A0).requires_grad_()
    B_t = (B0 @ P).requires_grad_()
    W0, b = layer.base.weight.detach().double(), layer.base.bias.detach().double()
    out = x.double() @ W0.T + b + s * (x.double() @ A_t.T) @ B_t.T
    (out - target.double()).pow(2).mean().backward()
    with torch.no_grad():
        A_ref = P @ (A_t - lr * A_t.grad)
        B_ref = torch.linalg.solve(P.T, (B_t - lr * B_t.grad).T).T       # B̃' P⁻¹
    assert relative_error(layer.lora_A, A_ref.numpy()) < 1e-5
    assert relative_error(layer.lora_B, B_ref.numpy()) < 1e-5
    assert relative_error(torch.from_numpy(plain_B), B_ref.numpy()) > 1e-3   # unpreconditioned SGD differs


# --------------------------------------------------------------------------------- 3. RefLoRA-S
def test_reflora_s_balances_the_factors_and_rescales_adam_state() -> None:
    gen = torch.Generator().manual_seed(5)
    model = nn.Sequential(lora_layer(24, 16, 4, gen), lora_layer(16, 12, 2, gen))
    with torch.no_grad():
        model[0].lora_B.mul_(10)                                      # ‖B‖ ≫ ‖A‖
        model[1].lora_B.mul_(0.01)                                    # ‖B‖ ≪ ‖A‖
    cfg = RefLoRASConfig(lr=1e-2, warmup=3, weight_decay=0.1)
    optimizer = cfg.build(trainable(model))
    callback = cfg.callbacks()[0]
    callback.on_train_start(trainer_for(model, 0, optimizer))
    model(torch.randn(6, 24, generator=gen)).pow(2).sum().backward()
    optimizer.step()

    def snapshot() -> list[dict[str, torch.Tensor]]:
        out = []
        for layer in model:
            sA, sB = optimizer.state[layer.lora_A], optimizer.state[layer.lora_B]
            out.append({"A": layer.lora_A.detach().clone(), "B": layer.lora_B.detach().clone(),
                        "mA": sA["exp_avg"].clone(), "vA": sA["exp_avg_sq"].clone(),
                        "mB": sB["exp_avg"].clone(), "vB": sB["exp_avg_sq"].clone()})
        return out

    before = snapshot()
    callback.after_optimizer_step(trainer_for(model, 1, optimizer))    # after the 2nd step: warm-up
    assert all(torch.equal(x, y) for b, a in zip(before, snapshot()) for x, y in zip(b.values(), a.values()))

    callback.after_optimizer_step(trainer_for(model, 2, optimizer))    # after the 3rd: balance
    for old, new in zip(before, snapshot()):
        p = (old["B"].norm() / old["A"].norm()).sqrt()
        assert abs(float(p) - 1) > 0.1                                   # a real rescale
        assert new["A"].norm() == pytest.approx(float(new["B"].norm()), rel=1e-6)
        torch.testing.assert_close(new["A"], p * old["A"], rtol=1e-6, atol=0)
        torch.testing.assert_close(new["B"], old["B"] / p, rtol=1e-6, atol=0)
        torch.testing.assert_close(new["B"] @ new["A"], old["B"] @ old["A"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(new["mA"], old["mA"] / p, rtol=1e-6, atol=0)
        torch.testing.assert_close(new["vA"], old["vA"] / p ** 2, rtol=1e-6, atol=0)
        torch.testing.assert_close(new["mB"], old["mB"] * p, rtol=1e-6, atol=0)
        torch.testing.assert_close(new["vB"], old["vB"] * p ** 2, rtol=1e-6, atol=0)


def test_reflora_s_skips_zero_factors_and_balances_at_start_without_warmup() -> None:
    gen = torch.Generator().manual_seed(6)
    model = nn.Sequential(lora_layer(12, 8, 2, gen), lora_layer(8, 8, 2, gen))
    with torch.no_grad():
        model[0].lora_B.zero_()                                        # the usual init: B = 0
    A0 = model[0].lora_A.detach().clone()
    cfg = RefLoRASConfig(warmup=0)
    optimizer = cfg.build(trainable(model))
    cfg.callbacks()[0].on_train_start(trainer_for(model, 0, optimizer))
    assert torch.equal(model[0].lora_A, A0) and not model[0].lora_B.any()
    assert float(model[1].lora_A.detach().norm()) == pytest.approx(float(model[1].lora_B.detach().norm()), rel=1e-6)


# -------------------------------------------------------------------------------------- 4. CLI
TINY_RUN = ("model=tiny_llama", "data=sentiment_demo", "data.max_train_examples=32", "data.max_eval_examples=8",
            "data.batch_size=8", "optimizer.lr=5e-3", "progress=false", "eval_at_start=false")


def adapter_at(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "lorafit_adapter.safetensors"))


def norm_gaps(state: dict[str, torch.Tensor]) -> list[float]:
    """|‖A‖ − ‖B‖| / ‖B‖ for every layer of a saved adapter."""
    return [abs(float(v.norm() - state[k[:-1] + "B"].norm())) / float(state[k[:-1] + "B"].norm())
            for k, v in state.items() if k.endswith("lora_A")]


@pytest.mark.parametrize("rule", [("+optim=loraplus", "optim.ratio=4"), ("+optim=reflora", "optimizer.warmup=1"),
                                  ("+optim=reflora_s", "optimizer.warmup=1")], ids=lambda r: r[0][7:])
def test_each_rule_trains_end_to_end(rule: tuple[str, ...], tmp_path: Path, run_cli) -> None:
    result = run_cli("train", f"output_dir={tmp_path / 'run'}", *TINY_RUN, "max_steps=3", *rule)
    assert result.code == 0, result.text
    state = adapter_at(tmp_path / "run")
    assert all(torch.isfinite(v).all() for v in state.values())
    assert all(v.abs().max() > 0 for k, v in state.items() if k.endswith("lora_B"))
    gaps = norm_gaps(state)
    if "reflora_s" in rule[0]:
        assert max(gaps) < 1e-5                  # balanced after the last step
    else:
        assert min(gaps) > 0.1                   # B starts at 0: far from balanced after 3 steps
    if rule[0] == "+optim=reflora":              # the preconditioner acted: no warm-up, another adapter
        plain = run_cli("train", f"output_dir={tmp_path / 'plain'}", *TINY_RUN, "max_steps=3", "+optim=reflora",
                        "optimizer.warmup=3")
        assert plain.code == 0, plain.text
        assert max(float((v - adapter_at(tmp_path / "plain")[k]).abs().max()) for k, v in state.items()) > 1e-4


def test_unsupported_adapter_stops_before_training(tmp_path: Path, run_cli) -> None:
    result = run_cli("train", f"output_dir={tmp_path / 'run'}", *TINY_RUN, "max_steps=2", "adapter=bone",
                     "adapter.r=8", "+optim=reflora_s")
    assert result.code == 2, result.text
    assert "optimizer=reflora_s" in result.text and "bone_D" in result.text and "Traceback" not in result.text
    assert not (tmp_path / "run" / "adapter").exists()


def test_reflora_s_resumed_equals_the_uninterrupted_run(tmp_path: Path, run_cli) -> None:
    # warm-up 3: checkpoint 2 is still in the warm-up (unbalanced), checkpoint 4 after it
    args = (*TINY_RUN, "+optim=reflora_s", "optimizer.warmup=3", "max_steps=5", "save_every=2", "keep_checkpoints=3")
    full = tmp_path / "full"
    assert (r := run_cli("train", f"output_dir={full}", *args)).code == 0, r.text
    expected = adapter_at(full)
    assert max(norm_gaps(expected)) < 1e-5
    for step in (2, 4):
        name = f"step-{step:06d}"
        gaps = norm_gaps(adapter_at(full / "checkpoints" / name))
        assert (min(gaps) > 0.1) if step == 2 else (max(gaps) < 1e-5)
        out = tmp_path / f"from_{step}"
        (out / "checkpoints").mkdir(parents=True)
        shutil.copytree(full / "checkpoints" / name, out / "checkpoints" / name)
        assert (r := run_cli("train", f"output_dir={out}", *args, "resume=true")).code == 0, r.text
        got = adapter_at(out)
        assert got.keys() == expected.keys()
        assert max(float((got[k].double() - expected[k].double()).abs().max()) for k in got) <= 1e-6, name


# ------------------------------------------------------------------------- roles are declared, not listed
def test_every_adapter_option_declares_the_roles_its_layers_tag() -> None:
    """Step rules read ``param.lorafit_role``; messages and docs read the config's ``roles``. Each
    adapter file declares both: they must agree for every option (a new adapter that tags its
    tensors but forgets ``roles`` — or the reverse — fails here)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import pin_values
    from lorafit.adapters import ROLES
    from lorafit.config import option_names, option_schema

    cases = {option: case for case, (option, _) in reversed(pin_values.ADAPTER_CASES.items())}
    assert set(cases) == set(option_names("adapter"))
    for option, case in cases.items():
        layer = pin_values.adapter_config(case).wrap(pin_values.base_linear())
        tagged = {p.lorafit_role for n, p in layer.named_parameters()
                  if hasattr(p, "lorafit_role") and not n.startswith("base.")}   # the adapter's own tensors
        assert tagged <= set(ROLES), (option, tagged)
        assert tagged == set(getattr(option_schema("adapter", option), "roles", ())), option
