"""Config composition (Hydra + dataclass schemas) and the one-paragraph errors of ``lorafit train``."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lorafit.adapters.lora import LoRAConfig
from lorafit.cli import CONFIG_DIR, compose, rewrite_overrides
from lorafit.config import (GROUPS, ConfigError, EvalConfig, HardwareConfig, ModelConfig, TrainConfig,
                            schema_of, validate)
from lorafit.data.options import GlueData, SentimentDemoData
from lorafit.inits.basic import KaimingInit
from lorafit.optim.basic import AdamWConfig, SGDConfig

# Option files that need a value the YAML leaves to the user.
REQUIRED_EXTRAS = {("data", "instruct"): ["data.path=some/train.jsonl"],
                   ("data", "commonsense"): ["data.path=some/dir"],
                   ("data", "preference"): ["data.path=some/pairs.jsonl"],
                   ("data", "chat"): ["data.path=some/chat.jsonl"]}

OPTION_FILES = sorted((g, f.stem) for g in GROUPS for f in (CONFIG_DIR / g).glob("*.yaml"))


def train_cfg(*overrides: str, recipe: str | None = None) -> TrainConfig:
    return validate(compose("train", list(overrides), recipe))


def plain(*overrides: str, recipe: str | None = None) -> dict:
    return OmegaConf.to_container(compose("train", list(overrides), recipe), resolve=True)


# ------------------------------------------------------------------------------ composition
def test_default_train_config_composes_and_validates(minilm_dir: str) -> None:
    cfg = train_cfg()
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.model, ModelConfig) and cfg.model.name_or_path == minilm_dir
    assert isinstance(cfg.adapter, LoRAConfig)
    assert (cfg.adapter.r, cfg.adapter.alpha, cfg.adapter.use_rslora) == (8, 16.0, False)
    assert isinstance(cfg.init, KaimingInit)
    assert isinstance(cfg.optimizer, AdamWConfig)
    assert isinstance(cfg.data, SentimentDemoData)
    assert isinstance(cfg.hardware, HardwareConfig)
    assert cfg.seed == 0 and cfg.num_epochs == 3


def test_every_group_has_option_files() -> None:
    groups = {g for g, _ in OPTION_FILES}
    assert groups == set(GROUPS)
    assert len(OPTION_FILES) >= 14


@pytest.mark.parametrize("group,option", OPTION_FILES, ids=[f"{g}={o}" for g, o in OPTION_FILES])
def test_every_option_file_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}", *REQUIRED_EXTRAS.get((group, option), [])]
    composed = compose("train", overrides)
    cfg = validate(composed)
    obj = getattr(cfg, group)
    # The group is validated by the schema its _target_ names ...
    assert type(obj) is schema_of(composed[group], group)
    # ... and every value the option file (plus its defaults) sets arrives unchanged.
    for key, value in OmegaConf.to_container(composed[group], resolve=True).items():
        if key != "_target_":
            got = getattr(obj, key)
            got = dataclasses.asdict(got) if dataclasses.is_dataclass(got) else got   # a nested node (task.reward)
            assert got == value, (group, option, key)


def test_eval_config_composes_and_validates() -> None:
    cfg = validate(compose("eval", ["data.task=rte"]), EvalConfig, groups=("data", "hardware"))
    assert isinstance(cfg, EvalConfig) and isinstance(cfg.data, GlueData)
    assert cfg.data.task == "rte" and cfg.suite == "glue"


def test_option_defaults_chain() -> None:
    cfg = train_cfg("adapter=rslora", "hardware=gpu")
    assert cfg.adapter.use_rslora is True and cfg.adapter.r == 8 and cfg.adapter.alpha == 16
    assert cfg.adapter.scaling == pytest.approx(16 / 8 ** 0.5)
    assert (cfg.hardware.device, cfg.hardware.mixed_precision) == ("gpu", "bf16")


@pytest.mark.parametrize("option", ["lora", "rslora"])
def test_plus_group_equals_group(option: str) -> None:
    assert plain(f"+adapter={option}") == plain(f"adapter={option}")
    assert rewrite_overrides([f"+adapter={option}"]) == [f"adapter={option}"]


def test_plus_group_really_switches() -> None:
    assert plain("+adapter=rslora")["adapter"]["use_rslora"] is True
    assert plain("+adapter=rslora") != plain()


@pytest.mark.parametrize("override", ["optim=sgd", "+optim=sgd", "optimizer=sgd", "+optimizer=sgd"])
def test_optim_alias_chooses_the_optimizer(override: str) -> None:
    cfg = train_cfg(override)
    assert isinstance(cfg.optimizer, SGDConfig) and cfg.optimizer.lr == 1e-2
    assert "optim" not in plain(override)


def test_optim_alias_sets_optimizer_keys() -> None:
    cfg = train_cfg("optim.lr=0.1")
    assert isinstance(cfg.optimizer, AdamWConfig) and cfg.optimizer.lr == 0.1
    cfg = train_cfg("optim=sgd", "optim.lr=0.1", "optim.momentum=0.9")
    assert isinstance(cfg.optimizer, SGDConfig)
    assert (cfg.optimizer.lr, cfg.optimizer.momentum) == (0.1, 0.9)


def test_schema_keys_absent_from_the_yaml_can_be_set() -> None:
    # ModelConfig.dropout / DataCommon.max_train_examples are schema fields that minilm.yaml and
    # sentiment_demo.yaml do not spell out; the documented `model.dropout=0.0` must still work.
    cfg = train_cfg("model.dropout=0.0", "data.max_train_examples=5", "adapter.target_modules=[query,value]")
    assert cfg.model.dropout == 0.0
    assert cfg.data.max_train_examples == 5
    assert cfg.adapter.target_modules == ["query", "value"]


def test_values_are_typed() -> None:
    cfg = train_cfg("adapter.r=4", "adapter.alpha=8", "adapter.use_rslora=true", "seed=3")
    assert cfg.adapter.r == 4 and isinstance(cfg.adapter.r, int)
    assert cfg.adapter.alpha == 8.0 and isinstance(cfg.adapter.alpha, float)
    assert cfg.adapter.scaling == pytest.approx(8 / 2)
    assert cfg.seed == 3


# ---------------------------------------------------------------------------------- recipes
RECIPE = """\
# @package _global_
defaults:
  - override /data: glue
  - override /adapter: rslora

