"""Load a base model and its tokenizer; default adapter targets per architecture.

Heads (the model's output kind): ``classification`` and ``regression``
(``AutoModelForSequenceClassification``, encoders and decoders alike), ``multiple_choice``
(``AutoModelForMultipleChoice``, encoders; inputs batch × choices × seq), ``causal_lm``
(``AutoModelForCausalLM``) and ``reward`` (a one-label sequence classifier: the scalar reward model
of ``lorafit.rlhf``). The data config decides the head and the number of labels; the model config
decides which weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMultipleChoice,
                          AutoModelForSequenceClassification, AutoTokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase)

from lorafit.config import ConfigError, ModelConfig

HEADS = ("classification", "regression", "causal_lm", "multiple_choice", "reward")
AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "multiple_choice": AutoModelForMultipleChoice}

# Adapter targets when the user names none: the attention and MLP projections of each family.
DEFAULT_TARGETS = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "deberta-v2": ["query_proj", "key_proj", "value_proj", "dense"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_targets(model: PreTrainedModel) -> list[str]:
    """The default target-module names for ``model``'s architecture (``all-linear`` if unknown)."""
    return DEFAULT_TARGETS.get(model.config.model_type, ["all-linear"])


def head_module_names(model: PreTrainedModel) -> list[str]:
    """Top-level modules outside the backbone (e.g. ``classifier``, ``score``, ``lm_head``)."""
    prefix = model.base_model_prefix
    return [name for name, _ in model.named_children() if name != prefix]


def _override_dropout(config: PretrainedConfig, p: float) -> None:
    """Set every dropout probability in ``config`` (hidden, attention, classifier ...) to ``p``."""
    for key, value in list(config.to_dict().items()):
        if ("dropout" in key) and isinstance(value, (float, int)) and not isinstance(value, bool):
            setattr(config, key, p)


