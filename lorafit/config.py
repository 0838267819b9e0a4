"""The configuration schema and the friendly errors around it.

Hydra composes ``configs/train.yaml`` from seven groups (model, adapter, init, optimizer, data,
hardware, task). Every option file of a group names its schema with ``_target_``: a dataclass that lives
next to the code it configures (``adapter/lora.yaml`` -> ``lorafit.adapters.lora.LoRAConfig``).
:func:`validate` merges each group node into its dataclass, so an unknown key or a wrongly typed
value is caught before anything runs, and ``__post_init__`` checks value ranges. The dataclasses
are then the objects the rest of the code works with (``cfg.adapter.r``).

Where does X live? ``grep _target_ configs/`` answers it.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The option files of every group (``configs/<group>/<option>.yaml``) and ``train.yaml`` / ``eval.yaml``."""
GROUPS = ("model", "adapter", "init", "optimizer", "data", "hardware", "task")
GROUP_ALIASES = {"optim": "optimizer"}
KEY_ALIASES = {"reward": "task.reward"}
"""Top-level keys of earlier versions and where they live now (``reward.run=`` is ``task.reward.run=``)."""
RENAMED_TARGETS = {"lorafit.data.tasks.InstructData": "lorafit.data.chat.InstructData",
                   "lorafit.data.options.InstructData": "lorafit.data.chat.InstructData",
                   "lorafit.data.tasks.": "lorafit.data.options.",
                   "lorafit.config.SupervisedTask": "lorafit.task.SupervisedTask"}
"""Schema paths of earlier versions (in the ``config.yaml`` of older runs) and their present home."""


class ConfigError(ValueError):
    """An expected failure caused by what the user gave (a config value, a file, a folder, the
    environment): one paragraph naming the bad value and the fix. ``lorafit`` exits with code 2."""


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    """Raise :class:`ConfigError` unless ``value`` is one of ``allowed``."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(
            f"Bad value for '{key}': {value!r}. Allowed values: {', '.join(map(str, allowed))}. "
            f"Fix it on the command line, e.g. {key}={allowed[0]}."
        )


def check_finite(key: str, value: Any) -> None:
    """Raise :class:`ConfigError` if ``value`` is a float NaN or infinity (NaN passes every comparison)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"Bad value for '{key}': {value!r}. It must be a finite number; fix it on the command "
                          f"line or in the recipe (e.g. {key}=0.001).")


def _check_all_finite(values: Any, key: str) -> None:
    """:func:`check_finite` on every float of a (nested) config container."""
    if isinstance(values, dict):
        for name, value in values.items():
            _check_all_finite(value, f"{key}.{name}" if key else str(name))
    elif isinstance(values, (list, tuple)):
        for i, value in enumerate(values):
            _check_all_finite(value, f"{key}[{i}]")
    else:
        check_finite(key, values)


