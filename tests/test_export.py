"""Export to PEFT's adapter format, import from it, and the native format's new names (issue 19).

For every adapter (the ten of ``test_adapters.py``) on MiniLM and the tiny Llama, and for LoRA and DoRA
after every init that rewrites W0 (PiSSA, MiLoRA, OLoRA: the rebase LoRA-GA also goes through), the
adapter is made non-trivial (random trainable tensors, phases switched), saved as a run, exported, and
loaded back **with PEFT itself** (``PeftModel.from_pretrained`` on a fresh base): its logits must equal
lorafit's to 1e-4 relative. A wrong sign on ``B0 A0``, an unfolded scale, Bone's tiling off by one,
a dropped DoRA magnitude or head, a padded rank that changes the scale — each moves the logits.

``servable`` exports (causal LMs) are also checked against vLLM's adapter rules (one rank and alpha,
LoRA only, no modules_to_save, Llama projection names) by :func:`lorafit.export.check_servable`, which
itself is checked to flag each rule. Where no exact form exists the export is refused unless
``--approx``, and then the per-layer SVD error is recorded (0 at full rank, where the logits match).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from lorafit.adapters.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, save_adapter
from lorafit.assemble import assemble, load_adapted
from lorafit.config import ConfigError, ModelConfig
from lorafit.export import check_servable, export
from lorafit.inits.svd import MiLoRAInit, OLoRAInit, PiSSAInit
from lorafit.models import load_model, load_tokenizer, save_base
from tests.test_adapters import NAMES, make_config, max_diff, perturb

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

INITS = {"pissa": PiSSAInit(), "milora": MiLoRAInit(), "olora": OLoRAInit()}
NO_EXACT_SERVABLE = {"dora", "bat", "rosa"}      # full-rank ΔW (RoSA: once its sparse part is on)
NO_EXACT_PEFT = {"rosa"}                         # PEFT has DoRA and MiSS-bat, but no sparse part
FULL_RANK = 1536                                 # ≥ every layer's smaller side: the SVD keeps everything


@pytest.fixture(scope="module")
def bases(tmp_path_factory, minilm_dir: str, make_tiny_llama_cfg) -> dict[str, tuple[ModelConfig, str]]:
    """MiniLM as a classifier, and the tiny Llama saved as a folder (PEFT loads its base from a path)."""
    built = make_tiny_llama_cfg()
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = load_tokenizer(built)
    save_base(load_model(built, "causal_lm", seed=0, tokenizer=tokenizer), tokenizer, folder)
    return {"minilm": (ModelConfig(name_or_path=minilm_dir), "classification"),
            "llama": (ModelConfig(name_or_path=str(folder)), "causal_lm")}


def probe(tokenizer) -> dict[str, torch.Tensor]:
    return tokenizer(["the movie was a delight from start to end", "dull"], return_tensors="pt", padding=True)


@torch.no_grad()
def trained_run(base: tuple[ModelConfig, str], name: str, folder: Path, init: str | None = None,
                seed: int = 1) -> torch.Tensor:
    """Attach ``name`` (after ``init``), move every trainable tensor, save as a run; return its logits."""
    model_cfg, task = base
    assembled = assemble(model_cfg, make_config(name), INITS.get(init), task, 2, seed=0)
    gen = torch.Generator().manual_seed(seed)
    for layer in assembled.layers.values():
        perturb(layer, gen)
    for head in assembled.heads:
        for param in assembled.model.get_submodule(head).parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    save_adapter(folder / "adapter", assembled.model, assembled.meta)
    return assembled.model.eval()(**probe(assembled.tokenizer)).logits


@torch.no_grad()
def peft_logits(base: tuple[ModelConfig, str], folder: Path) -> torch.Tensor:
    """The exported folder as PEFT reads it, onto a fresh base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_cfg, task = base
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    plain = auto.from_pretrained(model_cfg.name_or_path, **({"num_labels": 2} if task != "causal_lm" else {}))
    model = PeftModel.from_pretrained(plain, str(folder)).eval()
    return model(**probe(AutoTokenizer.from_pretrained(str(folder)))).logits


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return max_diff(a, b) / float(b.abs().max())


# ------------------------------------------------------------------------------ exact exports
CASES = [(arch, name, None) for arch in ("minilm", "llama") for name in NAMES] + \
        [(arch, name, init) for arch in ("minilm", "llama") for name in ("lora", "dora") for init in INITS]


