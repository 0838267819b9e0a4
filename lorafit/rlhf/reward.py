"""Reward modelling with an adapter (PE-RLHF, arXiv 2403.10704, Sec. 3: the reward model is a
LoRA-adapted backbone with a scalar head, trained on human preference pairs).

- ``data=preference``: preference pairs whose conversation is in ``data=chat``'s forms (sharegpt
  ``conversations``, OpenAI ``messages``) or a plain ``prompt``, from the same sources (JSON, JSONL,
  Parquet, a ``save_to_disk`` folder, a hub id), rendered with the same templates. Each pair is encoded as a two-"choice" example
  (chosen first), so the existing collate pads it to ``(batch, 2, length)``.
- The reward ``r(x, y)`` is the one-label sequence-classification head of the backbone
  (``AutoModelForSequenceClassification``, ``num_labels=1``). For decoders (Llama, Mistral, Qwen)
  that head reads the hidden state of the last non-padding token, found with the config's
  ``pad_token_id``; for encoders it is the model's own ``[CLS]`` pooler. Using the library's head
  unchanged is what makes the merged folder score exactly like the adapted model.
- ``task=reward``: the pairwise loss ``-log σ(r(x, y_c) - r(x, y_r))`` (Ouyang et al. 2022, Eq. 1),
  and on the held-out split the pairwise accuracy (fraction with ``r_c > r_r``) and mean margin.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError, check_range
from lorafit.adapters.io import find_adapter_dir
from lorafit.assemble import load_adapted
from lorafit.callbacks import Callback
from lorafit.data.batches import collate
from lorafit.data.chat import TEMPLATES, configure_tokenizer, conversation, read_conversations, template_text, to_message
from lorafit.data.options import DataCommon


# ------------------------------------------------------------------------------------- data
def _response(value: Any, where: str) -> str:
    return to_message(value, where)["content"] if isinstance(value, dict) else str(value)


def read_preferences(path: str | Path, split: str = "train", subset: Optional[str] = None) -> list[dict]:
    """Read preference pairs as ``{"messages": [{role, content}...], "chosen": str, "rejected": str}``.

    The rows come from what ``data=chat`` reads (JSON, JSONL, Parquet, a ``save_to_disk`` folder, a hub
    id), and the conversation is in either of its forms — OpenAI ``messages`` or sharegpt
    ``conversations`` (with a ``system`` column) — or a plain ``prompt`` string; ``chosen`` and
    ``rejected`` are strings or single turns.
    """
    if Path(path).suffix in (".json", ".jsonl", ".parquet") and not Path(path).is_file():
        raise ConfigError(f"Preference file {path} does not exist. Point data.path at preference pairs: a "
                          f"sharegpt-style JSON (conversations, chosen, rejected), OpenAI messages, or a JSONL of "
                          f"{{prompt, chosen, rejected}}.")
    rows = read_conversations(str(path), split, subset)
    pairs = []
    for i, row in enumerate(rows):
        where = f"Preference file {path}, row {i}"
        if not isinstance(row, dict) or "chosen" not in row or "rejected" not in row:
            raise ConfigError(f"{where}: needs 'chosen' and 'rejected' plus 'conversations' (sharegpt), 'messages' or "
                              f"'prompt' (plain JSONL). Fix or drop that row.")
        if "prompt" in row and "conversations" not in row and "messages" not in row:
            messages = [{"role": "user", "content": str(row["prompt"])}]
        elif "conversations" in row or "messages" in row:
            messages = conversation(row, where)
        else:
            raise ConfigError(f"{where}: has neither 'conversations' (sharegpt), 'messages' nor 'prompt'. Add one.")
        pairs.append({"messages": messages, "chosen": _response(row["chosen"], where),
                      "rejected": _response(row["rejected"], where)})
    if not pairs:
        raise ConfigError(f"Preference file {path} holds no pairs.")
    return pairs


def format_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], response: str) -> str:
    """The text the reward model reads: the tokenizer's chat template when it has one, else
    ``User: ...`` / ``Assistant: ...`` lines."""
    full = [*messages, {"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(full, tokenize=False)
    names = {"user": "User", "assistant": "Assistant", "system": "System"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in full)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str, max_length: int) -> list[int]:
    """Token ids of a formatted conversation (special tokens added unless a chat template wrote them)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    return tokenizer(text, add_special_tokens=not templated, truncation=True, max_length=max_length)["input_ids"]


_SLOT = "\u2063RESPONSE\u2063"  # a marker that cannot occur in the data: where the response goes


