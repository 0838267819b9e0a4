"""LoRA-GA (issue 4): the first-step alignment the paper is built on, resume, cache, errors.

The alignment test trains a tiny Llama for one plain-SGD step on a batch that is also the init's
only batch, then compares the weight change with the rank-2r truncated SVD of the full gradient G
computed here independently (one ordinary backward of the unadapted base on the same batch).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.config import load_run_config
from lorafit.data.batches import collate, count_loss_units, tokenize
from lorafit.task import model_inputs, head_loss
from lorafit.inits.lora_ga import lora_ga_factors

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

ROWS = [{"instruction": f"Repeat the word number {i}.", "input": "", "output": f"word {i} " * (i + 1)}
        for i in range(8)]
ETA = 1e-3


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ga") / "alpaca.json"
    path.write_text(json.dumps(ROWS))
    return path


def one_sgd_step(run_cli, out: Path, alpaca: Path, init: str, *extra: str) -> Path:
    args = ("model=tiny_llama", "model.dropout=0.0", "data=instruct", f"data.path={alpaca}", "data.eval_fraction=0",
            "data.batch_size=8", "max_steps=1", "optimizer=sgd", f"optimizer.lr={ETA}", "max_grad_norm=0",
            "optimizer.scheduler=constant", "adapter.r=4", "adapter.alpha=8", f"init={init}", "progress=false",
            "eval_at_start=false", f"output_dir={out}", *extra)
    result = run_cli("train", *args)
    assert result.code == 0, result.text
    return out


def full_gradients(run: Path) -> dict[str, torch.Tensor]:
    """G of every target, by one ordinary backward of the unadapted base on the whole training set."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_run_config(run)
    tokenizer = AutoTokenizer.from_pretrained(run / "base")
    model = AutoModelForCausalLM.from_pretrained(run / "base").eval()
    data = tokenize(cfg.data, "train", tokenizer, None)
    batch = collate([data[i] for i in range(len(data))], tokenizer.pad_token_id)
    loss = head_loss(model(**model_inputs(batch)).logits, batch["labels"], "causal_lm") / count_loss_units(batch)
    loss.backward()
    targets = json.loads((run / "adapter" / "lorafit_adapter.json").read_text())["targets"]
    return {name: model.get_submodule(name).weight.grad.double() for name in targets}


