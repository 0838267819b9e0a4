"""Exactness of LoRA and rsLoRA: each test fails if the maths (or its plumbing) is wrong.

Two bases: the embedded real MiniLM (BERT, sequence classification) and a tiny random Llama
(causal LM, and sequence classification where a head matters). Adapters get random non-zero
factors before any comparison that would otherwise be trivially true with B = 0.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lorafit.adapters import (adapter_layers, adapters_disabled, attach, find_targets, fold_into_base,
                              trainable_parameters)
from lorafit.adapters.lora import LoRAConfig, LoRALinear
from lorafit.adapters.io import Assembled, save_adapter
from lorafit.assemble import assemble, load_adapted
from lorafit.config import ConfigError, ModelConfig
from lorafit.inits.basic import GaussianInit, KaimingInit
from lorafit.models import DEFAULT_TARGETS, default_targets, head_module_names, load_model, load_tokenizer, save_base

R, ALPHA = 4, 8.0          # alpha/r = 2, alpha/sqrt(r) = 4: every scale is told apart
PROBE_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Low-rank adapters fold into the base weights exactly.",
    "Short one.",
]
BERT_TARGETS = ["query", "key", "value", "dense"]
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# (architecture, task) cases; "minilm" is the real model, "llama" the tiny built one.
CASES = [("minilm", "classification"), ("llama", "causal_lm")]
CASE_IDS = ["minilm-cls", "llama-lm"]


# ------------------------------------------------------------------------------------ helpers
@pytest.fixture
def model_cfgs(minilm_cfg: ModelConfig, tiny_llama_cfg: ModelConfig) -> dict[str, ModelConfig]:
    return {"minilm": minilm_cfg, "llama": tiny_llama_cfg}


@pytest.fixture(scope="session")
def tokenizer(minilm_dir: str):
    return load_tokenizer(ModelConfig(name_or_path=minilm_dir))


@pytest.fixture(scope="session")
def inputs(tokenizer) -> dict[str, torch.Tensor]:
    return dict(tokenizer(PROBE_TEXTS, padding=True, return_tensors="pt"))


@pytest.fixture(scope="session")
def base_logits(minilm_dir: str, make_tiny_llama_cfg, inputs) -> dict[tuple[str, str], torch.Tensor]:
    """Logits of each unadapted base (loaded once per session; heads seeded with seed 0)."""
    cfgs = {"minilm": ModelConfig(name_or_path=minilm_dir), "llama": make_tiny_llama_cfg()}
    tok = load_tokenizer(cfgs["minilm"])
    out = {}
    for arch, task in [*CASES, ("llama", "classification")]:
        model = load_model(cfgs[arch], task, 2, seed=0, tokenizer=tok).eval()
        out[arch, task] = logits(model, inputs)
    return out


@torch.no_grad()
def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**inputs).logits.detach().clone()


def build(cfg: ModelConfig, task: str, rslora: bool = False, targets: list[str] | None = None,
          init=None, r: int = R, alpha: float = ALPHA) -> Assembled:
    adapter = LoRAConfig(r=r, alpha=alpha, use_rslora=rslora, target_modules=targets)
    assembled = assemble(cfg, adapter, init or KaimingInit(), task, 2, seed=0)
    assembled.model.eval()
    return assembled


@torch.no_grad()
def randomize(layers: dict[str, LoRALinear], std_b: float = 0.05) -> None:
    """Non-zero A and B (as after some training)."""
    for layer in layers.values():
        layer.lora_A.normal_(std=1.0 / math.sqrt(layer.lora_A.shape[1]))
        layer.lora_B.normal_(std=std_b)


def assert_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    diff = (a - b).abs().max().item()
    assert diff <= atol, f"max abs difference {diff:.3g} > {atol:g}"


def assert_differs(a: torch.Tensor, b: torch.Tensor, by: float = 1e-3) -> None:
    diff = (a - b).abs().max().item()
    assert diff > by, f"expected a visible difference, got {diff:.3g}"


# ------------------------------------------------------------------------------ init identity
@pytest.mark.parametrize("init", [KaimingInit(), GaussianInit()], ids=["kaiming", "gaussian"])
@pytest.mark.parametrize("arch,task", CASES, ids=CASE_IDS)
def test_init_is_identity_and_disabled_is_base(model_cfgs, inputs, base_logits, arch, task, init) -> None:
    a = build(model_cfgs[arch], task, init=init)
    base = base_logits[arch, task]
    for layer in a.layers.values():
        assert torch.count_nonzero(layer.lora_B) == 0
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()  # A random, so B gets gradients
    assert_close(logits(a.model, inputs), base, 1e-5)

    randomize(a.layers)
    adapted = logits(a.model, inputs)
    assert_differs(adapted, base)
    with adapters_disabled(a.model):
        assert all(layer.disabled for layer in a.layers.values())
        assert_close(logits(a.model, inputs), base, 1e-5)
    assert not any(layer.disabled for layer in a.layers.values())
    assert_close(logits(a.model, inputs), adapted, 0.0)


def test_gaussian_init_statistics(minilm_cfg) -> None:
    a = build(minilm_cfg, "classification", init=GaussianInit(), r=16)
    values = torch.cat([layer.lora_A.flatten() for layer in a.layers.values()])
    assert values.mean().abs() < 0.01
    assert values.std().item() == pytest.approx(1 / math.sqrt(16), rel=0.02)


# --------------------------------------------------------------------- independent reference
def effective_weight(layer: nn.Module, in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The weight a layer applies, measured by feeding it the identity matrix."""
    with torch.no_grad():
        out = layer(torch.eye(in_features))
        if bias is not None:
            out = out - bias
    return out.T


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("arch,task", CASES, ids=CASE_IDS)
def test_effective_weight_matches_reference(model_cfgs, arch, task, rslora) -> None:
    a = build(model_cfgs[arch], task, rslora=rslora)
    randomize(a.layers, std_b=0.1)
    scale = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    wrong_scale = ALPHA / R if rslora else ALPHA / math.sqrt(R)
    assert len(a.layers) == (37 if arch == "minilm" else 14)
    for name, layer in a.layers.items():
        w0 = layer.base.weight.detach().clone()
        bias = None if layer.base.bias is None else layer.base.bias.detach()
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        assert A.shape == (R, w0.shape[1]) and B.shape == (w0.shape[0], R)
        reference = w0 + scale * (B @ A)
        measured = effective_weight(layer, w0.shape[1], bias)
        assert_close(measured, reference, 1e-5)
        assert_differs(measured, w0 + wrong_scale * (B @ A), 1e-4)   # the scale is pinned down
        assert_close(layer.delta_weight(), scale * (B @ A), 1e-6)
        assert_close(layer.merged_weight(), reference, 1e-6)
        assert layer.scaling == pytest.approx(scale)


