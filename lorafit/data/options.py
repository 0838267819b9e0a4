"""The ``data`` config group's options: what to read and how to encode and score it.

Every option is a dataclass derived from :class:`DataCommon` with the same small surface, which the
trainer, the tasks and ``lorafit eval`` use without knowing the dataset:

- ``head`` (``classification`` | ``regression`` | ``causal_lm`` | ``multiple_choice`` | ``reward``:
  the model's output head, see :mod:`lorafit.models`) and ``num_labels``;
- ``eval_splits`` and ``split_name(split)`` (the result key of a split);
- ``rows(split)``: raw examples as dicts (``split`` is ``train`` or one of ``eval_splits``);
- ``encode(row, tokenizer)``: one example's token ids and label(s);
- ``metrics(predictions, labels)``: the official metrics of the data;
- ``resolve(model_cfg)``: settle what depends on the model before anything loads (a no-op but for
  ``data=commonsense``, whose head follows the architecture).

Options elsewhere: ``data=chat`` and ``data=instruct`` (:mod:`lorafit.data.chat`), ``data=commonsense``
(:mod:`lorafit.data.commonsense`), ``data=preference`` (:mod:`lorafit.rlhf.reward`). Tokenising and
batching: :mod:`lorafit.data.batches`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError, ModelConfig, check_range
from lorafit.data import glue
from lorafit.data.batches import IGNORE_INDEX
from lorafit.metrics import accuracy

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

    def resolve(self, model: ModelConfig) -> None:
        """Settle what depends on the model (nothing, for most options)."""

    def configure(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """Prepare the tokenizer (a chat template, special tokens); the tokens added to its vocabulary."""
        return []

    def limited(self, rows: list[dict], split: str) -> list[dict]:
        limit = self.max_train_examples if split == "train" else self.max_eval_examples
        return rows if limit is None else rows[:limit]


def encode_pair(tokenizer: PreTrainedTokenizerBase, text_a: str, text_b: Optional[str], label: Any,
                max_length: int) -> dict:
    """One text (or pair) cut to ``max_length`` tokens (longest first), with ``truncated`` (0/1):
    :func:`lorafit.data.batches.tokenize` counts and reports the cut ones, then drops the key. A pair
    is encoded twice only when it is longer than ``max_length``."""
    enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length + 1)
    truncated = len(enc["input_ids"]) > max_length
    if truncated:
        enc = tokenizer(text_a, text_b, truncation=True, max_length=max_length)
    return {**{k: list(v) for k, v in enc.items()}, "labels": label, "truncated": int(truncated)}


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
    def head(self) -> str:
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
        return glue.glue_metrics(self.task, predictions, labels)


@dataclass
class SentimentDemoData(DataCommon):
    """``data=sentiment_demo``: the small labelled sentiment set shipped with lorafit.

    Written by ``scripts/make_sentiment_demo.py`` into ``lorafit/data/sentiment_demo/``.
    """

    path: str = ""

    head = "classification"
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