def from_pretrained(load: Callable[..., Any], source: str, what: str, fix: str, **kwargs: Any) -> Any:
    """``load(source, **kwargs)`` (a ``from_pretrained``), with a missing, offline or damaged folder or
    hub id turned into one paragraph naming it."""
    from safetensors import SafetensorError

    try:
        return load(source, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ConfigError(f"Could not load {what} from '{source}': {reason} {fix}") from None


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    source = cfg.tokenizer or cfg.name_or_path
    tokenizer = from_pretrained(AutoTokenizer.from_pretrained, source, "a tokenizer",
                                "Set model.tokenizer (or model.name_or_path) to a folder holding tokenizer files, "
                                "or a hub id if this machine has a network.", trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def resolve_dtype(cfg: ModelConfig, config: Optional[PretrainedConfig] = None) -> torch.dtype:
    """``model.dtype`` as a torch dtype: ``auto`` is the checkpoint's own (``dtype`` / ``torch_dtype`` in
    its config: bf16 for most modern LLMs), float32 if it names none."""
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    found = getattr(config, "dtype", None) if config is not None else None
    if found is None and config is not None:
        found = config.to_dict().get("torch_dtype")   # transformers 4.x configs
    if isinstance(found, str):
        found = DTYPES.get(found.removeprefix("torch."))
    return found if isinstance(found, torch.dtype) and found in DTYPES.values() else torch.float32


def quantization_config(cfg: ModelConfig, dtype: torch.dtype, heads: Iterable[str] = ()) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``): the QLoRA
    recipe — nf4/fp4 with double quantisation, dequantised to ``model.compute_dtype`` — or int8. The
    ``heads`` (a classifier, a reward or LM head) stay unquantised: they may be trained."""
    if cfg.quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"model.quantization={cfg.quantization} needs the bitsandbytes package: "
                          f"pip install 'bitsandbytes>=0.46' (or model.quantization=none).")
    compute = dtype if cfg.compute_dtype == "auto" else DTYPES[cfg.compute_dtype]
    skip = list(heads) or None
    if cfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quantization, llm_int8_skip_modules=skip,
                              bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)


def load_model(cfg: ModelConfig, head: str, num_labels: int = 2, seed: int = 0,
               tokenizer: PreTrainedTokenizerBase | None = None, device: Any = None) -> PreTrainedModel:
    """Build the base model with ``head``; new heads are initialised from ``seed``.

    A model with ``cfg.build`` set is built from that config dict with random weights (tests,
    ``model=tiny_llama``); otherwise weights come from ``cfg.name_or_path``, in ``model.dtype`` and,
    with ``model.quantization``, quantised by bitsandbytes as they load (onto ``device``).
    """
    if head not in HEADS:
        raise ConfigError(f"Unknown head {head!r}; allowed: {', '.join(HEADS)}.")
    auto_cls = AUTO_CLASSES.get(head, AutoModelForSequenceClassification)
    # reward (lorafit.rlhf): a sequence classifier with one label, the scalar reward.
    extra = {} if head in AUTO_CLASSES else {"num_labels": 1 if head in ("regression", "reward") else num_labels}
    if head == "regression":
        extra["problem_type"] = "regression"
    torch.manual_seed(seed)  # new heads (and built models) get reproducible weights
    if cfg.build is not None:
        if cfg.quantization != "none":
            raise ConfigError("A model built from model.build is not loaded from files, so it cannot be quantised "
                              "as it loads; `lorafit train` writes it to RUN/base and loads it from there.")
        build = dict(cfg.build)
        model_type = build.pop("model_type", None)
        if model_type is None:
            raise ConfigError("model.build needs a 'model_type' key (e.g. llama) next to the sizes.")
        if tokenizer is not None:
            build.setdefault("vocab_size", len(tokenizer))
            build.setdefault("pad_token_id", tokenizer.pad_token_id)
        config = AutoConfig.for_model(model_type, **build, **extra)
        if cfg.dropout is not None:
            _override_dropout(config, cfg.dropout)
        model = auto_cls.from_config(config, dtype=resolve_dtype(cfg))
    else:
        fix = ("Give a local Hugging Face folder (config.json and weights) or a hub id on a machine with a "
               "network in model.name_or_path.")
        config = from_pretrained(AutoConfig.from_pretrained, cfg.name_or_path, "a model config", fix,
                                 trust_remote_code=cfg.trust_remote_code, **extra)
        if cfg.dropout is not None:
            _override_dropout(config, cfg.dropout)
        dtype = resolve_dtype(cfg, config)
        heads = []
        if cfg.quantization != "none":       # the head's module names, from a weightless (meta) instance
            with torch.device("meta"):
                heads = head_module_names(auto_cls.from_config(config))
            torch.manual_seed(seed)          # the new head starts as it would unquantised
        quantized = quantization_config(cfg, dtype, heads)
        extra_load = {}
        if quantized is not None:
            target = torch.device(device) if device is not None else torch.device("cpu")
            extra_load = {"quantization_config": quantized, "device_map": {"": target}}
        model = from_pretrained(auto_cls.from_pretrained, cfg.name_or_path, "the model weights", fix,
                                config=config, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **extra_load)
        if quantized is not None:
            release_checkpoint_files(model)
        for module in model.modules():
            # bitsandbytes repacks a 4-bit weight for AVX512-BF16 CPUs on the first eval-mode forward, rounding
            # its scales to bf16: eval would compute with other weights than training (and dequantising the
            # repacked weight, as adapters and inits do, would misread it). One format, always.
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def fingerprint(model: nn.Module, names: Iterable[str] | None = None) -> str:
    """A fingerprint of the base weights that changes if any single weight changes.

    Per tensor: its name, its shape and an exact integer checksum of its fp32 bit patterns (the
    float32 values viewed as int32, summed in int64). Integer sums are exact and independent of
    reduction order, so the fingerprint is deterministic across thread counts and devices, yet any
    changed bit changes it. Adapter and head tensors are excluded by passing ``names`` (the base
    parameters to hash).
    """
    params = dict(model.named_parameters())
    digest = hashlib.sha256()
    for name in sorted(names if names is not None else params):
        bits = params[name].detach().float().contiguous().view(torch.int32)
        checksum = int(bits.to(torch.int64).sum())
        digest.update(f"{name}{tuple(bits.shape)}{checksum}".encode())
    return digest.hexdigest()[:16]


CHUNK_BYTES = 64 << 20
"""Fingerprinting reads a tensor from its file in row chunks of about this size."""


def weight_files(source: str) -> list[Path]:
    """The safetensors files of a local model folder or of a hub checkpoint already in the cache (none for
    ``source=""``: a model built from a config)."""
    if not source:
        return []
    folder = Path(source)
    if folder.is_dir():
        return sorted(folder.glob("*.safetensors"))
    from transformers.utils import cached_file

    for name in ("model.safetensors.index.json", "model.safetensors"):
        try:
            found = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
        except OSError:
            found = None
        if found is None:
            continue
        if name.endswith(".json"):
            shards = sorted(set(json.loads(Path(found).read_text())["weight_map"].values()))
            return [Path(found).parent / shard for shard in shards]
        return [Path(found)]
    return []


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_index(files: Iterable[Path]) -> dict[str, tuple[Path, dict, int]]:
    """key → (file, the header entry: dtype, shape, data_offsets; where the data starts), for every tensor."""
    index = {}
    for file in files:
        with open(file, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            header = json.loads(handle.read(size))
        index.update({key: (file, entry, 8 + size) for key, entry in header.items() if key != "__metadata__"})
    return index


def _checksum_from_file(file: Path, entry: dict, data_start: int, dtype: torch.dtype) -> tuple[tuple[int, ...], int]:
    """(shape, Σ int32 bit patterns) of one tensor read from its safetensors file in row chunks — cast to
    ``dtype`` then fp32, exactly as loading it in ``dtype`` and calling ``.float()`` would. Plain reads,
    no memory map: only one chunk is ever in the process's memory."""
    shape = tuple(entry["shape"])
    stored = SAFETENSORS_DTYPES[entry["dtype"]]
    begin, end = entry["data_offsets"]
    row = (int(torch.tensor(shape[1:]).prod()) if len(shape) > 1 else 1) * stored.itemsize
    rows = max(1, CHUNK_BYTES // max(row, 1))
    total = 0
    with open(file, "rb") as handle:
        handle.seek(data_start + begin)
        remaining = end - begin
        while remaining > 0:
            raw = handle.read(min(rows * row, remaining))
            remaining -= len(raw)
            chunk = torch.frombuffer(bytearray(raw), dtype=stored).to(dtype).float()
            total += int(chunk.view(torch.int32).to(torch.int64).sum())
    return shape, total


def base_fingerprint(model: nn.Module, names: Iterable[str], source: str, dtype: torch.dtype) -> str:
    """:func:`fingerprint` of the *unquantised* base weights: each named tensor is read from the
    checkpoint's safetensors files in chunks, as loaded in ``dtype`` (so the value equals
    ``fingerprint(model, names)`` of the model loaded unquantised in ``dtype``); a tensor the files
    lack (a newly initialised pooler) comes from ``model`` itself.

    Raises:
        ConfigError: a quantised tensor that is in no safetensors file (its full-precision values are lost).
    """
    from lorafit.quant import is_quantized

    keys = safetensors_index(weight_files(source))
    params = dict(model.named_parameters())
    owners = {f"{n}.weight": m for n, m in model.named_modules() if is_quantized(m)}
    prefix = getattr(model, "base_model_prefix", "")
    digest = hashlib.sha256()
    for name in sorted(names):
        candidates = (name, name.removeprefix(prefix + "."), f"{prefix}.{name}")
        key = next((k for k in candidates if k in keys), None)
        if key is not None:
            shape, total = _checksum_from_file(*keys[key], dtype)
        elif name in owners:
            raise ConfigError(f"The weight {name} is quantised and the base '{source}' has no safetensors file holding "
                              f"it, so its full-precision fingerprint cannot be taken. Convert the base to "
                              f"safetensors (save_pretrained) or use model.quantization=none.")
        else:
            bits = params[name].detach().float().contiguous().view(torch.int32)
            shape, total = tuple(bits.shape), int(bits.to(torch.int64).sum())
        digest.update(f"{name}{shape}{total}".encode())
    return digest.hexdigest()[:16]


@torch.no_grad()
def release_checkpoint_files(model: PreTrainedModel) -> None:
    """Copy the unquantised tensors (embeddings, norms, heads) out of the checkpoint's memory map.

    transformers loads them as views of the mmapped safetensors files; while one view lives, every
    page read while quantising the rest stays mapped and counts as resident — 4.2 GB for an nf4
    1.1B model loaded from fp32 files whose own weights take 1 GB. The copies let the mapping go.
    """
    from lorafit.quant import is_quantized

    quantised = {id(m.weight) for m in model.modules() if is_quantized(m)}
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in quantised:
            tensor.data = tensor.data.clone()


def enable_gradient_checkpointing(model: PreTrainedModel) -> None:
    """transformers' own activation checkpointing per block, non-reentrant (frozen inputs and custom
    autograd functions such as DoRA's work, and the RNG of dropout is replayed exactly)."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ConfigError(f"hardware.gradient_checkpointing=true: {type(model).__name__} does not support "
                          f"gradient checkpointing in transformers. Set hardware.gradient_checkpointing=false.")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False     # a KV cache is useless in training and clashes with recomputation


def save_base(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write a (built, randomly initialised) base model so merge and eval can find it later."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