def test_dropout_acts_on_the_adapter_path_only() -> None:
    linear = nn.Linear(16, 8)
    layer = LoRAConfig(r=2, alpha=4, dropout=0.5).wrap(linear)
    x = torch.randn(64, 16)
    with torch.no_grad():
        layer.train()
        torch.manual_seed(1)
        # B = 0: dropout must not touch the base output even in training mode.
        assert_close(layer(x), linear(x), 1e-6)
        layer.lora_B.normal_()
        layer.eval()
        expected = linear(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T
        assert_close(layer(x), expected, 1e-5)
        layer.train()
        assert_differs(layer(x), expected)


# ---------------------------------------------------------------------------- merge / unmerge
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("arch,task", CASES, ids=CASE_IDS)
def test_merge_unmerge_roundtrip(model_cfgs, inputs, arch, task, rslora) -> None:
    a = build(model_cfgs[arch], task, rslora=rslora)
    randomize(a.layers)
    w0 = {name: layer.base.weight.detach().clone() for name, layer in a.layers.items()}
    unmerged = logits(a.model, inputs)
    for layer in a.layers.values():
        layer.merge()
        assert layer.merged
    scale = ALPHA / math.sqrt(R) if rslora else ALPHA / R
    for name, layer in a.layers.items():
        assert_close(layer.base.weight, w0[name] + scale * layer.lora_B @ layer.lora_A, 1e-6)
    merged = logits(a.model, inputs)
    assert_close(merged, unmerged, 1e-5)
    for layer in a.layers.values():   # merging twice is a no-op
        layer.merge()
    assert_close(logits(a.model, inputs), unmerged, 1e-5)
    with pytest.raises(RuntimeError, match="unmerge"):
        with adapters_disabled(a.model):
            pass
    for layer in a.layers.values():
        layer.unmerge()
        layer.unmerge()
        assert not layer.merged
    for name, layer in a.layers.items():
        assert_close(layer.base.weight, w0[name], 1e-6)
    assert_close(logits(a.model, inputs), unmerged, 1e-5)


@pytest.mark.parametrize("arch,task", CASES, ids=CASE_IDS)
def test_fold_into_base_gives_plain_linear(model_cfgs, inputs, base_logits, arch, task) -> None:
    a = build(model_cfgs[arch], task, rslora=arch == "llama")
    randomize(a.layers)
    adapted = logits(a.model, inputs)
    n_base = sum(p.numel() for layer in a.layers.values() for p in layer.base.parameters())
    model = fold_into_base(a.model)
    assert not adapter_layers(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for name in a.layers:
        assert type(model.get_submodule(name)) is nn.Linear
    assert not any("lora_" in n for n, _ in model.named_parameters())
    assert sum(model.get_submodule(n).weight.numel() + (model.get_submodule(n).bias.numel()
               if model.get_submodule(n).bias is not None else 0) for n in a.layers) == n_base
    folded = logits(model, inputs)
    assert_close(folded, adapted, 1e-5)
    assert_differs(folded, base_logits[arch, task])


# ------------------------------------------------------------------------------ save and load
def test_save_load_roundtrip_minilm_with_head(minilm_cfg, inputs, tmp_path: Path) -> None:
    a = build(minilm_cfg, "classification")
    randomize(a.layers)
    with torch.no_grad():   # a "trained" head: different from the seeded fresh one
        head = a.model.get_submodule("classifier")
        head.weight.normal_(std=0.5)
        head.bias.normal_(std=0.5)
    expected = logits(a.model, inputs)
    save_adapter(tmp_path / "adapter", a.model, a.meta)
    assert (tmp_path / "adapter" / "lorafit_adapter.safetensors").is_file()
    assert not (tmp_path / "adapter.tmp").exists()

    b = load_adapted(tmp_path / "adapter")
    assert set(b.layers) == set(a.layers)
    assert all(isinstance(layer, LoRALinear) and layer.scaling == ALPHA / R for layer in b.layers.values())
    assert torch.equal(b.model.classifier.weight, head.weight)
    assert_close(logits(b.model, inputs), expected, 1e-6)


@pytest.fixture
def tiny_llama_run(tiny_llama_cfg, tmp_path: Path):
    """A tiny Llama adapter saved like `lorafit train` saves it (its built base in RUN/base)."""
    a = build(tiny_llama_cfg, "causal_lm", rslora=True)
    randomize(a.layers)
    base = load_model(tiny_llama_cfg, "causal_lm", seed=0, tokenizer=a.tokenizer)
    save_base(base, a.tokenizer, tmp_path / "base")
    a.meta["base_model"] = str(tmp_path / "base")
    save_adapter(tmp_path / "adapter", a.model, a.meta)
    return a, tmp_path


def test_save_load_roundtrip_tiny_llama(tiny_llama_run, inputs) -> None:
    a, run = tiny_llama_run
    b = load_adapted(run / "adapter")
    assert b.meta["task"] == "causal_lm" and b.heads == []
    assert all(layer.scaling == pytest.approx(ALPHA / math.sqrt(R)) for layer in b.layers.values())
    assert_close(logits(b.model, inputs), logits(a.model, inputs), 1e-6)


def test_tampered_base_is_refused(tiny_llama_run, tmp_path: Path) -> None:
    _, run = tiny_llama_run
    from transformers import AutoModelForCausalLM

    tampered = AutoModelForCausalLM.from_pretrained(run / "base")
    with torch.no_grad():
        tampered.model.layers[1].self_attn.q_proj.weight[0, 0] += 1e-3   # one weight of one matrix
    save_base(tampered, load_tokenizer(ModelConfig(name_or_path=str(run / "base"))), tmp_path / "tampered")
    with pytest.raises(ConfigError, match="fingerprint") as err:
        load_adapted(run / "adapter", base_model=str(tmp_path / "tampered"))
    assert "tampered" in str(err.value) and "\n" not in str(err.value)


def test_an_adapter_with_one_inf_is_not_written(tmp_path: Path) -> None:
    """A diverged run must not leave a final adapter: a single inf (or NaN) entry stops ``save_adapter``
    before anything is written. Kills a check that refuses only all-NaN tensors."""
    model = nn.Sequential(LoRAConfig(r=2, alpha=4).wrap(nn.Linear(6, 4)))
    with torch.no_grad():
        model[0].lora_A[0, 0] = float("inf")
    with pytest.raises(ConfigError, match="NaN or inf"):
        save_adapter(tmp_path / "adapter", model, {"modules_to_save": []})
    assert not (tmp_path / "adapter").exists()


def test_lorafits_own_files_win_over_an_old_layout_in_the_same_folder(tmp_path: Path) -> None:
    """``adapter_files``: lorafit's names when present, the old (PEFT-named) layout only otherwise.
    Kills reading a stray adapter_config.json instead of lorafit_adapter.json."""
    from lorafit.adapters.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_files

    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_config.json", "adapter_model.safetensors"):
        (tmp_path / name).write_text("{}")
    assert adapter_files(tmp_path) == (tmp_path / ADAPTER_CONFIG, tmp_path / ADAPTER_WEIGHTS)
    (tmp_path / ADAPTER_CONFIG).unlink()
    assert adapter_files(tmp_path) == (tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors")


def test_adapter_of_another_config_is_refused(minilm_cfg, tmp_path: Path) -> None:
    a = build(minilm_cfg, "classification")
    save_adapter(tmp_path / "adapter", a.model, a.meta)
    other = build(minilm_cfg, "classification", targets=["query"])
    from safetensors.torch import load_file

    from lorafit.adapters import load_adapter_state
    with pytest.raises(ConfigError, match="no place for"):
        load_adapter_state(other.model, load_file(str(tmp_path / "adapter" / "lorafit_adapter.safetensors")))


# --------------------------------------------------------------------------------- trainable
def _expected_trainable(arch: str, task: str, r: int) -> int:
    """Counted from the architectures by hand, not from the adapted model."""
    if arch == "minilm":   # hidden 384, FFN 1536, 6 layers + pooler; head 384 -> 2 with bias
        per_layer = 4 * (384 + 384) + (384 + 1536) + (1536 + 384)
        return r * (6 * per_layer + (384 + 384)) + (384 * 2 + 2)
    # tiny Llama: hidden 32, 4 heads of 8 (q/o: 32), 2 KV heads (k/v: 16), FFN 64, 2 layers
    per_layer = (32 + 32) + 2 * (32 + 16) + (32 + 32) + 3 * (32 + 64)
    head = 32 * 2 if task == "classification" else 0   # `score`, no bias; lm_head stays frozen
    return r * 2 * per_layer + head


@pytest.mark.parametrize("arch,task", [*CASES, ("llama", "classification")],
                         ids=[*CASE_IDS, "llama-cls"])
def test_only_adapter_and_new_head_train(model_cfgs, inputs, arch, task) -> None:
    a = build(model_cfgs[arch], task, r=8)
    named = trainable_parameters(a.model)
    assert sum(p.numel() for _, p in named) == _expected_trainable(arch, task, 8)
    head_names = {"minilm": ["classifier"], "llama": ["score"] if task == "classification" else []}[arch]
    # BERT's top-level `dropout` counts as a head module too; it has no parameters.
    assert [h for h in a.heads if any(True for _ in a.model.get_submodule(h).parameters())] == head_names
    for name, _ in named:
        last = name.rsplit(".", 1)[-1]
        assert last in ("lora_A", "lora_B") or name.split(".")[0] in head_names, name
    assert all(not p.requires_grad for n, p in a.model.named_parameters() if ".base." in n)

    # One backward pass: at init (B = 0) only B and the head get gradients; nothing frozen does.
    out = a.model.train()(**inputs)
    out.logits.float().pow(2).mean().backward()
    for layer in a.layers.values():
        assert layer.lora_B.grad is not None and layer.lora_B.grad.abs().sum() > 0
        assert layer.lora_A.grad is None or torch.count_nonzero(layer.lora_A.grad) == 0
    assert all(p.grad is None for p in a.model.parameters() if not p.requires_grad)


# -------------------------------------------------------------------------- parity with PEFT
@pytest.mark.filterwarnings("ignore::FutureWarning")   # PEFT calls a deprecated transformers helper
@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("arch,task", CASES, ids=CASE_IDS)
def test_parity_with_peft(model_cfgs, inputs, base_logits, arch, task, rslora) -> None:
    peft = pytest.importorskip("peft")
    targets = BERT_TARGETS if arch == "minilm" else LLAMA_TARGETS
    ours = build(model_cfgs[arch], task, rslora=rslora, targets=targets)
    randomize(ours.layers)
    expected = logits(ours.model, inputs)

    base = load_model(model_cfgs[arch], task, 2, seed=0, tokenizer=ours.tokenizer)
    config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                             use_rslora=rslora, bias="none")
    theirs = peft.get_peft_model(base, config)
    theirs_layers = {name.removeprefix("base_model.model."): m for name, m in theirs.named_modules()
                     if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    assert set(theirs_layers) == set(ours.layers)   # the same layers adapted
    with torch.no_grad():
        for name, layer in ours.layers.items():
            peft_layer = theirs_layers[name]
            assert peft_layer.lora_A["default"].weight.shape == layer.lora_A.shape
            assert peft_layer.lora_B["default"].weight.shape == layer.lora_B.shape
            assert peft_layer.scaling["default"] == pytest.approx(layer.scaling)
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    got = logits(theirs, inputs)
    assert_differs(got, base_logits[arch, task])
    assert_close(got, expected, 1e-5)


# ------------------------------------------------------------------------------- find_targets
@pytest.fixture(scope="session")
def minilm_model(minilm_dir: str):
    """MiniLM with a classification head, read-only (for target finding)."""
    return load_model(ModelConfig(name_or_path=minilm_dir), "classification", 2, seed=0)


@pytest.fixture
def llama_model(tiny_llama_cfg, tokenizer):
    return load_model(tiny_llama_cfg, "causal_lm", seed=0, tokenizer=tokenizer)


def test_default_targets_per_architecture(minilm_model, llama_model) -> None:
    assert default_targets(minilm_model) == BERT_TARGETS == DEFAULT_TARGETS["bert"]
    assert default_targets(llama_model) == LLAMA_TARGETS
    assert default_targets(SimpleNamespace(config=SimpleNamespace(model_type="brand-new"))) == ["all-linear"]

    names = find_targets(minilm_model, BERT_TARGETS, exclude=head_module_names(minilm_model))
    assert len(names) == 6 * 6 + 1 and "bert.pooler.dense" in names
    assert all(n.rsplit(".", 1)[-1] in BERT_TARGETS for n in names)
    assert "classifier" not in names

    names = find_targets(llama_model, LLAMA_TARGETS, exclude=head_module_names(llama_model))
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert names[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]


def test_assemble_uses_the_defaults(minilm_cfg, tiny_llama_cfg) -> None:
    assert len(build(minilm_cfg, "classification").layers) == 37
    a = build(tiny_llama_cfg, "causal_lm")
    assert sorted({n.rsplit(".", 1)[-1] for n in a.layers}) == sorted(LLAMA_TARGETS)
    assert a.meta["targets"] == list(a.layers)


def test_regex_patterns(minilm_model) -> None:
    heads = head_module_names(minilm_model)
    assert find_targets(minilm_model, [r".*layer\.[0-2]\..*query"], heads) == [
        f"bert.encoder.layer.{i}.attention.self.query" for i in range(3)]
    names = find_targets(minilm_model, [r"bert\.encoder\.layer\.\d+\.attention\.self\.(query|value)"], heads)
    assert len(names) == 12 and all(n.endswith(("query", "value")) for n in names)
    assert len(find_targets(minilm_model, ["value"], heads)) == 6          # last name component
    assert len(find_targets(minilm_model, [".*output.dense"], heads)) == 12  # attention.output + output
    assert find_targets(minilm_model, ["quer"], heads) == []                 # neither a name nor a full match
    assert find_targets(minilm_model, [r"layer\.0"], heads) == []            # regexes match the whole name
    assert find_targets(minilm_model, ["encoder"], heads) == []              # only nn.Linear layers


def test_all_linear_excludes_heads(minilm_model, llama_model) -> None:
    all_minilm = [n for n, m in minilm_model.named_modules() if isinstance(m, nn.Linear)]
    names = find_targets(minilm_model, ["all-linear"], head_module_names(minilm_model))
    assert names == [n for n in all_minilm if n != "classifier"] and len(names) == 37
    assert "classifier" in find_targets(minilm_model, ["all-linear"])
    names = find_targets(llama_model, ["all-linear"], head_module_names(llama_model))
    assert len(names) == 14 and "lm_head" not in names


def test_heads_are_never_targets(minilm_model, llama_model) -> None:
    assert find_targets(minilm_model, ["classifier", "dense"], ["dropout", "classifier"]).count("classifier") == 0
    assert find_targets(llama_model, ["lm_head"], head_module_names(llama_model)) == []


def test_adapted_layers_are_not_found_again() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    layers = attach(model, LoRAConfig(r=2), find_targets(model, ["0", "2"]))
    assert set(layers) == {"0", "2"}
    assert find_targets(model, ["0", "2"]) == []


@pytest.mark.parametrize("arch,task,expected", [
    ("minilm", "classification", ["query", "key", "value", "dense", "classifier"]),
    ("llama", "causal_lm", LLAMA_TARGETS),
], ids=CASE_IDS)
def test_pattern_matching_nothing_lists_layer_names(model_cfgs, arch, task, expected) -> None:
    with pytest.raises(ConfigError) as err:
        build(model_cfgs[arch], task, targets=["qkv_proj", r"nothing\..*"])
    message = str(err.value)
    assert "qkv_proj" in message and "matches no linear layer" in message
    for name in expected:
        assert name in message, (name, message)
    assert "\n" not in message