def _special_wrap(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (``[CLS]`` / ``[SEP]``, BOS, ...)."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def encode_responses(tokenizer: PreTrainedTokenizerBase, messages: list[dict], responses: list[str],
                     max_length: int) -> list[list[int]]:
    """Token ids of ``format_conversation(messages, response)`` for each response, at most ``max_length``.

    Too long? The *prompt* is cut from the left (its most recent tokens are kept) and the responses
    from the right, the same prompt cut for every response, so that the responses - which are what
    the reward compares - are never truncated away: the prompt keeps at least half of the budget
    only when the responses do not need it. The text after the response (a chat template's
    end-of-turn) is kept whole. (Cutting the whole text on the right made the chosen and rejected
    encodings identical prompt prefixes for 20% of the dpo_en_demo pairs at 128 tokens.)
    """
    templated = bool(getattr(tokenizer, "chat_template", None))
    before, sep, after = format_conversation(tokenizer, messages, _SLOT).partition(_SLOT)
    if not sep:  # a template that drops the response: no way to split, cut on the right
        return [encode_text(tokenizer, format_conversation(tokenizer, messages, r), max_length) for r in responses]

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    prompt, suffix = ids(before), ids(after)
    bodies = [ids(r) for r in responses]
    head, tail = ([], []) if templated else _special_wrap(tokenizer)
    special = len(head) + len(tail)
    budget = max(max_length - special - len(suffix), 2)
    longest = max((len(b) for b in bodies), default=0)
    keep_prompt = len(prompt) if len(prompt) + longest <= budget else max(budget - longest, min(len(prompt), budget // 2))
    prompt = prompt[len(prompt) - keep_prompt:]
    out = []
    for body in bodies:
        seq = prompt + body[: budget - keep_prompt] + suffix
        out.append(head + seq + tail)
    return out


def encode_preference(row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int) -> dict:
    """A pair as a two-choice example: ``input_ids = [chosen_ids, rejected_ids]``, ``labels = 0``.

    Too long? The prompt is cut from the left, the responses from the right
    (:func:`encode_responses`), so the two encodings always differ where the responses do.
    """
    ids = encode_responses(tokenizer, row["messages"], [row["chosen"], row["rejected"]], max_length)
    return {"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": 0}


@dataclass
class PreferenceData(DataCommon):
    """``data=preference``: preference pairs for ``task=reward``.

    Attributes:
        path: preference pairs (see :func:`read_preferences`): a file, a ``save_to_disk`` folder or a hub id.
        split / subset: which split (and configuration) of a hub dataset.
        template / chat_template / add_special_tokens: as for ``data=chat``: the conversation is rendered
            with the tokenizer's own chat template, the one named or given here, or (a tokenizer with
            none and none chosen) as ``User: ...`` / ``Assistant: ...`` lines.
        eval_fraction: the last fraction of the file is held out (pairwise accuracy, margin).
    """

    path: str = ""
    split: str = "train"
    subset: Optional[str] = None
    template: Optional[str] = None
    chat_template: Optional[str] = None
    add_special_tokens: bool = True
    eval_fraction: float = 0.1
    batch_size: int = 8
    eval_batch_size: int = 16
    max_length: int = 256

    head = "reward"
    num_labels = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError("data=preference needs data.path=FILE (sharegpt-style preference JSON with "
                              "conversations/chosen/rejected, or a JSONL of {prompt, chosen, rejected}).")
        check_range("data.eval_fraction", self.eval_fraction, 0.0, 0.5)
        if self.template is not None and self.template not in TEMPLATES:
            raise ConfigError(f"data.template={self.template!r} is not a built-in template ({', '.join(TEMPLATES)}); "
                              f"give your own Jinja template with data.chat_template=FILE.")

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("eval",) if self.eval_fraction > 0 else ()

    def split_name(self, split: str) -> str:
        return "preference"

    def configure(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        """A template chosen here is set (and its missing tokens added); else the tokenizer's own is kept."""
        if not (self.template or self.chat_template):
            return []
        return configure_tokenizer(tokenizer, template_text(self.template, self.chat_template), self.add_special_tokens)

    def rows(self, split: str) -> list[dict]:
        rows = read_preferences(self.path, self.split, self.subset)
        n_eval = int(round(len(rows) * self.eval_fraction))
        rows = rows[: len(rows) - n_eval] if split == "train" else rows[len(rows) - n_eval:]
        return self.limited(rows, split)

    def encode(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
        return encode_preference(row, tokenizer, self.max_length)

    def metrics(self, predictions: list, labels: list) -> dict[str, float]:
        return {}


# ------------------------------------------------------------------------------------- model
def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``r(x, y)`` for each row of a ``(n, length)`` batch: the one-label head's output, shape ``(n,)``."""
    return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].float()


def pair_rewards(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Rewards of a collated pair batch ``(b, 2, length)`` → ``(b, 2)``: column 0 chosen, 1 rejected."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    b, k, length = ids.shape
    return sequence_rewards(model, ids.reshape(b * k, length), mask.reshape(b * k, length)).reshape(b, k)


def pairwise_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Summed Bradley–Terry loss ``Σ -log σ(r_c - r_r)`` (Ouyang et al. 2022, Eq. 1; PE-RLHF Sec. 3)."""
    return -F.logsigmoid(r_chosen - r_rejected).sum()


def pairwise_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> dict[str, float]:
    """Pairwise accuracy (``r_c > r_r``, ties count as wrong), mean margin and mean loss."""
    margin = (r_chosen - r_rejected).double()
    return {"pairwise_accuracy": float((margin > 0).double().mean()), "margin_mean": float(margin.mean()),
            "loss": float(-F.logsigmoid(margin).mean()), "n": int(margin.numel())}


def score_ids(model: nn.Module, tokenizer: PreTrainedTokenizerBase, encoded: list[list[int]], batch_size: int,
              device: torch.device) -> torch.Tensor:
    """Rewards of encoded conversations (:func:`encode_responses`), in order, shape ``(n,)``."""
    scores = []
    for start in range(0, len(encoded), batch_size):
        ids = encoded[start:start + batch_size]
        batch = collate([{"input_ids": x, "attention_mask": [1] * len(x)} for x in ids], tokenizer.pad_token_id)
        scores.append(sequence_rewards(model, batch["input_ids"].to(device), batch["attention_mask"].to(device)))
    return torch.cat(scores)


# ------------------------------------------------------------------------------------- task
@dataclass
class RewardTask:
    """``task=reward``: train a reward model on ``data=preference`` with the pairwise loss
    (the :class:`lorafit.task.Task` protocol)."""

    def prepare(self, cfg: Any) -> None:
        """Refuse data that is not preference pairs."""
        if getattr(cfg.data, "head", None) != "reward":
            raise ConfigError(f"task=reward trains on preference pairs, but data={type(cfg.data).__name__} was "
                              f"chosen. Add data=preference data.path=FILE (sharegpt-style JSON or "
                              f"{{prompt, chosen, rejected}} JSONL).")

    def callbacks(self) -> list[Callback]:
        return []

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss terms of a micro-batch: one per pair."""
        return int(batch["input_ids"].shape[0])

    def forward(self, trainer: Any, batch: dict[str, torch.Tensor], model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The (pairs × 2) rewards and the summed pairwise loss of a micro-batch of pairs."""
        rewards = pair_rewards(model, batch)
        return rewards, pairwise_loss(rewards[:, 0], rewards[:, 1])

    @torch.no_grad()
    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        """Pairwise accuracy, mean margin and loss on a held-out split (main-process order)."""
        model = trainer.model
        was_training = model.training
        model.eval()
        chosen, rejected = [], []
        size = trainer.cfg.data.eval_batch_size
        for start in range(0, len(dataset), size):
            rows = list(dataset.select(range(start, min(start + size, len(dataset)))))
            batch = {k: v.to(trainer.accelerator.device) for k, v in collate(rows, trainer.pad_id).items()}
            rewards = pair_rewards(model, batch)
            chosen.append(rewards[:, 0])
            rejected.append(rewards[:, 1])
        model.train(was_training)
        return pairwise_metrics(torch.cat(chosen), torch.cat(rejected))


def load_reward_model(run: str, device: Optional[torch.device] = None) -> Any:
    """A trained ``task=reward`` run (its adapter, applied to its base, head included), in eval mode."""
    adapter_dir = find_adapter_dir(run)
    if adapter_dir is None:
        raise ConfigError(f"reward.run={run!r} holds no adapter (adapter/lorafit_adapter.json). Give the folder of a "
                          f"finished `lorafit train task=reward data=preference ...` run.")
    assembled = load_adapted(adapter_dir)
    if assembled.meta["task"] != "reward":
        raise ConfigError(f"reward.run={run!r} is a {assembled.meta['task']} run, not a reward model. Train one with "
                          f"`lorafit train task=reward data=preference data.path=FILE` and pass its folder.")
    assembled.model.eval().requires_grad_(False)
    if device is not None:
        assembled.model.to(device)
    return assembled
