"""The ``data`` config group: what to read, how to tokenise it, how to score it.

Every option is a dataclass with the same small surface, which the trainer and ``lorafit eval``
use without knowing the dataset:

- ``task_type`` (``classification`` | ``regression`` | ``causal_lm`` | ``multiple_choice``) and ``num_labels``;
- ``rows(split)``: raw examples as dicts (``split`` is ``train`` or one of ``eval_splits``);
- ``encode(row, tokenizer)``: one example's token ids and label(s);
- ``metrics(predictions, labels)``: the official metrics of the task.

Tokenisation happens once per run through :func:`tokenize` (a ``datasets`` map, cached under the
run folder), and :func:`collate` pads each micro-batch to its own longest sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError, check_range
from lorafit.data import glue
from lorafit.metrics import accuracy, glue_metrics

IGNORE_INDEX = -100

ALPACA_PROMPT = ("Below is an instruction that describes a task{context}. Write a response that "
                 "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}"
                 "### Response:\n")


@dataclass
class DataCommon:
    """Keys every data option has.

    Attributes:
        batch_size: the global batch per optimizer step, split across processes and
            ``hardware.grad_accum_steps``.
        eval_batch_size: batch size for evaluation passes.
        max_length: sequences are truncated to this many tokens.
        max_train_examples / max_eval_examples: take only the first N examples (quick runs).
    """

    batch_size: int = 32
    eval_batch_size: int = 64
    max_length: int = 128
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None

    def __post_init__(self) -> None:
        check_range("data.batch_size", self.batch_size, 1)
        check_range("data.eval_batch_size", self.eval_batch_size, 1)
        check_range("data.max_length", self.max_length, 2)

    def limited(self, rows: list[dict], split: str) -> list[dict]:
        limit = self.max_train_examples if split == "train" else self.max_eval_examples
        return rows if limit is None else rows[:limit]


def encode_pair(tokenizer: PreTrainedTokenizerBase, text_a: str, text_b: Optional[str], label: Any,
                max_length: int) -> dict:
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    return {**{k: list(v) for k, v in enc.items()}, "labels": label}


@dataclass
class GlueData(DataCommon):
    """``data=glue``: a GLUE task from the download-script layout, or from the hub.

    Attributes:
        task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte or wnli.
        path: folder holding ``<TASK>/{train,dev}.tsv`` (e.g. ``../shared/data/glue``); empty means
            the ``nyu-mll/glue`` hub copy via ``datasets`` (needs a network).
    """

    task: str = "sst2"
    path: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            glue.get_task(self.task)
        except ValueError as exc:
            raise ConfigError(str(exc).replace("task", "data.task", 1)) from None

    @property
    def spec(self) -> glue.GlueTask:
        return glue.get_task(self.task)

    @property
    def task_type(self) -> str:
        return "regression" if self.spec.is_regression else "classification"

    @property
    def num_labels(self) -> int:
        return self.spec.num_labels

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return self.spec.dev_splits

    def split_name(self, split: str) -> str:
        """Result key of a split: ``sst2``; MNLI's mismatched dev set is ``mnli_mismatched``."""
        if split in ("dev", "dev_matched", self.eval_splits[0]):
            return self.task
        return f"{self.task}_{split.removeprefix('dev_')}"

    def rows(self, split: str) -> list[dict]:
        try:
            rows = glue.read_glue_split(self.task, self.path, split) if self.path else glue.load_glue_hub(self.task, split)
        except (OSError, ValueError) as exc:  # glue's own messages name the file, line and fix
            raise ConfigError(str(exc)) from None
        return self.limited(rows, split)

    def encode(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
        return encode_pair(tokenizer, row["text_a"], row.get("text_b"), row["label"], self.max_length)

    def metrics(self, predictions: list, labels: list) -> dict[str, float]:
        return glue_metrics(self.task, predictions, labels)


@dataclass
class SentimentDemoData(DataCommon):
    """``data=sentiment_demo``: the small labelled sentiment set shipped with lorafit.

    Written by ``scripts/make_sentiment_demo.py`` into ``lorafit/data/sentiment_demo/``.
    """

    path: str = ""

    task_type = "classification"
    num_labels = 2
    eval_splits = ("dev",)

    def folder(self) -> Path:
        return Path(self.path) if self.path else Path(__file__).parent / "sentiment_demo"

    def split_name(self, split: str) -> str:
        return "sentiment_demo"

    def rows(self, split: str) -> list[dict]:
        file = self.folder() / f"{split}.jsonl"
        return self.limited(read_jsonl(file, required=("text", "label")), split)

    def encode(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
        return encode_pair(tokenizer, row["text"], None, int(row["label"]), self.max_length)

    def metrics(self, predictions: list, labels: list) -> dict[str, float]:
        return {"accuracy": accuracy(predictions, labels)}


@dataclass
class InstructData(DataCommon):
    """``data=instruct``: alpaca-style SFT (``instruction``, ``input``, ``output``) for causal LMs.

    The prompt (alpaca template) is masked from the loss; only the response and EOS are learnt.

    Attributes:
        path: a JSON list or JSONL file.
        eval_fraction: the last fraction of the file held out for evaluation (loss).
    """

    path: str = ""
    eval_fraction: float = 0.05
    max_length: int = 256

    task_type = "causal_lm"
    num_labels = 0

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("eval",) if self.eval_fraction > 0 else ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError("data=instruct needs data.path=FILE (an alpaca-style JSON or JSONL file with "
                              "instruction, input and output fields).")
        check_range("data.eval_fraction", self.eval_fraction, 0.0, 0.5)

    def split_name(self, split: str) -> str:
        return "instruct"

    def rows(self, split: str) -> list[dict]:
        rows = read_jsonl(Path(self.path), required=("instruction", "output"))
        n_eval = int(round(len(rows) * self.eval_fraction))
        rows = rows[: len(rows) - n_eval] if split == "train" else rows[len(rows) - n_eval:]
        return self.limited(rows, split)

    def encode(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
        return encode_sft(tokenizer, alpaca_prompt(row), str(row["output"]), self.max_length)

    def metrics(self, predictions: list, labels: list) -> dict[str, float]:
        return {}


def alpaca_prompt(row: dict) -> str:
    extra = str(row.get("input") or "").strip()
    return ALPACA_PROMPT.format(
        context=", paired with an input that provides further context" if extra else "",
        instruction=str(row["instruction"]).strip(),
        input_block=f"### Input:\n{extra}\n\n" if extra else "")


def encode_sft(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int) -> dict:
    """[BOS] prompt response EOS, with the prompt (and BOS) masked out of ``labels``."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    eos = [eos_id] if eos_id is not None else []
    ids = (bos + prompt_ids + response_ids + eos)[:max_length]
    n_prompt = min(len(bos) + len(prompt_ids), len(ids))
    labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def read_jsonl(path: Path, required: tuple[str, ...]) -> list[dict]:
    """Read a JSON list or JSONL file; name the file, row and field of any malformed example."""
    from lorafit.files import read_rows

    if not Path(path).is_file():
        raise ConfigError(f"Data file {path} does not exist. Point data.path at an existing file or folder.")
    return read_rows(Path(path), required)


def tokenize(data: Any, split: str, tokenizer: PreTrainedTokenizerBase, cache_dir: Optional[Path]):
    """Tokenise a split once; the result is a ``datasets.Dataset`` cached under ``cache_dir``."""
    import datasets

    rows = data.rows(split)
    if not rows:
        raise ConfigError(f"The {split} split of data={type(data).__name__} is empty.")
    # Tokenise row by row in Python and hand the result to `datasets` for the on-disk cache:
    # the rows themselves may hold mixed types (labels int or float) that Arrow would coerce.
    encoded = [data.encode(row, tokenizer) for row in rows]
    ds = datasets.Dataset.from_list(encoded)
    if cache_dir is not None:
        target = Path(cache_dir) / f"{split}"
        if not target.exists():
            ds.save_to_disk(str(target))
        ds = datasets.load_from_disk(str(target))
    return ds.with_format(None)


def collate(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad a micro-batch to its longest sequence (right padding; labels padded with -100).

    Multiple-choice features (``input_ids`` a list of token lists, one per choice) go to
    :func:`collate_choices`.
    """
    if features[0]["input_ids"] and isinstance(features[0]["input_ids"][0], list):
        return collate_choices(features, pad_token_id)
    longest = max(len(f["input_ids"]) for f in features)
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        values = [f[key] for f in features]
        if isinstance(values[0], list):
            pad = {"input_ids": pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = torch.tensor([v + [pad] * (longest - len(v)) for v in values])
        else:
            batch[key] = torch.tensor(values)
    return batch


def collate_choices(features: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Multiple choice: pad to ``(batch, choices, longest)``, plus ``choice_mask`` ``(batch, choices)``.

    An example with fewer choices than the batch's most (ARC has 3 to 5) repeats its first choice
    to fill the row; ``choice_mask`` marks those copies False, and
    :func:`lorafit.evaluate.forward_logits` gives them the lowest logit.
    """
    n_choices = max(len(f["input_ids"]) for f in features)
    longest = max(len(seq) for f in features for seq in f["input_ids"])
    batch: dict[str, torch.Tensor] = {}
    for key in features[0]:
        if key == "labels":
            batch[key] = torch.tensor([f[key] for f in features])
            continue
        pad = pad_token_id if key == "input_ids" else 0
        rows = [f[key] + [f[key][0]] * (n_choices - len(f[key])) for f in features]
        batch[key] = torch.tensor([[seq + [pad] * (longest - len(seq)) for seq in row] for row in rows])
    batch["choice_mask"] = torch.tensor([[j < len(f["input_ids"]) for j in range(n_choices)] for f in features])
    return batch


def count_loss_units(batch: dict[str, torch.Tensor]) -> int:
    """How many terms a batch adds to the loss: tokens with a label (LM) or examples."""
    labels = batch["labels"]
    if labels.dim() > 1:
        return int((labels[:, 1:] != IGNORE_INDEX).sum())
    return int(labels.shape[0])