def truncated(G: torch.Tensor, k: int) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    return (U[:, :k] * S[:k]) @ Vh[:k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def test_first_step_follows_the_truncated_full_gradient(run_cli, alpaca: Path, tmp_path: Path) -> None:
    run = one_sgd_step(run_cli, tmp_path / "ga", alpaca, "lora_ga", "init.batches=1", "init.batch_size=8")
    plain = one_sgd_step(run_cli, tmp_path / "lora", alpaca, "kaiming")
    grads = full_gradients(run)
    s, gamma = 8 / 4, 16.0
    ga, lora = load_file(str(run / "adapter" / "lorafit_adapter.safetensors")), \
        load_file(str(plain / "adapter" / "lorafit_adapter.safetensors"))
    assert len(grads) == 14
    for name, G in grads.items():
        A0, B0 = ga[f"{name}.init_A"].double(), ga[f"{name}.init_B"].double()
        A1, B1 = ga[f"{name}.lora_A"].double(), ga[f"{name}.lora_B"].double()
        change = s * (B1 @ A1 - B0 @ A0)                       # W after one step − W0 (residual + s·B1A1)
        c2 = G.shape[0] ** 0.5 / gamma                          # (out^{1/4}/√γ)²
        # paper eq. 7: ΔW / (−η s) = s c² G_2r up to O(η)
        assert rel(change / (-ETA * s), s * c2 * truncated(G, 8)) <= 1e-2, name
        # plain LoRA's first step points elsewhere (a random rank-r projection of G)
        lora_change = s * lora[f"{name}.lora_B"].double() @ lora[f"{name}.lora_A"].double()
        direction = lambda x: x / torch.linalg.norm(x)  # noqa: E731
        assert rel(direction(-lora_change), direction(truncated(G, 8))) > 0.3, name


def test_factors_are_the_arb2r_directions_with_the_stable_scale() -> None:
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(48, 40, generator=gen) @ torch.diag(torch.logspace(0, -3, 40)) @ torch.linalg.qr(
        torch.randn(40, 40, generator=gen))[0]
    torch.manual_seed(0)
    A0, B0 = lora_ga_factors(G, r=3, gamma=16.0)
    U, S, Vh = torch.linalg.svd(G.double(), full_matrices=False)
    c = 48 ** 0.25 / 4
    for i in range(3):   # same vectors up to sign
        assert abs(abs(float(A0[i].double() @ Vh[i])) - c) <= 1e-4
        assert abs(abs(float(B0[:, i].double() @ U[:, 3 + i])) - c) <= 1e-4


def test_resume_does_not_redo_the_init_and_cache_is_reused(run_cli, alpaca: Path, tmp_path: Path) -> None:
    cache = tmp_path / "ga_cache.pt"
    common = ("init.batches=2", "init.batch_size=4", f"init.cache={cache}", "save_every=1", "max_steps=2")
    first = one_sgd_step(run_cli, tmp_path / "a", alpaca, "lora_ga", *common)
    assert cache.is_file()
    second = one_sgd_step(run_cli, tmp_path / "b", alpaca, "lora_ga", *common)   # same settings: from the cache
    a = load_file(str(first / "adapter" / "lorafit_adapter.safetensors"))
    b = load_file(str(second / "adapter" / "lorafit_adapter.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # resume from step 1: the init is not recomputed (the factors come from the checkpoint)
    resumed = tmp_path / "c"
    (resumed / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(first / "checkpoints" / "step-000001", resumed / "checkpoints" / "step-000001")
    cache.unlink()
    one_sgd_step(run_cli, resumed, alpaca, "lora_ga", *common, "resume=true")
    assert not cache.exists()                                   # nothing was estimated again
    c = load_file(str(resumed / "adapter" / "lorafit_adapter.safetensors"))
    assert max(float((a[k] - c[k]).abs().max()) for k in a) <= 1e-6


def test_lora_ga_on_a_non_lora_adapter_fails_at_start(run_cli, alpaca: Path, tmp_path: Path) -> None:
    result = run_cli("train", "model=tiny_llama", "data=instruct", f"data.path={alpaca}", "adapter=bone",
                     "adapter.r=8", "init=lora_ga", f"output_dir={tmp_path}", "progress=false")
    assert result.code == 2 and "init needs LoRA factors" in result.text and "Traceback" not in result.text


@pytest.mark.parametrize("adapter", ["lora", "rslora", "dora"])
def test_init_identity(adapter: str, tiny_llama_cfg, alpaca: Path) -> None:
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lorafit.adapters.dora import DoRAConfig
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.assemble import assemble
    from lorafit.data.chat import InstructData
    from lorafit.inits.lora_ga import GradientInit, LoRAGAInit

    cls = DoRAConfig if adapter == "dora" else LoRAConfig
    assembled = assemble(tiny_llama_cfg, cls(r=4, alpha=8, use_rslora=adapter == "rslora"), LoRAGAInit(batches=2),
                         "causal_lm", 2, seed=0)
    data = InstructData(path=str(alpaca), eval_fraction=0.0)
    trainer = SimpleNamespace(step=0, cfg=SimpleNamespace(seed=0, data=data), accelerator=Accelerator(cpu=True),
                              unwrapped=lambda: assembled.model, train_set=tokenize(data, "train", assembled.tokenizer, None),
                              pad_id=assembled.tokenizer.pad_token_id, head="causal_lm", assembled=assembled)
    ids = torch.randint(5, 1000, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = assembled.model.eval()(input_ids=ids).logits
    GradientInit(LoRAGAInit(batches=2)).on_train_start(trainer)
    layers = list(assembled.layers.values())
    assert all(layer.rebased and torch.count_nonzero(layer.lora_B) for layer in layers)
    with torch.no_grad():
        after = assembled.model(input_ids=ids).logits
    assert float((after - before).abs().max() / before.abs().max()) <= 1e-4


def test_init_gradient_is_the_mean_over_all_init_batches(tiny_llama_cfg, alpaca: Path) -> None:
    """Kills the mutant ``sums[name] += weight.grad…`` → ``sums[name] = weight.grad…`` in
    ``gradient_sums`` (only the last batch's gradient kept instead of the sum over ``init.batches``).

    G as the init uses it (``GradientInit.mean_gradients``, 3 batches of 2 different examples) is
    compared with the mean of 3 gradients computed here one batch at a time: a deep copy of the
    model with its adapters disabled, the batch's mean next-token cross-entropy written out with
    ``F.cross_entropy``, one ``torch.autograd.grad`` per batch for every target's W0. The batches
    are the init's documented ones: the first 3 × 2 examples of ``randperm`` seeded by the run's seed.
    """
    import copy
    from types import SimpleNamespace

    from accelerate import Accelerator

    from lorafit.adapters import adapters_disabled
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.assemble import assemble
    from lorafit.data.chat import InstructData
    from lorafit.inits.lora_ga import GradientInit, LoRAGAInit

    n_batches, batch_size, seed = 3, 2, 0
    init = LoRAGAInit(batches=n_batches, batch_size=batch_size)
    assembled = assemble(tiny_llama_cfg, LoRAConfig(r=4, alpha=8), init, "causal_lm", 2, seed=seed)
    data = InstructData(path=str(alpaca), eval_fraction=0.0)
    train_set = tokenize(data, "train", assembled.tokenizer, None)
    pad_id = assembled.tokenizer.pad_token_id
    trainer = SimpleNamespace(step=0, cfg=SimpleNamespace(seed=seed, data=data), accelerator=Accelerator(cpu=True),
                              unwrapped=lambda: assembled.model, train_set=train_set, pad_id=pad_id,
                              head="causal_lm", assembled=assembled)
    plain = copy.deepcopy(assembled.model).eval()          # the independent copy, taken before the init runs
    layers = dict(assembled.layers)
    got = GradientInit(init).mean_gradients(trainer, assembled.model, layers)

    order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed)).tolist()
    weights = {name: plain.get_submodule(name).base.weight for name in layers}
    for w in weights.values():
        w.requires_grad_(True)
    per_batch = []
    with adapters_disabled(plain):
        for b in range(n_batches):
            batch = collate([train_set[i] for i in order[b * batch_size:(b + 1) * batch_size]], pad_id)
            logits = plain(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                     batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
            grads = torch.autograd.grad(loss, list(weights.values()))
            per_batch.append({name: g.double() for name, g in zip(weights, grads)})
    assert got.keys() == weights.keys() and len(got) == 14
    for name in weights:
        mean = sum(g[name] for g in per_batch) / n_batches
        error = rel(got[name].double(), mean)
        assert error <= 1e-5, f"{name}: the init's G is off the mean of the per-batch gradients by {error:.3g}"
        # the batches really differ: no single batch's gradient (nor a share of it) stands in for the mean
        assert all(rel(g[name] / n_batches, mean) > 0.1 and rel(g[name], mean) > 0.1 for g in per_batch), name


def test_grouped_passes_give_the_same_factors(tmp_path: Path) -> None:
    """init.gradient_memory splits the targets into groups (one pass over the init batches each):
    the factors, and so the adapter after training, are the same as in one pass."""
    from lorafit.cli import main as cli_main

    args = ["train", "model=tiny_llama", "data=sentiment_demo", "data.max_train_examples=16", "data.batch_size=8",
            "max_steps=2", "init=lora_ga", "init.batches=2", "init.batch_size=2", "progress=false",
            "eval_at_start=false", "model.dropout=0.0"]
    variants = (("one", []), ("groups", ["init.gradient_memory=0.00002"]),   # ~21 KB: several groups
                ("auto", ["init.gradient_memory=auto"]))                      # 10 groups, one of 3 layers
    for name, extra in variants:
        try:
            cli_main([*args, f"output_dir={tmp_path / name}", *extra])
        except SystemExit as exc:
            assert exc.code == 0
    a, *others = (load_file(str(tmp_path / n / "adapter" / "lorafit_adapter.safetensors")) for n, _ in variants)
    for b in others:     # init_A, init_B among the keys: a group that dropped a layer's gradient would differ
        assert a.keys() == b.keys()
        assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_auto_groups_hold_at_most_the_largest_layer() -> None:
    """gradient_memory=auto: consecutive groups of at most the largest target's fp32 size, every target
    in exactly one, in order, small ones packed. Catches a budget in elements instead of bytes against
    sizes in bytes (each layer alone: 7 groups), a budget of the smallest layer, and a dropped or
    repeated layer."""
    from torch import nn

    from lorafit.adapters.lora import LoRALinear
    from lorafit.inits.lora_ga import GradientInit, LoRAGAInit

    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]   # one block of tiny_llama
    layers = {f"l{i}": LoRALinear(nn.Linear(i_, o, bias=False), r=2, scaling=1.0) for i, (o, i_) in enumerate(shapes)}
    groups = GradientInit(LoRAGAInit(gradient_memory="auto")).groups(layers)
    assert [n for g in groups for n in g] == list(layers)
    largest = 128 * 64 * 4
    assert all(sum(l.base.weight.numel() * 4 for l in g.values()) <= largest for g in groups)
    assert [list(g) for g in groups] == [["l0", "l1", "l2"], ["l3"], ["l4"], ["l5"], ["l6"]]
    assert GradientInit(LoRAGAInit(gradient_memory=0)).groups(layers) == [layers]
    # a layer above a numeric budget is a group by itself (never dropped)
    assert [list(g) for g in GradientInit(LoRAGAInit(gradient_memory=1e-6)).groups(layers)] == [[n] for n in layers]


@pytest.mark.parametrize("value", ["automatic", "-1", "true"])
def test_bad_gradient_memory_is_a_config_error(value: str) -> None:
    from lorafit.cli import compose
    from lorafit.config import ConfigError, validate

    with pytest.raises(ConfigError, match="init.gradient_memory"):
        validate(compose("train", ["init=lora_ga", f"init.gradient_memory={value}"]))