@pytest.mark.parametrize("arch,name,init", CASES, ids=[f"{a}-{n}" + (f"-{i}" if i else "") for a, n, i in CASES])
def test_peft_export_loads_in_peft_with_lorafits_logits(bases, arch: str, name: str, init: str | None,
                                                         tmp_path: Path) -> None:
    expected = trained_run(bases[arch], name, tmp_path / "run", init)
    if name in NO_EXACT_PEFT:
        with pytest.raises(ConfigError, match=r"sparse part S .* has no low-rank form.*--approx"):
            export(str(tmp_path / "run"), str(tmp_path / "peft"), "peft")
        result = export(str(tmp_path / "run"), str(tmp_path / "peft"), "peft", approx=True, max_rank=FULL_RANK)
        assert max(result.approximate.values()) <= 1e-5
        assert relative(peft_logits(bases[arch], tmp_path / "peft"), expected) <= 1e-4
        return
    result = export(str(tmp_path / "run"), str(tmp_path / "peft"), "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    kind = {"dora": "LORA", "bone": "MISS", "bat": "MISS"}.get(name, "LORA")
    assert config["peft_type"] == kind and config["use_dora" if kind == "LORA" else "r"] is not None
    assert config.get("use_dora", False) == (name == "dora")
    assert config["base_model_name_or_path"] == bases[arch][0].name_or_path
    if init is not None:          # sBA − sB0A0: twice the rank, as PEFT converts PiSSA/OLoRA
        assert config["r"] == 2 * make_config(name).r
    if name == "adalora":         # the pruned triplet is gone: rank 5 of 6
        assert config["r"] == 5
    assert not result.approximate
    assert relative(peft_logits(bases[arch], tmp_path / "peft"), expected) <= 1e-4
    assert result.max_abs_logit_diff <= result.tolerance


@pytest.mark.parametrize("name", NAMES)
def test_servable_export_follows_vllms_rules_and_keeps_the_logits(bases, name: str, tmp_path: Path) -> None:
    expected = trained_run(bases["llama"], name, tmp_path / "run")
    if name in NO_EXACT_SERVABLE:
        with pytest.raises(ConfigError, match=r"no exact form in the servable format.*--approx"):
            export(str(tmp_path / "run"), str(tmp_path / "out"), "servable")
        assert not (tmp_path / "out").exists()
        return
    result = export(str(tmp_path / "run"), str(tmp_path / "out"), "servable")
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    state = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert check_servable(config, state) == []
    assert config["lora_alpha"] == config["r"] and not config["rank_pattern"]
    assert {t.shape[0] for k, t in state.items() if k.endswith("lora_A.weight")} == {config["r"]}
    assert relative(peft_logits(bases["llama"], tmp_path / "out"), expected) <= 1e-4
    assert result.max_abs_logit_diff <= result.tolerance


@pytest.mark.parametrize("name", sorted(NO_EXACT_SERVABLE))
def test_approx_records_the_svd_error_and_is_exact_at_full_rank(bases, name: str, tmp_path: Path) -> None:
    """The truncated SVD's recorded error falls with the rank, the logit error with it, to 0 at full rank."""
    expected = trained_run(bases["llama"], name, tmp_path / "run")
    errors, diffs = [], []
    for rank in (2, 8, FULL_RANK):
        result = export(str(tmp_path / "run"), str(tmp_path / f"r{rank}"), "servable", approx=True, max_rank=rank)
        record = json.loads((tmp_path / f"r{rank}" / "lorafit_export.json").read_text())
        assert set(record["approximated"]) == set(result.layers) and record["approximated"] == result.approximate
        errors.append(max(result.approximate.values()))
        diffs.append(max_diff(peft_logits(bases["llama"], tmp_path / f"r{rank}"), expected))
    assert 1 >= errors[0] > errors[1] > errors[2] and errors[2] <= 1e-5
    assert diffs[0] > diffs[1] > diffs[2] and diffs[2] <= 1e-4 * float(expected.abs().max())


def test_max_rank_below_the_exact_rank_needs_approx(bases, tmp_path: Path) -> None:
    trained_run(bases["llama"], "lora", tmp_path / "run")
    with pytest.raises(ConfigError, match=r"exact rank 4 is above --max-rank=2"):
        export(str(tmp_path / "run"), str(tmp_path / "out"), "peft", max_rank=2)


def test_servable_refuses_heads_and_existing_folders(bases, tmp_path: Path) -> None:
    trained_run(bases["minilm"], "lora", tmp_path / "run")
    with pytest.raises(ConfigError, match=r"servable is for causal LMs"):
        export(str(tmp_path / "run"), str(tmp_path / "out"), "servable")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"mine"):
        export(str(tmp_path / "run"), str(tmp_path / "mine"), "peft")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_check_servable_names_every_rule_it_enforces() -> None:
    good = {"peft_type": "LORA", "r": 8, "lora_alpha": 8, "bias": "none", "init_lora_weights": True}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert check_servable(good, {key: torch.zeros(1)}) == []
    bad = {"peft_type": "MISS", "use_dora": True, "modules_to_save": ["lm_head"], "rank_pattern": {"q_proj": 4},
           "bias": "all", "init_lora_weights": "pissa", "r": 1024}
    problems = " ".join(check_servable({**good, **bad}, {key.replace("q_proj", "dense"): torch.zeros(1),
                                                         "base_model.model.x.magnitude": torch.zeros(1)}))
    for needle in ("peft_type MISS", "use_dora", "modules_to_save", "rank_pattern", "bias", "pissa", "r=1024",
                   "target model.layers.0.self_attn.dense", "tensor base_model.model.x.magnitude"):
        assert needle in problems