def check_range(key: str, value: float, low: float | None = None, high: float | None = None,
                low_inclusive: bool = True, high_inclusive: bool = True) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high`` (strict where not inclusive)."""
    check_finite(key, value)
    too_low = low is not None and (value < low if low_inclusive else value <= low)
    too_high = high is not None and (value > high if high_inclusive else value >= high)
    if too_low or too_high:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        left, right = "[" if low_inclusive else "(", "]" if high_inclusive else ")"
        raise ConfigError(f"Bad value for '{key}': {value!r}. It must lie in {left}{lo}, {hi}{right}.")


@dataclass
class ModelConfig:
    """The base model.

    Attributes:
        name_or_path: a local Hugging Face folder or a hub id; for a model built from ``build``
            this is only a label.
        build: if set, a randomly initialised model is built from this ``transformers`` config
            dict (``model_type`` plus sizes) instead of loading weights (``model=tiny_llama``).
        tokenizer: tokenizer folder or id; defaults to ``name_or_path``.
        dropout: if set, overrides every dropout probability of the model's own config
            (``model.dropout=0.0`` makes training deterministic across process counts).
        dtype: how the unquantised base weights are stored (embeddings, norms, heads, and every
            linear layer when ``quantization=none``): ``auto`` (the default) is the checkpoint's own
            dtype (its config's ``dtype``: bf16 for most modern LLMs, float32 for MiniLM and for
            models built from ``build``), or float32 / bfloat16 / float16.
        quantization: how the frozen base linear layers are stored: ``none``, ``nf4`` or ``fp4``
            (4-bit, double-quantised, QLoRA) or ``int8``, through bitsandbytes as the weights load.
        compute_dtype: what a quantised layer dequantises to for its product: ``auto`` (= the
            resolved ``dtype``), float32, bfloat16 or float16. Adapters keep their own dtype
            (``adapter.dtype``, float32 by default) and cast where they meet the base; autocast
            around the whole forward is ``hardware.mixed_precision``.
    """

    name_or_path: str = ""
    build: Optional[dict[str, Any]] = None
    tokenizer: Optional[str] = None
    dropout: Optional[float] = None
    dtype: str = "auto"
    quantization: str = "none"
    compute_dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not self.name_or_path:
            raise ConfigError("model.name_or_path is empty. Choose a model group option "
                              "(model=minilm, model=tiny_llama) or set model.name_or_path=FOLDER_OR_HUB_ID.")
        check_choice("model.dtype", self.dtype, ["auto", "float32", "bfloat16", "float16"])
        check_choice("model.quantization", self.quantization, ["none", "nf4", "fp4", "int8"])
        check_choice("model.compute_dtype", self.compute_dtype, ["auto", "float32", "bfloat16", "float16"])
        if self.dropout is not None:
            check_range("model.dropout", self.dropout, 0.0, 1.0)


@dataclass
class HardwareConfig:
    """Where and how the loop runs (mapped onto ``accelerate.Accelerator``).

    Attributes:
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``gpu``.
        mixed_precision: ``no``, ``bf16`` or ``fp16`` autocast around forward passes.
        grad_accum_steps: micro-batches per optimizer step on each process; the global
            ``data.batch_size`` is split across processes and these steps.
        gradient_checkpointing: keep only each transformer block's input during the forward pass and
            recompute the block in the backward pass (transformers' own checkpointing, non-reentrant):
            activation memory of one block instead of all, for about one more forward pass.
        sharding: ``none`` (every process holds the whole model: DDP when there are several) or ``fsdp``
            (FSDP2: every weight sharded across the processes, gathered a layer at a time;
            :mod:`lorafit.train.sharding`). Default: none.
        num_processes: processes on this machine that ``lorafit train`` starts itself (with
            ``torch.distributed.run``: gloo on CPU, nccl on GPUs), as LLaMA-Factory starts torchrun.
            Leave it at 1 under ``torchrun`` or ``accelerate launch``, which start the processes. Default: 1.
    """

    device: str = "auto"
    mixed_precision: str = "no"
    grad_accum_steps: int = 1
    gradient_checkpointing: bool = False
    sharding: str = "none"
    num_processes: int = 1

    def __post_init__(self) -> None:
        check_choice("hardware.device", self.device, ["auto", "cpu", "gpu"])
        check_choice("hardware.mixed_precision", self.mixed_precision, ["no", "bf16", "fp16"])
        check_range("hardware.grad_accum_steps", self.grad_accum_steps, 1)
        check_range("hardware.num_processes", self.num_processes, 1)
        check_choice("hardware.sharding", self.sharding, ["none", "fsdp"])

    def accelerator(self, log_with: Sequence[str] = (), logging_dir: Optional[str] = None) -> Any:
        """The ``accelerate.Accelerator`` of this process for these settings (with experiment trackers
        ``log_with`` writing under ``logging_dir``)."""
        import torch
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration

        if self.device == "gpu" and not torch.cuda.is_available():
            raise ConfigError("hardware=gpu but no CUDA device is visible. Use hardware=cpu (or hardware=auto).")
        project = ProjectConfiguration(project_dir=logging_dir, logging_dir=logging_dir) if logging_dir else None
        return Accelerator(cpu=self.device == "cpu", mixed_precision=self.mixed_precision,
                           log_with=list(log_with) or None, project_config=project)


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
"""``logging.backends`` → the package each needs (accelerate's trackers drive them)."""


@dataclass
class LoggingConfig:
    """``logging.*``: experiment tracking besides ``RUN/metrics.jsonl`` (always written).

    Attributes:
        backends: any of ``tensorboard`` (``RUN/tb/``), ``wandb`` (its own settings: ``WANDB_MODE``,
            ``WANDB_PROJECT``...), ``mlflow`` (``MLFLOW_TRACKING_URI``, else ``sqlite:///RUN/mlflow.db``),
            through accelerate's trackers. ``pip install 'lorafit[wandb]'`` / ``'lorafit[mlflow]'``.
        project: the experiment / project name the trackers file the run under.
        run_name: the run's name there (default: the output folder's name).
    """

    backends: list[str] = field(default_factory=list)
    project: str = "lorafit"
    run_name: Optional[str] = None

    def __post_init__(self) -> None:
        for name in self.backends:
            check_choice("logging.backends", name, list(TRACKERS))


@dataclass
class TrainConfig:
    """Top-level keys of ``configs/train.yaml`` (the groups are validated by their own schema).

    Attributes:
        task: what is optimised: ``supervised`` (the data's own loss), ``reward`` (a pairwise
            reward model) or ``rl`` (a policy against a reward, ``task.reward.run`` /
            ``task.reward.function``; ``lorafit.rlhf``).
        output_dir: where the run writes everything (config, metrics, checkpoints, adapter).
        seed: seeds weights of new heads, adapter init, dropout and data order.
        max_steps: optimizer steps; if ``None``, ``num_epochs`` passes over the data.
        eval_every / save_every / log_every: in optimizer steps (0 = only at the end).
        keep_checkpoints: how many step checkpoints to keep on disk.
        resume: continue from the latest checkpoint in ``output_dir`` (refused if the config differs
            from the checkpoint's in anything that changes the maths).
        overwrite: start afresh in an ``output_dir`` that holds an earlier lorafit run (only lorafit's
            own files there are removed); without it such a folder is refused.
        max_grad_norm: gradient clipping (0 = off).
        logging: experiment trackers (:class:`LoggingConfig`: ``logging.backends=[tensorboard,mlflow]``).
        tensorboard: ``true`` is ``logging.backends=[tensorboard]`` (the key of earlier versions).
    """

    model: Any = None
    adapter: Any = None
    init: Any = None
    optimizer: Any = None
    data: Any = None
    hardware: Any = None
    task: Any = None
    output_dir: str = "runs/default"
    seed: int = 0
    max_steps: Optional[int] = None
    num_epochs: float = 1.0
    eval_every: int = 0
    eval_at_start: bool = False
    save_every: int = 0
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = False
    overwrite: bool = False
    max_grad_norm: float = 1.0
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    tensorboard: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.max_steps is not None:
            check_range("max_steps", self.max_steps, 1)
        check_range("num_epochs", self.num_epochs, 0, low_inclusive=False)
        for key in ("eval_every", "save_every", "log_every"):
            check_range(key, getattr(self, key), 0)
        check_range("keep_checkpoints", self.keep_checkpoints, 1)
        check_range("max_grad_norm", self.max_grad_norm, 0)

    def trackers(self) -> list[str]:
        """The experiment trackers to start (``tensorboard=true`` counts as ``logging.backends``' tensorboard),
        each checked to be installed."""
        names = list(dict.fromkeys(self.logging.backends + (["tensorboard"] if self.tensorboard else [])))
        for name in names:
            if importlib.util.find_spec(TRACKERS[name]) is None:
                raise ConfigError(f"logging.backends includes {name}, but the package '{TRACKERS[name]}' is not "
                                  f"installed. Install it (pip install 'lorafit[{name}]') or drop {name}.")
        return names


@dataclass
class EvalConfig:
    """Keys of ``configs/eval.yaml`` (``lorafit eval MODEL_OR_RUN ...``).

    Attributes:
        suite: ``glue`` (the data group's GLUE task(s), or another classification set) or
            ``commonsense`` (the LLM-Adapters suite; ``data=commonsense`` is then the default).
        tasks: GLUE task names or commonsense task folder names; default: ``data.task`` (GLUE) or
            ``data.tasks`` / every task folder under ``data.path`` (commonsense).
        protocol: commonsense only: ``loglik`` (causal LMs), ``generate`` (causal LMs),
            ``mc_head`` (encoders with a multiple-choice head), or ``auto`` (from the model).
        prompt: commonsense causal-LM protocols: ``chat`` renders each question as a user turn with the
            model's chat template (a chat- or instruct-trained run's, a merged folder's, an instruct
            model's own); ``plain`` uses the task's prompt (loglik) or the alpaca prompt (generate);
            ``auto``: ``chat`` if the tokenizer has a chat template, else ``plain``.
        limit: score only the first N examples of each file / split.
        max_new_tokens: ``protocol=generate``: greedy tokens generated per example.
        batch_size: examples per forward pass.
        output_dir: where ``results.json`` / ``results.md`` (and predictions) are written; unset:
            the results are printed only (lorafit never writes into a model folder).
        overwrite: replace an earlier ``lorafit eval`` output in ``output_dir``.
    """

    data: Any = None
    hardware: Any = None
    suite: str = "glue"
    tasks: Optional[list[str]] = None
    protocol: str = "auto"
    prompt: str = "auto"
    output_dir: Optional[str] = None
    batch_size: int = 64
    limit: Optional[int] = None
    max_new_tokens: int = 32
    save_predictions: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_choice("suite", self.suite, ["glue", "commonsense"])
        check_choice("protocol", self.protocol, ["auto", "loglik", "generate", "mc_head"])
        check_choice("prompt", self.prompt, ["auto", "chat", "plain"])
        if self.suite == "glue" and self.protocol != "auto":
            raise ConfigError(f"protocol={self.protocol} applies to suite=commonsense only; GLUE is scored with the "
                              f"model's classification head. Drop protocol= or add suite=commonsense.")
        check_range("batch_size", self.batch_size, 1)
        check_range("max_new_tokens", self.max_new_tokens, 1)
        if self.limit is not None:
            check_range("limit", self.limit, 1)
        if self.tasks is not None and not self.tasks:
            raise ConfigError("tasks=[] names no task. Name some, e.g. \"tasks=[rte,mrpc]\", or drop the key.")


def schema_of(node: DictConfig, key: str) -> type:
    """Import the dataclass named by ``node._target_``."""
    target = node.get("_target_")
    for old, new in RENAMED_TARGETS.items():
        if target and str(target).startswith(old):
            target = new + str(target)[len(old):]
    if not target:
        raise ConfigError(f"The '{key}' config has no _target_ naming its schema; every option file in "
                          f"configs/{key}/ must start with `_target_: lorafit.<module>.<ConfigClass>`.")
    module_name, _, cls_name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"The '{key}' config names _target_={target!r}, which cannot be imported ({exc}).") from exc


def option_names(group: str) -> list[str]:
    """The options of a config group (its YAML files' names)."""
    return sorted(f.stem for f in (CONFIG_DIR / group).glob("*.yaml"))


def option_schema(group: str, option: str) -> type:
    """The schema an option file names with ``_target_`` (through its first default if it names none)."""
    node = OmegaConf.load(CONFIG_DIR / group / f"{option}.yaml")
    if "_target_" not in node and node.get("defaults"):
        return option_schema(group, str(node.defaults[0]))
    return schema_of(node, group)


def _field_names(schema: type) -> list[str]:
    return [f.name for f in dataclasses.fields(schema)]


def _untagged(data: Any) -> Any:
    """``data`` without the ``_target_`` tags :func:`as_dict` writes (a nested dataclass's schema is its
    field's type)."""
    if isinstance(data, dict):
        return {k: _untagged(v) for k, v in data.items() if k != "_target_"}
    return data


def to_object(node: DictConfig | dict, schema: type, key: str) -> Any:
    """Merge ``node`` into ``schema`` and build the dataclass, turning OmegaConf errors into ConfigError."""
    if not isinstance(node, DictConfig):
        node = OmegaConf.create(node)
    values = _untagged(OmegaConf.to_container(node, resolve=True))
    label = f" ({schema.__name__})"
    for name in values:
        if name not in _field_names(schema):
            full = f"{key}.{name}" if key else name
            raise ConfigError(
                f"Unknown key '{full}'{label}. Allowed keys: {', '.join(_field_names(schema))}. "
                f"Check the spelling of the override or YAML key."
            )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), values)
        _check_all_finite(OmegaConf.to_container(merged, resolve=True), key)
        return OmegaConf.to_object(merged)
    except ConfigError:
        raise
    except ValidationError as exc:
        bad_key = (f"{key}.{exc.key}" if key else str(exc.key)) if exc.key is not None else key
        ftype = {f.name: f.type for f in dataclasses.fields(schema)}.get(str(exc.key), "?")
        raise ConfigError(f"Bad value for '{bad_key}': {exc.msg.splitlines()[0]} (expected type: {ftype}).") from None
    except ConfigKeyError as exc:  # pragma: no cover - caught above, kept for nested structures
        raise ConfigError(f"Unknown key in '{key}'{label}: {exc.msg}. Allowed keys: "
                          f"{', '.join(_field_names(schema))}.") from None
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:
            raise cause from None
        raise ConfigError(f"Invalid '{key}' config: {exc}") from None