data:
  task: rte
  batch_size: 16
adapter:
  r: 4
optimizer:
  lr: 1.0e-3
seed: 7
max_steps: 20
"""


@pytest.fixture
def recipe(tmp_path: Path) -> str:
    path = tmp_path / "my_recipe.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_recipe_is_applied(recipe: str) -> None:
    cfg = train_cfg(recipe=recipe)
    assert isinstance(cfg.data, GlueData) and cfg.data.task == "rte" and cfg.data.batch_size == 16
    assert cfg.data.max_length == 128  # untouched keys keep the option file's values
    assert cfg.adapter.use_rslora is True and cfg.adapter.r == 4 and cfg.adapter.alpha == 16
    assert cfg.optimizer.lr == 1e-3 and cfg.seed == 7 and cfg.max_steps == 20


def test_command_line_wins_over_recipe(recipe: str) -> None:
    cfg = train_cfg("data.task=mrpc", "adapter.r=16", "seed=3", "optim.lr=0.5", "adapter=lora", recipe=recipe)
    assert isinstance(cfg.data, GlueData)
    assert cfg.data.task == "mrpc" and cfg.data.batch_size == 16
    assert cfg.adapter.r == 16 and cfg.adapter.use_rslora is False
    assert cfg.seed == 3 and cfg.optimizer.lr == 0.5 and cfg.max_steps == 20


def test_missing_recipe_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        compose("train", [], str(tmp_path / "nope.yaml"))


# ----------------------------------------------------------------------------------- errors
def assert_one_paragraph(result, *needles: str) -> None:
    """Exit code 2, a single `lorafit train: error:` paragraph naming every needle, no traceback."""
    assert result.code == 2, (result.code, result.stderr)
    err = result.stderr.strip()
    assert err.startswith("lorafit train: error: "), err
    assert err.count("error:") == 1, err
    assert "\n\n" not in err, err          # one paragraph (the terminal may wrap its lines)
    assert "Traceback" not in err and 'File "' not in err, err
    for needle in needles:
        assert needle in result.text, (needle, result.text)


ERROR_CASES = {
    "typo-group-option": (["adapter=lorra"], ["'lorra'", "adapter", "lora", "rslora"]),
    "typo-group-option-plus": (["+adapter=lorra"], ["'lorra'", "adapter", "rslora"]),
    "typo-optim-option": (["optim=adamm"], ["'adamm'", "optimizer", "adamw", "sgd"]),
    "unknown-group-key": (["adapter.rr=3"], ["'adapter.rr'", "r, alpha, dropout"]),
    "unknown-top-key": (["foo=1"], ["'foo'"]),
    "unknown-top-key-plus": (["+foo=1"], ["'foo'", "seed"]),
    "unknown-optim-key": (["optim.lrr=1"], ["'optimizer.lrr'"]),
    "wrong-type": (["adapter.r=abc"], ["'adapter.r'", "abc", "int"]),
    "wrong-type-top": (["seed=abc"], ["'seed'", "abc"]),
    "r-zero": (["adapter.r=0"], ["'adapter.r'", ": 0.", "[1, inf]"]),
    "dropout-too-big": (["adapter.dropout=2"], ["'adapter.dropout'", "2.0", "[0.0, 1.0]"]),
    "alpha-zero": (["adapter.alpha=0"], ["'adapter.alpha'"]),
    "bad-choice": (["hardware.mixed_precision=fp8"], ["'hardware.mixed_precision'", "'fp8'", "no, bf16, fp16"]),
    "bad-dtype": (["model.dtype=fp8"], ["'model.dtype'", "'fp8'", "float32"]),
    "unknown-glue-task": (["data=glue", "data.task=foo"], ["data.task", "'foo'", "sst2", "mnli"]),
    "negative-lr": (["optim.lr=-1"], ["'optimizer.lr'", "-1.0"]),
    "markup-in-value": (["hardware.mixed_precision=[bold]x"], ["[bold]x"]),
}


@pytest.mark.parametrize("overrides,needles", ERROR_CASES.values(), ids=ERROR_CASES.keys())
def test_bad_overrides_end_in_one_paragraph(run_cli, overrides: list[str], needles: list[str]) -> None:
    assert_one_paragraph(run_cli("train", *overrides), *needles)


def test_missing_recipe_file_ends_in_one_paragraph(run_cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli("train", "--recipe", "no_such_recipe.yaml", "adapter.r=4")
    assert_one_paragraph(result, "'no_such_recipe.yaml'", "does not exist")


def test_recipe_with_bad_value_ends_in_one_paragraph(run_cli, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("# @package _global_\nadapter:\n  r: -3\n")
    assert_one_paragraph(run_cli("train", "--recipe", str(path)), "'adapter.r'", "-3")


def test_errors_are_config_errors_in_python() -> None:
    with pytest.raises(ConfigError, match=r"'adapter\.r'"):
        train_cfg("adapter.r=0")
    with pytest.raises(ConfigError, match="lorra"):
        compose("train", ["adapter=lorra"])