def test_export_cli_writes_and_prints_the_vllm_command(bases, tmp_path: Path, run_cli) -> None:
    trained_run(bases["llama"], "lora", tmp_path / "run")
    result = run_cli("export", str(tmp_path / "run"), str(tmp_path / "out"), "--format", "servable")
    assert result.code == 0, result.text
    assert "vllm serve" in result.stderr and "--max-lora-rank 8" in result.stderr
    result = run_cli("export", str(tmp_path / "run"), str(tmp_path / "out"))
    assert result.code == 2 and "--overwrite" in result.text


# ------------------------------------------------------------------------------ import
def peft_folder(base: tuple[ModelConfig, str], kind: str, folder: Path) -> torch.Tensor:
    """A PEFT LoRA / rsLoRA / DoRA trained elsewhere (random factors and head), saved; returns PEFT's logits."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    model_cfg, task = base
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    plain = auto.from_pretrained(model_cfg.name_or_path, **({"num_labels": 2} if task != "causal_lm" else {}))
    targets = ["q_proj", "v_proj", "down_proj"] if task == "causal_lm" else ["query", "value", "dense"]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_rslora=kind == "rslora",
                        use_dora=kind == "dora", task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS")
    model = get_peft_model(plain, config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
    model.save_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(model_cfg.tokenizer or model_cfg.name_or_path)
    with torch.no_grad():
        return model.eval()(**probe(tokenizer)).logits


@pytest.mark.parametrize("arch", ["minilm", "llama"])
@pytest.mark.parametrize("kind", ["lora", "rslora", "dora"])
def test_a_peft_adapter_loads_merges_and_trains_on(bases, arch: str, kind: str, tmp_path: Path, run_cli) -> None:
    expected = peft_folder(bases[arch], kind, tmp_path / "peft")
    loaded = load_adapted(tmp_path / "peft")
    with torch.no_grad():
        assert relative(loaded.model.eval()(**probe(loaded.tokenizer)).logits, expected) <= 1e-5
    result = run_cli("merge", str(tmp_path / "peft"), str(tmp_path / "merged"))
    assert result.code == 0, result.text
    if arch == "llama":               # scored and talked to like a run
        commonsense = Path(__file__).resolve().parent / "fixtures" / "commonsense"
        result = run_cli("eval", str(tmp_path / "peft"), "suite=commonsense", f"data.path={commonsense}",
                         "tasks=[boolq]", f"output_dir={tmp_path / 'eval'}")
        assert result.code == 0, result.text
        assert json.loads((tmp_path / "eval" / "results.json").read_text())["boolq"]["n"] > 0
        from lorafit.data.chat import template_text

        tokenizer = load_tokenizer(bases[arch][0])          # saved with the adapter, as trainers do
        tokenizer.chat_template = template_text("alpaca", None)
        tokenizer.save_pretrained(str(tmp_path / "peft"))
        result = run_cli("chat", str(tmp_path / "peft"), "--prompt", "hello", "--max-new-tokens", "3")
        assert result.code == 0, result.text
    from lorafit.adapters.dora import DoRAConfig
    from lorafit.adapters.lora import LoRAConfig

    cls = DoRAConfig if kind == "dora" else LoRAConfig
    targets = ["q_proj", "v_proj", "down_proj"] if arch == "llama" else ["query", "value", "dense"]
    options = dict(r=4, alpha=8, use_rslora=kind == "rslora", target_modules=targets)
    model_cfg, task = bases[arch]
    started = assemble(model_cfg, cls(**options, from_pretrained=str(tmp_path / "peft")), None, task, 2, seed=0)
    with torch.no_grad():
        assert relative(started.model.eval()(**probe(started.tokenizer)).logits, expected) <= 1e-5
    other = LoRAConfig if kind == "dora" else DoRAConfig
    with pytest.raises(ConfigError, match=r"does not match the run's adapter.*adapter=" + kind):
        assemble(model_cfg, other(**options, from_pretrained=str(tmp_path / "peft")), None, task, 2, seed=0)
    with pytest.raises(ConfigError, match=r"rewrites W0"):
        assemble(model_cfg, cls(**options, from_pretrained=str(tmp_path / "peft")), PiSSAInit(), task, 2, seed=0)


def test_train_continues_a_peft_adapter_from_the_cli(bases, tmp_path: Path, run_cli) -> None:
    peft_folder(bases["minilm"], "lora", tmp_path / "peft")
    result = run_cli("train", f"output_dir={tmp_path / 'run'}", "model=minilm", "data=sentiment_demo",
                     "data.max_train_examples=16", "data.max_eval_examples=8", "data.batch_size=8", "max_steps=2",
                     "progress=false", "eval_at_start=false", "adapter.r=4", "adapter.alpha=8",
                     "adapter.target_modules=[query,value,dense]", f"adapter.from_pretrained={tmp_path / 'peft'}")
    assert result.code == 0, result.text
    result = run_cli("train", f"output_dir={tmp_path / 'again'}", "model=minilm", "data=sentiment_demo",
                     "max_steps=2", "progress=false", f"adapter.from_pretrained={tmp_path / 'peft'}")
    assert result.code == 2 and "adapter.r=4" in result.text and "Traceback" not in result.text


def test_unsupported_peft_folders_are_refused_with_the_reason(bases, tmp_path: Path) -> None:
    peft_folder(bases["llama"], "lora", tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"q_proj": 2}}))
    with pytest.raises(ConfigError, match=r"per-layer ranks"):
        load_adapted(tmp_path / "peft")
    # per-layer alphas too (a missed alpha_pattern would load with the wrong scale on those layers)
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "alpha_pattern": {"q_proj": 2}}))
    with pytest.raises(ConfigError, match=r"per-layer ranks or alphas"):
        load_adapted(tmp_path / "peft")
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(ConfigError, match=r"peft_type 'IA3'"):
        load_adapted(tmp_path / "peft")


# ------------------------------------------------------------------------------ the native format
def test_native_files_are_not_peft_names_and_the_old_layout_still_loads(bases, tmp_path: Path) -> None:
    expected = trained_run(bases["minilm"], "dora", tmp_path / "run", "pissa")
    folder = tmp_path / "run" / "adapter"
    assert sorted(p.name for p in folder.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    assert not ADAPTER_CONFIG.startswith("adapter_") and not ADAPTER_WEIGHTS.startswith("adapter_")
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    (old / ADAPTER_CONFIG).rename(old / "adapter_config.json")
    (old / ADAPTER_WEIGHTS).rename(old / "adapter_model.safetensors")
    loaded = load_adapted(old)
    with torch.no_grad():
        assert max_diff(loaded.model.eval()(**probe(loaded.tokenizer)).logits, expected) <= 1e-5
    meta = json.loads((old / "adapter_config.json").read_text())
    assert "peft_type" not in meta


def test_adalora_keeps_its_masks_under_a_name_peft_does_not_use(bases, tmp_path: Path) -> None:
    """lorafit's AdaLoRA masks were saved as ``rank_pattern`` (PEFT's name for integer ranks); now
    ``kept_triplets``, and an adapter config of the old name still loads."""
    trained_run(bases["minilm"], "adalora", tmp_path / "run")
    folder = tmp_path / "run" / "adapter"
    meta: dict[str, Any] = json.loads((folder / ADAPTER_CONFIG).read_text())
    assert "rank_pattern" not in meta["adapter"]
    meta["adapter"]["rank_pattern"] = meta["adapter"].pop("kept_triplets")
    (folder / ADAPTER_CONFIG).write_text(json.dumps(meta))
    load_adapted(folder)


def test_an_adalora_layer_pruned_to_rank_zero_leaves_target_modules(bases, tmp_path: Path) -> None:
    """PEFT refuses r=0, so a layer whose every triplet was pruned (ΔW = 0) is left out of the folder."""
    model_cfg, task = bases["llama"]
    assembled = assemble(model_cfg, make_config("adalora"), None, task, 2, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in assembled.layers.values():
            perturb(layer, gen)
        pruned = next(iter(assembled.layers))
        assembled.layers[pruned].apply_mask(torch.zeros(assembled.layers[pruned].r, dtype=torch.bool))
        expected = assembled.model.eval()(**probe(assembled.tokenizer)).logits
    save_adapter(tmp_path / "run" / "adapter", assembled.model, assembled.meta)
    export(str(tmp_path / "run"), str(tmp_path / "peft"), "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert pruned not in config["target_modules"] and len(config["target_modules"]) == len(assembled.layers) - 1
    assert relative(peft_logits(bases["llama"], tmp_path / "peft"), expected) <= 1e-4