def validate(cfg: DictConfig, top_schema: type = TrainConfig, groups: Iterable[str] = GROUPS) -> Any:
    """Validate a composed config: each group by the dataclass its ``_target_`` names, then the rest."""
    objects = {}
    if top_schema is TrainConfig and "reward" in cfg and cfg.get("task") is not None:
        # an earlier version's run config: the reward source was a top-level node
        cfg = OmegaConf.create(OmegaConf.to_container(cfg))
        reward = cfg.pop("reward")
        if reward is not None:
            reward.pop("_target_", None)
            cfg.task.reward = reward
    for group in groups:
        if group in cfg and cfg[group] is not None:
            objects[group] = to_object(cfg[group], schema_of(cfg[group], group), group)
    rest = {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if k not in objects}
    top = to_object(rest, top_schema, "")
    for group, obj in objects.items():
        setattr(top, group, obj)
    return top


def as_dict(obj: Any) -> Any:
    """A validated config as plain data, each dataclass tagged with ``_target_`` (its schema)."""
    if dataclasses.is_dataclass(obj):
        data = {"_target_": f"{type(obj).__module__}.{type(obj).__qualname__}"}
        data.update({f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return data
    if isinstance(obj, (list, tuple)):
        return [as_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    return obj


def flat_config(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config data as ``{"a.b.c": value}``."""
    if isinstance(data, dict):
        out = {}
        for key, value in data.items():
            out.update(flat_config(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: data}


def to_yaml(cfg: Any) -> str:
    """The resolved run config as YAML; it validates again with :func:`validate`."""
    data = as_dict(cfg)
    data.pop("_target_", None)
    return OmegaConf.to_yaml(OmegaConf.create(data))


def load_run_config(run_dir: str | os.PathLike) -> TrainConfig:
    """Read back ``RUN/config.yaml`` written by ``lorafit train``."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: '{run_dir}' is not a lorafit run folder "
                          f"(expected config.yaml and adapter/ written by `lorafit train`).")
    return validate(OmegaConf.load(path))


def package_dir(spec: str) -> str:
    """OmegaConf resolver ``${package_dir:pkg/sub/dir}``: a folder inside an installed package."""
    package, _, sub = spec.partition("/")
    try:
        module = importlib.import_module(package)
    except ImportError as exc:
        raise ConfigError(f"The package '{package}' is not installed, so ${{package_dir:{spec}}} cannot be "
                          f"resolved. Install it (pip install {package.replace('_', '-')}) or set "
                          f"model.name_or_path to a local folder.") from exc
    return str(Path(module.__file__).parent / sub)


if not OmegaConf.has_resolver("package_dir"):
    OmegaConf.register_new_resolver("package_dir", package_dir)
