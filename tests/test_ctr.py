"""CTR-LoRA's trust-region step: the CG subproblem solver, the curvature products, the ρ rule, the
rejected step, and the step inside ``lorafit train`` (logging, accumulation, resume)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.func import functional_call

from lorafit.config import ModelConfig
from lorafit.optim import ctr
from lorafit.optim.ctr import CTRConfig, component_utility
from lorafit.optim.trust_region import CurvatureOperator, double_differentiable_attention, steihaug_cg, update_radius

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

F64 = torch.float64


# --------------------------------------------------------------------------- 1. the subproblem
def spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    return q @ torch.diag(torch.linspace(0.5, 5.0, n, dtype=F64)) @ q.T


def model_value(g: torch.Tensor, H: torch.Tensor, d: torch.Tensor) -> float:
    return float(g @ d + 0.5 * d @ H @ d)


def test_cg_interior_solution_is_the_newton_step() -> None:
    H, g = spd(6, 0), torch.randn(6, dtype=F64)
    newton = -torch.linalg.solve(H, g)
    got = steihaug_cg(g, lambda v: H @ v, radius=10 * float(newton.norm()), max_iters=6, tol=1e-12)
    assert not got.boundary
    torch.testing.assert_close(got.step, newton, rtol=1e-9, atol=1e-9)
    assert got.model_value == pytest.approx(model_value(g, H, got.step), rel=1e-9)


def test_cg_boundary_solution_of_an_isotropic_model() -> None:
    # H = 3I: the trust-region solution is -Δ g/‖g‖ whenever the Newton step -g/3 is outside.
    H, g = 3 * torch.eye(5, dtype=F64), torch.randn(5, dtype=F64)
    radius = 0.1 * float(g.norm()) / 3
    got = steihaug_cg(g, lambda v: H @ v, radius=radius, max_iters=5, tol=1e-12)
    assert got.boundary and got.iters == 1
    torch.testing.assert_close(got.step, -radius * g / g.norm(), rtol=1e-12, atol=1e-12)
    assert got.model_value == pytest.approx(model_value(g, H, got.step), rel=1e-12)


def test_cg_follows_negative_curvature_to_the_boundary() -> None:
    H = torch.diag(torch.tensor([-2.0, 1.0, 4.0], dtype=F64))
    g = torch.tensor([1.0, 0.0, 0.0], dtype=F64)           # along the negative eigenvector
    got = steihaug_cg(g, lambda v: H @ v, radius=0.7, max_iters=3, tol=1e-12)
    assert got.boundary
    torch.testing.assert_close(got.step, torch.tensor([-0.7, 0.0, 0.0], dtype=F64))
    assert got.model_value == pytest.approx(model_value(g, H, got.step), rel=1e-12)


def test_cg_in_the_diagonal_metric() -> None:
    # H = c·M: in x = M^{1/2} δ the model is isotropic, so the boundary solution is
    # δ = -Δ M⁻¹g / ‖M^{-1/2} g‖ and has ‖δ‖_M = Δ; the interior one is -H⁻¹g.
    M = torch.tensor([0.5, 1.0, 2.0, 4.0], dtype=F64)
    H, g = torch.diag(2.0 * M), torch.randn(4, dtype=F64)
    newton = -g / (2.0 * M)
    radius = 0.5 * float(torch.sqrt(newton @ (M * newton)))
    got = steihaug_cg(g, lambda v: H @ v, radius=radius, metric=M, max_iters=4, tol=1e-12)
    expected = -radius * (g / M) / torch.sqrt(g @ (g / M))
    assert got.boundary
    torch.testing.assert_close(got.step, expected, rtol=1e-10, atol=1e-12)
    assert float(torch.sqrt(got.step @ (M * got.step))) == pytest.approx(radius, rel=1e-10)
    inside = steihaug_cg(g, lambda v: H @ v, radius=10 * radius, metric=M, max_iters=4, tol=1e-12)
    torch.testing.assert_close(inside.step, newton, rtol=1e-10, atol=1e-12)


def test_cg_stops_at_its_iteration_limit_inside_the_region() -> None:
    H, g = spd(8, 1), torch.randn(8, dtype=F64)
    got = steihaug_cg(g, lambda v: H @ v, radius=1e6, max_iters=2, tol=1e-12)
    assert got.iters == 2 and not got.boundary
    assert got.model_value == pytest.approx(model_value(g, H, got.step), rel=1e-9)
    assert got.model_value < 0


def test_cg_reuses_the_callers_first_product() -> None:
    """``first_product`` = H·(−M⁻¹g) replaces CG's first product: the same step, one product fewer
    (kills a first product taken along g instead of M⁻¹g, and one that is ignored)."""
    H, g, M = spd(6, 2), torch.randn(6, dtype=F64), torch.tensor([0.5, 1.0, 2.0, 1.5, 3.0, 0.8], dtype=F64)
    products: list[int] = []

    def hvp(v: torch.Tensor) -> torch.Tensor:
        products.append(1)
        return H @ v

    plain = steihaug_cg(g, hvp, radius=1e6, metric=M, max_iters=4, tol=1e-12)
    used = len(products)
    products.clear()
    reused = steihaug_cg(g, hvp, radius=1e6, metric=M, max_iters=4, tol=1e-12, first_product=H @ (-g / M))
    assert len(products) == used - 1
    torch.testing.assert_close(reused.step, plain.step, rtol=1e-12, atol=1e-12)
    assert reused.model_value == pytest.approx(plain.model_value, rel=1e-12)


# --------------------------------------------------------------------------- 2. the ρ rule
CFG = CTRConfig(radius=1.0, max_radius=3.0)


@pytest.mark.parametrize("rho, boundary, accepted, radius", [
    (0.1, True, False, 0.5),      # poor model: reject, shrink (γ2 = 0.5)
    (-3.0, False, False, 0.5),    # the loss went up
    (float("nan"), False, False, 0.5),
    (0.25, True, True, 1.0),      # η1 exactly: accept, keep
    (0.5, True, True, 1.0),       # between η1 and η2: keep
    (0.9, False, True, 1.0),      # good, but inside the region: keep
    (0.9, True, True, 2.0),       # good at the boundary: grow (γ1 = 2)
    (1.2, True, True, 2.0),
])
def test_radius_rule(rho: float, boundary: bool, accepted: bool, radius: float) -> None:
    assert update_radius(rho, 1.0, boundary, CFG) == (accepted, radius)


def test_radius_growth_is_capped() -> None:
    assert update_radius(0.9, 2.0, True, CFG) == (True, 3.0)


# --------------------------------------------------------------------------- 3. curvature products
class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(x)))


@pytest.fixture
def tiny_problem():
    torch.manual_seed(0)
    net = Tiny().double()
    x, y = torch.randn(6, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0, 2])
    params = list(net.parameters())
    names = [n for n, _ in net.named_parameters()]

    def loss_of_logits(z: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(z, y, reduction="sum") / 6

    def logits_of_flat(flat: torch.Tensor) -> torch.Tensor:
        chunks, start = {}, 0
        for n, p in zip(names, params):
            chunks[n] = flat[start:start + p.numel()].view_as(p)
            start += p.numel()
        return functional_call(net, chunks, (x,))

    def piece():
        z = net(x)
        return z, loss_of_logits(z)

    flat = torch.cat([p.detach().reshape(-1) for p in params])
    return net, params, piece, loss_of_logits, logits_of_flat, flat


def test_gauss_newton_product_matches_the_explicit_matrix(tiny_problem) -> None:
    _, params, piece, loss_of_logits, logits_of_flat, flat = tiny_problem
    J = torch.autograd.functional.jacobian(logits_of_flat, flat).reshape(-1, flat.numel())   # (6·3, n)
    z = logits_of_flat(flat).detach()
    H_L = torch.autograd.functional.hessian(lambda zz: loss_of_logits(zz.view_as(z)), z.reshape(-1))
    G = J.T @ H_L @ J
    op = CurvatureOperator([piece], params, "ggn")
    assert op.losses() == pytest.approx(float(loss_of_logits(z)))
    for seed in range(3):
        v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(seed), dtype=F64)
        torch.testing.assert_close(op(v), G @ v, rtol=1e-10, atol=1e-12)
    # damping adds λv; and G is not the Hessian here (a wrong kind would be caught)
    torch.testing.assert_close(CurvatureOperator([piece], params, "ggn", damping=0.3)(v), G @ v + 0.3 * v)


def test_hessian_product_matches_the_explicit_matrix(tiny_problem) -> None:
    _, params, piece, loss_of_logits, logits_of_flat, flat = tiny_problem
    H = torch.autograd.functional.hessian(lambda f: loss_of_logits(logits_of_flat(f)), flat)
    op = CurvatureOperator([piece], params, "hessian")
    op.losses()
    v = torch.randn(flat.numel(), generator=torch.Generator().manual_seed(5), dtype=F64)
    torch.testing.assert_close(op(v), H @ v, rtol=1e-10, atol=1e-12)
    G = CurvatureOperator([piece], params, "ggn")(v)
    assert float((G - H @ v).abs().max()) > 1e-4     # the two kinds really differ on this net


def test_products_split_over_micro_batches_add_up(tiny_problem) -> None:
    net, params, piece, *_ = tiny_problem
    x, y = torch.randn(6, 4, dtype=F64), torch.tensor([0, 1, 2, 1, 0, 2])

    def part(rows: slice):
        def run():
            z = net(x[rows])
            return z, nn.functional.cross_entropy(z, y[rows], reduction="sum") / 6
        return run
    v = torch.randn(sum(p.numel() for p in params), dtype=F64)
    for kind in ("ggn", "hessian"):
        whole = CurvatureOperator([part(slice(0, 6))], params, kind)
        split = CurvatureOperator([part(slice(0, 2)), part(slice(2, 6))], params, kind, cache=False)
        assert whole.losses() == pytest.approx(split.losses(), rel=1e-12)
        torch.testing.assert_close(split(v), whole(v), rtol=1e-10, atol=1e-12)


def test_gauss_newton_through_dora_and_attention_matches_the_explicit_jacobian(minilm_cfg: ModelConfig) -> None:
    """MiniLM + DoRA in float64, 2 examples × 2 logits: J built row by row with plain vjps, the
    softmax Hessian written by hand (``(diag(p) − p pᵀ)/N`` per example), G v = Jᵀ H_L J v —
    against the operator's double-vjp products through DoRA's DoRAProduct and attention."""
    from lorafit.adapters.dora import DoRAConfig
    from lorafit.assemble import assemble

    torch.manual_seed(0)
    asm = assemble(minilm_cfg, DoRAConfig(r=2, target_modules=["query", "value"]), None, "classification", 2)
    model = asm.model.double().eval()
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:   # B = 0 would hide the B·A terms: give every factor a value
            p.add_(0.05 * torch.randn_like(p))
    batch = asm.tokenizer(["a fine film", "dull and long, really"], return_tensors="pt", padding=True)
    labels = torch.tensor([1, 0])

    def piece():
        z = model(**batch).logits
        return z, nn.functional.cross_entropy(z, labels, reduction="sum") / 2

    z = model(**batch).logits
    rows = []
    for i in range(z.numel()):
        e = torch.zeros_like(z).view(-1)
        e[i] = 1.0
        grads = torch.autograd.grad(z, params, e.view_as(z), retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    J = torch.stack(rows)                                       # (4, n)
    prob = torch.softmax(z.detach(), -1)
    H_L = torch.block_diag(*[(torch.diag(q) - torch.outer(q, q)) / 2 for q in prob])
    v = torch.randn(J.shape[1], dtype=F64)
    with double_differentiable_attention():
        op = CurvatureOperator([piece], params, "ggn")
        op.losses()
        got = op(v)
    torch.testing.assert_close(got, J.T @ (H_L @ (J @ v)), rtol=1e-9, atol=1e-12)


def test_component_utility_is_the_diagonal_newton_decrease_per_factor() -> None:
    g_sq = [torch.arange(6.0).view(2, 3), torch.arange(8.0).view(4, 2)]          # A: r=2 × 3, B: 4 × r=2
    h = [torch.tensor([[1.0, 2.0, 3.0], [0.0, -4.0, 1.0]]), torch.full((4, 2), 0.5)]
    got = component_utility(g_sq, h, [(0, 1, 2)])
    h_a = torch.tensor([2.0, 0.0])                 # row means of A's curvature, the second clamped at 0
    h_b = torch.tensor([0.5, 0.5])
    floor = 1e-3 * torch.cat([h_a, h_b]).mean()
    want = 0.5 * (g_sq[0].sum(1) / (h_a + floor) + g_sq[1].sum(0) / (h_b + floor))
    torch.testing.assert_close(got, want)


def test_rank_budget_goes_where_the_predicted_decrease_is_largest() -> None:
    """The issue's case: an 8×8 layer whose components promise a large decrease (½‖g‖² ≈ 92 in all)
    and a 64×64 layer with small gradients, at the same curvature. The old score ½Σ g²/F with
    F ≈ g² (a count of entries) kept the wide layer; the decrease ½‖g‖²/(h + λ) keeps the small one."""
    gen = torch.Generator().manual_seed(0)
    r = 4
    small = [torch.randn(r, 8, generator=gen) * 1.7, torch.randn(8, r, generator=gen) * 1.7]
    wide = [torch.randn(r, 64, generator=gen) * 0.2, torch.randn(64, r, generator=gen) * 0.2]
    grads = small + wide
    g_sq = [g * g for g in grads]
    h = [torch.ones_like(g) for g in grads]
    components = [(0, 1, r), (2, 3, r)]
    utility = component_utility(g_sq, h, components)
    assert torch.equal(ctr.top_components(utility, 0.5), torch.tensor([True] * r + [False] * r))
    whitened = component_utility([torch.ones_like(g) for g in grads], h, components)   # g²/F ≡ 1: entry counts
    assert torch.equal(ctr.top_components(whitened, 0.5), torch.tensor([False] * r + [True] * r))
    # and the budget follows the curvature: the same gradients, the small layer 100× stiffer
    stiff = [100 * t for t in h[:2]] + h[2:]
    assert ctr.top_components(component_utility(g_sq, stiff, components), 0.5)[r:].all()


def test_hutchinson_probe_estimates_the_curvature_diagonal() -> None:
    D = torch.tensor([3.0, 0.5, 2.0, 7.0], dtype=F64)
    exact = ctr.hutchinson_diagonal(lambda v: D * v, torch.zeros(4, dtype=F64), seed=1)
    torch.testing.assert_close(exact, D)                      # v² = 1: exact for a diagonal H
    H = spd(5, 3)
    probes = torch.stack([ctr.hutchinson_diagonal(lambda v: H @ v, torch.zeros(5, dtype=F64), seed=s)
                          for s in range(4000)])
    torch.testing.assert_close(probes.mean(0), torch.diagonal(H), rtol=0.1, atol=0.1)
    assert torch.equal(probes[7], ctr.hutchinson_diagonal(lambda v: H @ v, torch.zeros(5, dtype=F64), seed=7))


# --------------------------------------------------------------------------- 4. inside lorafit train
TINY = ("model=tiny_llama", "data=sentiment_demo", "data.max_train_examples=32", "data.max_eval_examples=16",
        "data.batch_size=8", "progress=false", "eval_at_start=false")


def records(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "split" not in r]


def adapter_of(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "lorafit_adapter.safetensors"))


def test_dora_with_ctr_logs_every_step_and_keeps_its_promises(run_cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = run_cli("train", f"output_dir={run}", *TINY, "+adapter=dora", "+optim=ctr", "max_steps=4",
                     "optimizer.radius=0.05")
    assert result.code == 0, result.text
    rows = records(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]          # a row every step although log_every=10
    for row in rows:
        assert {"rho", "radius", "accepted", "cg_iters", "pred_reduction", "actual_reduction"} <= row.keys()
        assert row["pred_reduction"] > 0 and 1 <= row["cg_iters"] <= 10
        assert row["rho"] == pytest.approx(row["actual_reduction"] / row["pred_reduction"])
        # CTR's L(θ) is the loss the trainer's backward saw (same batch, dropout off)
        assert row["loss_before"] == pytest.approx(row["loss"], abs=1e-6)
    assert any(r["accepted"] for r in rows)


def test_a_rejected_step_leaves_the_weights_bit_for_bit(run_cli, tmp_path: Path, monkeypatch) -> None:
    seen: list[list[torch.Tensor]] = []
    real = ctr.TrustRegionStep.take_step

    def spy(self, trainer, closure):
        seen.append([p.detach().clone() for p in trainer.params])
        real(self, trainer, closure)
        seen.append([p.detach().clone() for p in trainer.params])
    monkeypatch.setattr(ctr.TrustRegionStep, "take_step", spy)
    monkeypatch.setattr(ctr, "update_radius", lambda rho, radius, boundary, cfg: (False, radius * cfg.shrink))
    run = tmp_path / "run"
    assert (r := run_cli("train", f"output_dir={run}", *TINY, "+optim=ctr", "max_steps=2")).code == 0, r.text
    for before, after in zip(seen[0::2], seen[1::2]):
        assert all(torch.equal(a, b) for a, b in zip(before, after))
    rows = records(run)
    assert [r["accepted"] for r in rows] == [0, 0] and rows[1]["radius"] == pytest.approx(0.05)
    assert rows[0]["actual_reduction"] != 0     # the trial point was really evaluated


def test_ctr_step_is_the_same_with_gradient_accumulation(run_cli, tmp_path: Path) -> None:
    args = (*TINY, "+optim=ctr", "max_steps=2", "model.dropout=0.0")
    one, four = tmp_path / "one", tmp_path / "four"
    assert (r := run_cli("train", f"output_dir={one}", *args)).code == 0, r.text
    assert (r := run_cli("train", f"output_dir={four}", *args, "hardware.grad_accum_steps=4")).code == 0, r.text
    for a, b in zip(records(one), records(four)):
        for key in ("loss", "rho", "pred_reduction", "cg_iters", "accepted", "radius"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    a, b = adapter_of(one), adapter_of(four)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_ctr_resumes_with_its_radius_and_metric(run_cli, tmp_path: Path) -> None:
    args = (*TINY, "+optim=ctr", "optimizer.metric=fisher", "optimizer.rank_budget=0.5", "optimizer.rank_every=2",
            "max_steps=4", "save_every=2")
    full = tmp_path / "full"
    assert (r := run_cli("train", f"output_dir={full}", *args)).code == 0, r.text
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    shutil.copy(full / "config.yaml", resumed / "config.yaml")
    assert (r := run_cli("train", f"output_dir={resumed}", *args, "resume=true")).code == 0, r.text
    a, b = adapter_of(full), adapter_of(resumed)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6
    tail, got = records(full)[2:], records(resumed)
    assert [r["radius"] for r in got] == [r["radius"] for r in tail]
    # tiny Llama: 7 targets × 2 layers × r=8 = 112 rank-1 components, half of them trained
    assert {r["active_rank"] for r in got + tail} == {56}


def test_rank_schedule_freezes_the_components_outside_the_budget(run_cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = (*TINY, "+optim=ctr", "optimizer.rank_budget=0.25", "optimizer.rank_every=100", "max_steps=3",
            "save_every=1", "keep_checkpoints=5")
    assert (r := run_cli("train", f"output_dir={run}", *args)).code == 0, r.text
    first, last = load_file(str(run / "checkpoints" / "step-000001" / "adapter" / "lorafit_adapter.safetensors")), adapter_of(run)
    moved = frozen = 0
    for key in (k for k in first if k.endswith("lora_A")):
        key_b = key[:-1] + "B"
        for i in range(first[key].shape[0]):   # component i: row i of A and column i of B
            a_same = torch.equal(first[key][i], last[key][i])
            b_same = torch.equal(first[key_b][:, i], last[key_b][:, i])
            assert a_same == b_same, (key, i)
            moved, frozen = moved + (not a_same), frozen + a_same
    assert moved == 28 and frozen == 84     # the mask chosen at step 1 holds (rank_every=100)


def test_bad_ctr_options_fail_with_a_clear_message(run_cli, tmp_path: Path) -> None:
    r = run_cli("train", f"output_dir={tmp_path / 'x'}", *TINY, "+optim=ctr", "optimizer.curvature=newton")
    assert r.code == 2 and "optimizer.curvature" in r.text and "ggn" in r.text
    r = run_cli("train", f"output_dir={tmp_path / 'y'}", *TINY, "+optim=ctr", "optimizer.lr=1e-3")
    assert r.code == 2 and "lr" in r.text
    r = run_cli("train", f"output_dir={tmp_path / 'z'}", *TINY, "+optim=ctr", "+adapter=adalora", "max_steps=2")
    assert r.code == 2 and "RankAllocator" in r.text and "regulariser" in r.text and "Traceback" not in r.text


@pytest.mark.slow
def test_two_processes_take_the_same_ctr_steps_as_one(run_cli, tmp_path: Path) -> None:
    from test_train import two_processes

    args = (*TINY, "+optim=ctr", "max_steps=3", "model.dropout=0.0")
    one = tmp_path / "one"
    assert (r := run_cli("train", f"output_dir={one}", *args, "hardware=cpu")).code == 0, r.text
    proc = two_processes(tmp_path / "two", *args, launcher="torchrun")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for a, b in zip(records(one), records(tmp_path / "two"), strict=True):
        for key in ("loss", "rho", "pred_reduction", "actual_reduction", "cg_iters", "accepted", "radius"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    a, b = adapter_of(one), adapter_of(tmp_path / "two")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5


# --------------------------------------------------------------------------- 5. independent checks of the step
def loss_at(model: nn.Module, params: list[torch.Tensor], values: list[torch.Tensor],
            batches: list[dict[str, torch.Tensor]]) -> float:
    """The mean cross-entropy over ``batches`` with ``params`` set to ``values``: plain forward passes
    in eval mode (no dropout), the loss written out here in float64; ``params`` are left as found."""
    kept = [p.detach().clone() for p in params]
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for p, v in zip(params, values):
            p.copy_(v)
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            total += float(nn.functional.cross_entropy(logits.double(), batch["labels"], reduction="sum"))
            count += batch["labels"].shape[0]
        for p, v in zip(params, kept):
            p.copy_(v)
    model.train(was_training)
    return total / count


def test_actual_reduction_is_the_loss_drop_at_the_trial_point(run_cli, tmp_path: Path, monkeypatch) -> None:
    """Kills the mutant ``actual = loss_before - loss_after`` → ``actual = predicted`` in
    ``TrustRegionStep.take_step`` (ρ ≡ 1: the trial point θ+δ never judged).

    Each step's δ is caught on its way out of ``steihaug_cg``; L(θ) and L(θ+δ) are then evaluated
    here with fresh forward passes of the model (eval mode, the step's own batch, cross-entropy in
    float64), and the logged ``actual_reduction`` must be L(θ) − L(θ+δ) and ρ = actual / predicted.
    A large radius makes the quadratic model visibly wrong, so ρ is far from 1 on some step."""
    real_step, real_cg = ctr.TrustRegionStep.take_step, ctr.steihaug_cg
    trial: list[torch.Tensor] = []
    seen: list[dict] = []

    def cg_spy(*args, **kwargs):
        result = real_cg(*args, **kwargs)
        trial.append(result.step.detach().clone())
        return result

    def step_spy(self, trainer, closure):
        model, params, batches = trainer.unwrapped(), trainer.params, list(closure.batches)
        theta = [p.detach().clone() for p in params]
        real_step(self, trainer, closure)
        deltas, start = [], 0
        for p in theta:
            deltas.append(trial[-1][start:start + p.numel()].view_as(p).to(p.dtype))
            start += p.numel()
        seen.append({"before": loss_at(model, params, theta, batches),
                     "after": loss_at(model, params, [t + d for t, d in zip(theta, deltas)], batches),
                     **self.last})

    monkeypatch.setattr(ctr, "steihaug_cg", cg_spy)
    monkeypatch.setattr(ctr.TrustRegionStep, "take_step", step_spy)
    run = tmp_path / "run"
    assert (r := run_cli("train", f"output_dir={run}", *TINY, "+optim=ctr", "max_steps=3", "model.dropout=0.0",
                         "optimizer.radius=3.0")).code == 0, r.text
    rows = records(run)
    assert len(seen) == len(rows) == 3
    for step, (got, row) in enumerate(zip(seen, rows), 1):
        drop = got["before"] - got["after"]
        assert got["loss_before"] == pytest.approx(got["before"], abs=1e-5), step
        assert got["actual_reduction"] == pytest.approx(drop, abs=1e-5), \
            f"step {step}: actual_reduction {got['actual_reduction']:.6g} but L(θ) − L(θ+δ) = {drop:.6g}"
        assert got["rho"] == pytest.approx(drop / got["pred_reduction"], rel=1e-4, abs=1e-5), step
        assert row["actual_reduction"] == pytest.approx(got["actual_reduction"], rel=1e-6), step   # what is logged
        assert row["rho"] == pytest.approx(got["rho"], rel=1e-6), step
    # the quadratic model is visibly off on some step, so "actual = predicted" (ρ ≡ 1) cannot pass
    assert max(abs(g["before"] - g["after"] - g["pred_reduction"]) / g["pred_reduction"] for g in seen) > 0.25


def curvature_utility(history: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
                      layers: dict[str, nn.Module], beta: float) -> torch.Tensor:
    """CTR's utility of every rank-1 component after the steps in ``history`` (each a pair of
    parameter name → gradient and name → Hutchinson probe v ⊙ Hv), written out from its definition:
    h = EMA_β(probe) per coordinate; per component i of a layer, h̄_A = mean_j h_A[i, j] and
    h̄_B = mean_k h_B[k, i] clamped at 0, λ = 10⁻³ × mean of all h̄;
    u_i = ½ (Σ_j g_A[i, j]² / (h̄_A + λ) + Σ_k g_B[k, i]² / (h̄_B + λ)); the utility is EMA_β(u).
    Components in ``layers`` order, rank index within."""
    curvature: dict[str, torch.Tensor] = {}
    utility = None
    for grads, probe in history:
        curvature = {n: p if n not in curvature else beta * curvature[n] + (1 - beta) * p for n, p in probe.items()}
        h_a = {name: curvature[f"{name}.lora_A"].mean(1).clamp_min(0) for name in layers}
        h_b = {name: curvature[f"{name}.lora_B"].mean(0).clamp_min(0) for name in layers}
        floor = 1e-3 * torch.cat([*h_a.values(), *h_b.values()]).mean()
        now = torch.cat([0.5 * ((grads[f"{name}.lora_A"][i] ** 2).sum() / (h_a[name][i] + floor)
                                + (grads[f"{name}.lora_B"][:, i] ** 2).sum() / (h_b[name][i] + floor)).reshape(1)
                         for name, layer in layers.items() for i in range(layer.r)])
        utility = now if utility is None else beta * utility + (1 - beta) * now
    return utility


def assert_the_most_useful_components_are_kept(active: torch.Tensor, utility: torch.Tensor, keep: int,
                                               rtol: float = 1e-4) -> None:
    """The rank schedule's promise: ``keep`` components trainable, and each of them at least as
    useful as every frozen one (ties, within rtol of the largest utility, aside)."""
    assert active.dtype == torch.bool and active.shape == utility.shape
    assert int(active.sum()) == keep
    tol = rtol * float(utility.abs().max())
    kept, dropped = utility[active], utility[~active]
    assert float(kept.min()) >= float(dropped.max()) - tol, (
        f"a frozen component (utility {float(dropped.max()):.6g}) beats a trained one ({float(kept.min()):.6g})")
    top = torch.topk(utility, keep + 1).values
    if float(top[keep - 1] - top[keep]) > tol:          # no tie at the boundary: the set is exactly the top-k
        assert set(torch.nonzero(active).view(-1).tolist()) == set(torch.topk(utility, keep).indices.tolist())


def test_rank_schedule_keeps_the_components_of_largest_utility(run_cli, tmp_path: Path, monkeypatch) -> None:
    """Kills the mutant ``torch.topk(self.utility, keep)`` → ``torch.topk(-self.utility, keep)`` in
    ``TrustRegionStep._rank_mask`` (the least useful rank-1 components kept trainable).

    The gradients of every step are caught as the step starts (CTR's steps are never clipped) and the
    Hutchinson probe as it is drawn; the utility of each rank-1 component (row i of A, column i of B)
    is computed here from them (:func:`curvature_utility`), and at every re-choice (steps 0 and 2 with ``rank_every=2``) the
    callback's active set must be the ``round(budget × 112)`` components of largest utility
    (:func:`assert_the_most_useful_components_are_kept`); in between it must not change."""
    from lorafit.adapters import adapter_layers

    real_step, real_probe = ctr.TrustRegionStep.take_step, ctr.hutchinson_diagonal
    history: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    probes: list[torch.Tensor] = []

    def probe_spy(*args, **kwargs):
        probes.append(real_probe(*args, **kwargs))
        return probes[-1]

    def step_spy(self, trainer, closure):
        named = [(n, p) for n, p in trainer.unwrapped().named_parameters() if p.requires_grad]
        grads = {n: p.grad.detach().double().clone() for n, p in named}
        step = trainer.step
        real_step(self, trainer, closure)
        probe, start = {}, 0
        for n, p in named:
            probe[n] = probes[-1][start:start + p.numel()].view_as(p).double()
            start += p.numel()
        history.append((grads, probe))
        layers = dict(adapter_layers(trainer.unwrapped()))
        seen.append((step, self.active.clone(), curvature_utility(history, layers, self.cfg.fisher_beta)))

    monkeypatch.setattr(ctr, "hutchinson_diagonal", probe_spy)
    monkeypatch.setattr(ctr.TrustRegionStep, "take_step", step_spy)
    run = tmp_path / "run"
    assert (r := run_cli("train", f"output_dir={run}", *TINY, "+optim=ctr", "optimizer.rank_budget=0.25",
                         "optimizer.rank_every=2", "max_steps=3")).code == 0, r.text
    assert [s for s, *_ in seen] == [0, 1, 2]
    for step, active, utility in seen:
        assert utility.numel() == 112
        if step % 2 == 0:
            assert_the_most_useful_components_are_kept(active, utility, keep=28)
        else:
            assert torch.equal(active, seen[step - 1][1])


def test_curvature_products_use_every_fourth_example_of_the_global_batch(run_cli, tmp_path: Path, monkeypatch) -> None:
    """``optimizer.curvature_batch=0.25``: CG's products see rows 0 and 4 of the step's 8 examples —
    by position in the global batch, so 4 micro-batches of 2 choose the same rows as one of 8 — while
    g and both losses of ρ use all 8 (the trainer's loss is L(θ))."""
    real_operator = ctr.CurvatureOperator
    seen: list[list[torch.Tensor]] = []

    def operator_spy(pieces, *args, **kwargs):
        seen.append([piece()[0].detach() for piece in pieces])     # the outputs of each curvature piece
        return real_operator(pieces, *args, **kwargs)

    monkeypatch.setattr(ctr, "CurvatureOperator", operator_spy)
    real_every = ctr.TrustRegionStep.take_step
    full: list[torch.Tensor] = []

    def step_spy(self, trainer, closure):
        full.append(torch.cat([piece()[0].detach() for piece in closure.pieces]))
        real_every(self, trainer, closure)

    monkeypatch.setattr(ctr.TrustRegionStep, "take_step", step_spy)
    for accumulation in (1, 4):
        seen.clear(), full.clear()
        run = tmp_path / f"accumulate{accumulation}"
        assert (r := run_cli("train", f"output_dir={run}", *TINY, "+optim=ctr", "max_steps=1", "model.dropout=0.0",
                             f"hardware.grad_accum_steps={accumulation}")).code == 0, r.text
        assert len(full[0]) == 8
        torch.testing.assert_close(torch.cat(seen[0]), full[0][[0, 4]])


def test_rho_on_the_next_batch_judges_the_step_on_unseen_examples(run_cli, tmp_path: Path, monkeypatch) -> None:
    """``optimizer.rho_batch=next``: both losses of ρ are the next step's batch's, L'(θ) − L'(θ+δ),
    evaluated here with fresh forward passes (kills ρ judged on the step's own batch)."""
    real_step, real_cg = ctr.TrustRegionStep.take_step, ctr.steihaug_cg
    trial: list[torch.Tensor] = []
    seen: list[dict] = []

    def cg_spy(*args, **kwargs):
        trial.append(real_cg(*args, **kwargs))
        return trial[-1]

    def step_spy(self, trainer, closure):
        model, params = trainer.unwrapped(), trainer.params
        nxt, own = trainer.step_batches(trainer.step + 1), list(closure.batches)
        theta = [p.detach().clone() for p in params]
        real_step(self, trainer, closure)
        moved = [t + d for t, d in zip(theta, ctr.unflatten(trial[-1].step, params))]
        seen.append({"next": loss_at(model, params, theta, nxt) - loss_at(model, params, moved, nxt),
                     "own": loss_at(model, params, theta, own) - loss_at(model, params, moved, own),
                     "before": loss_at(model, params, theta, own), **self.last})

    monkeypatch.setattr(ctr, "steihaug_cg", cg_spy)
    monkeypatch.setattr(ctr.TrustRegionStep, "take_step", step_spy)
    run = tmp_path / "run"
    assert (r := run_cli("train", f"output_dir={run}", *TINY, "+optim=ctr", "max_steps=3", "model.dropout=0.0",
                         "optimizer.radius=3.0", "optimizer.rho_batch=next")).code == 0, r.text
    for step, got in enumerate(seen, 1):
        assert got["actual_reduction"] == pytest.approx(got["next"], abs=1e-5), step
        assert got["loss_before"] == pytest.approx(got["before"], abs=1e-5), step      # the step's own loss
    assert max(abs(g["next"] - g["own"]) for g in seen) > 1e-3        # the two batches judge differently


def test_missed_curvature_makes_the_model_exact_along_the_step() -> None:
    """On a 1-D loss with curvature c and a model of curvature h + λ, ``missed_curvature`` returns the λ
    whose model predicts exactly the actual decrease (kills a flipped sign, a missing factor 2, and a
    λ not carried over from the step's own model); it never goes below 0."""
    g, c, h, damping, step = -2.0, 5.0, 1.0, 0.5, 0.3
    predicted = -(g * step + 0.5 * (h + damping) * step ** 2)
    actual = -(g * step + 0.5 * c * step ** 2)                      # a quadratic loss: the secant is exact
    new = ctr.missed_curvature(damping, predicted, actual, step ** 2)
    assert new == pytest.approx(c - h)
    assert -(g * step + 0.5 * (h + new) * step ** 2) == pytest.approx(actual)
    assert ctr.missed_curvature(damping, predicted, predicted, step ** 2) == damping     # exact model: unchanged
    assert ctr.missed_curvature(damping, predicted, predicted + 10.0, step ** 2) == 0.0
    assert ctr.missed_curvature(damping, predicted, actual, 0.0) == damping


def test_adaptive_damping_follows_the_missed_curvature_into_the_next_model(run_cli, tmp_path: Path,
                                                                           monkeypatch) -> None:
    """With ``adaptive_damping`` (the default), step k+1's CG runs on ``H + λ_{k+1} I`` with
    ``λ_{k+1} = max(½ λ_k + ½ missed_curvature(λ_k, predicted_k, actual_k, ‖δ_k‖²), c·r_{k+1})``, r the
    Rayleigh quotient of the undamped sub-batch curvature along −g and c ``relative_damping`` —
    checked on the operator CG receives (r re-measured here with a fresh product) and on the logged
    ``damping``, from each step's own δ and reductions; with ``adaptive_damping=false``, and with
    ``rho_batch=next`` (whose two losses are another batch's), the secant part stays at ``damping``.
    λ must move at all here (a curvature sub-batch of 2 of 8 examples misses curvature), so a rule
    that never updates it cannot pass; with c = 0.2 the floor must bind on some step, so a floor
    that is dropped, or taken along another vector, cannot pass either."""
    real_cg = ctr.steihaug_cg
    calls: list[dict] = []

    def cg_spy(grad, hvp, radius, *args, **kwargs):
        result = real_cg(grad, hvp, radius, *args, **kwargs)
        d = -grad
        seen = float(d @ hvp(d)) / float(d @ d) - hvp.damping                   # undamped, along −g
        calls.append({"damping": hvp.damping, "step_sq": float(result.step @ result.step), "along_g": seen})
        return result

    monkeypatch.setattr(ctr, "steihaug_cg", cg_spy)
    for adaptive, rho_batch, relative in ((True, "same", 0.0), (False, "same", 0.0), (True, "next", 0.0),
                                          (True, "same", 0.2), (False, "same", 0.2)):
        calls.clear()
        run = tmp_path / f"adaptive-{adaptive}-{rho_batch}-{relative}"
        assert (r := run_cli("train", f"output_dir={run}", *TINY, "+optim=ctr", "max_steps=4", "model.dropout=0.0",
                             "optimizer.radius=1.0", "optimizer.damping=0.01", f"optimizer.rho_batch={rho_batch}",
                             f"optimizer.adaptive_damping={str(adaptive).lower()}",
                             f"optimizer.relative_damping={relative}")).code == 0, r.text
        adaptive = adaptive and rho_batch == "same"
        rows = records(run)
        assert [c["damping"] for c in calls] == pytest.approx([r["damping"] for r in rows])
        secant, expected, binds = 0.01, [], []
        for row, call in zip(rows, calls):
            expected.append(max(secant, relative * call["along_g"]))
            binds.append(relative * call["along_g"] > 1.1 * secant)
            target = ctr.missed_curvature(expected[-1], row["pred_reduction"], row["actual_reduction"], call["step_sq"])
            secant = 0.5 * expected[-1] + 0.5 * target if adaptive else 0.01
        assert [c["damping"] for c in calls] == pytest.approx(expected, rel=1e-5)
        if adaptive:
            assert max(abs(d - 0.01) for d in expected) > 1e-3
        assert any(binds) == bool(relative), binds
