"""``data=chat``: conversations rendered with a chat template, the loss on what the assistant says.

Rows (``data.path``: a JSON list, JSONL, Parquet, a folder written by ``datasets``' ``save_to_disk``,
or a hub id with ``data.split`` / ``data.subset``) hold a conversation in either form:

- OpenAI: ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``;
- sharegpt: ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}, ...], "system": ...}``.

``data.messages_field`` / ``data.system_field`` name other columns.

**Templates.** The conversation is rendered with the tokenizer's own chat template by default;
``data.template=chatml|llama3|alpaca`` picks a built-in one for bases without (alpaca renders
``data=instruct``'s prompt, so instruction data is a special case of this path), and
``data.chat_template=FILE_OR_JINJA`` a template of your own. The template is set on the tokenizer
and saved with the run, so the text trained on is exactly what ``apply_chat_template`` produces at
serving time. Special tokens a template needs and the vocabulary lacks (chatml's ``<|im_end|>``,
llama3's ``<|eot_id|>``) are added (their embedding and output rows are trained, see
:mod:`lorafit.adapters.tokens`); ``data.add_special_tokens=false`` refuses such a template instead.

**What is learnt** (``data.train_on``): ``assistant`` — every assistant turn's content and the
end-of-turn text the template puts after it; ``last`` — the final assistant turn; ``all`` — every
token. The assistant spans come from rendering the conversation prefix turn by turn (the text up to
an assistant turn with the generation prompt, and the text including it): chatml and llama3 carry
no ``{% generation %}`` markers. The rendered text is tokenised once and each token is labelled by
the span its characters fall in.

**Too long** (``data.overflow``): ``truncate`` keeps the first ``max_length`` tokens, ``drop``
leaves the conversation out; the run reports how many.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError, check_choice, check_range
from lorafit.console import console
from lorafit.data.batches import IGNORE_INDEX
from lorafit.data.options import DataCommon
from lorafit.files import read_rows, read_text

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system", "observation": "user", "function_call": "assistant"}

ALPACA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token if loop.first and bos_token else '' }}"
    "{% if message.get('input') %}"
    "{{ 'Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\\n\\n### Instruction:\\n' + message['content'] + "
    "'\\n\\n### Input:\\n' + message['input'] + '\\n\\n### Response:\\n' }}"
    "{% else %}"
    "{{ 'Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\\n\\n### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + (eos_token or sep_token or '') }}{% endif %}"
    "{% endfor %}")
"""The alpaca prompt as a chat template: a user turn's ``content`` is the instruction, its ``input`` (if
any) the context; an assistant turn ends with EOS (SEP for BERT-style vocabularies)."""
TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama3": (
        "{{ bos_token or '' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "alpaca": ALPACA_TEMPLATE,
}
TEMPLATE_TOKENS = {"chatml": ["<|im_start|>", "<|im_end|>"],
                   "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "alpaca": []}


def to_message(turn: Any, where: str) -> dict[str, str]:
    """One turn, ``{role, content}`` (OpenAI) or ``{from, value}`` (sharegpt), as ``{role, content}``."""
    if isinstance(turn, dict) and "from" in turn and "value" in turn:
        role, text = turn["from"], turn["value"]
    elif isinstance(turn, dict) and "role" in turn and "content" in turn:
        role, text = turn["role"], turn["content"]
    else:
        raise ConfigError(f"{where}: a turn must be {{\"role\": ..., \"content\": ...}} or {{\"from\": ..., \"value\": "
                          f"...}} (sharegpt); got {str(turn)[:80]!r}. Fix that row of the file.")
    if role not in ROLES:
        raise ConfigError(f"{where}: unknown speaker {role!r}; allowed: {', '.join(ROLES)}. Fix that row of the file.")
    return {"role": ROLES[role], "content": "" if text is None else str(text)}


def conversation(row: dict, where: str, messages_field: str = "messages", system_field: str = "system") -> list[dict]:
    """A row's turns as ``[{role, content}, ...]`` (its system field first, if any)."""
    field = messages_field if messages_field in row else ("conversations" if "conversations" in row else None)
    if field is None or not isinstance(row[field], list) or not row[field]:
        raise ConfigError(f"{where}: no conversation — expected a non-empty list under {messages_field!r} (OpenAI "
                          f"messages) or 'conversations' (sharegpt). Set data.messages_field to your column.")
    turns = [to_message(turn, where) for turn in row[field]]
    system = row.get(system_field)
    if system and not any(t["role"] == "system" for t in turns):
        turns.insert(0, {"role": "system", "content": str(system)})
    return turns


# ------------------------------------------------------------------------------------- reading
def read_conversations(path: str, split: str = "train", subset: Optional[str] = None) -> list[dict]:
    """Rows of a JSON / JSONL / Parquet file, a ``save_to_disk`` folder, or a hub dataset, as dicts."""
    source = Path(path)
    if source.is_file():
        if source.suffix == ".parquet":
            import pyarrow.parquet as pq
            try:
                return pq.read_table(source).to_pylist()
            except Exception as exc:  # pyarrow's errors share no useful base class
                raise ConfigError(f"Parquet file {source} cannot be read ({exc}). Check the file.") from None
        return read_rows(source, what="Conversation file")
    import datasets

    if source.is_dir():
        try:
            loaded = datasets.load_from_disk(str(source))
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"data.path={path} is a folder but not one written by datasets' save_to_disk ({exc}). "
                              f"Give a JSON/JSONL/Parquet file or such a folder.") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"{path} has the splits {', '.join(loaded)}, not data.split={split!r}.")
            loaded = loaded[split]
        return loaded.to_list()
    try:
        return datasets.load_dataset(path, subset, split=split).to_list()
    except Exception as exc:  # network, auth, missing splits
        raise ConfigError(f"data.path={path!r} is no local file or folder, and loading it from the hub failed "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]}). Give a local file, or a hub id "
                          f"with data.split / data.subset on a machine with a network.") from None


# ------------------------------------------------------------------------------------ templates
def template_text(template: Optional[str], chat_template: Optional[str]) -> Optional[str]:
    """The Jinja template to set on the tokenizer (None: keep the tokenizer's own)."""
    if chat_template:
        file = Path(chat_template)
        return read_text(file, "Chat template file") if file.is_file() else chat_template
    return TEMPLATES[template] if template else None


def tokens_of_template(template: str) -> list[str]:
    """The special tokens a built-in template writes (``<|im_start|>`` ...); none known for others."""
    return next((tokens for name, tokens in TEMPLATE_TOKENS.items() if TEMPLATES[name] == template), [])


def configure_tokenizer(tokenizer: PreTrainedTokenizerBase, template: Optional[str], add_missing: bool) -> list[str]:
    """Set ``template`` on the tokenizer and add the special tokens it needs; returns the tokens added.

    Raises:
        ConfigError: the tokenizer has no template and none is chosen, or a needed token is missing and
            ``add_missing`` is off.
    """
    if template is not None:
        tokenizer.chat_template = template
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"The tokenizer '{tokenizer.name_or_path}' has no chat template. Pick one with "
                          f"data.template=chatml|llama3|alpaca, or give yours with data.chat_template=FILE.")
    vocabulary = tokenizer.get_vocab()
    missing = [t for t in tokens_of_template(tokenizer.chat_template) if t not in vocabulary]
    if missing and not add_missing:
        raise ConfigError(f"The chat template writes {', '.join(missing)}, which the vocabulary of "
                          f"'{tokenizer.name_or_path}' lacks, and data.add_special_tokens=false. Allow adding them "
                          f"(data.add_special_tokens=true: their embedding and output rows are trained) or pick a "
                          f"template the vocabulary can express.")
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return missing


def render(tokenizer: PreTrainedTokenizerBase, messages: list[dict], generation_prompt: bool = False,
           template: Optional[str] = None) -> str:
    """``apply_chat_template`` as text, with ``template`` (None: the tokenizer's own)."""
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids that end an assistant's turn, for generation to stop at: EOS, and the special token the
    chat template writes right after an assistant's content (chatml's ``<|im_end|>``, llama3's
    ``<|eot_id|>``), if it writes one."""
    stop = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    marker = "\u2063lorafit\u2063"
    text = render(tokenizer, [{"role": "user", "content": "?"}, {"role": "assistant", "content": marker}])
    after = text[text.index(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    special = set(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    if ids and ids[0] in special and ids[0] not in stop:
        stop.append(ids[0])
    return stop


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict],
                    template: Optional[str] = None) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each assistant turn (its content and the
    end-of-turn text up to the next turn), found by rendering the prefix turn by turn."""
    text = render(tokenizer, messages, template=template)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], True, template) if i else ""
        through = render(tokenizer, messages[:i + 1], template=template)
        if not text.startswith(before) or not text.startswith(through):
            raise ConfigError("The chat template does not render a conversation's prefix as a prefix of the whole "
                              "conversation, so the assistant turns cannot be located. Use another template.")
        spans.append((len(before), len(through)))
    return text, spans


def encode_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict], train_on: str,
                        max_length: int, template: Optional[str] = None) -> dict:
    """``input_ids``, ``attention_mask`` and ``labels`` (``-100`` outside what is learnt), at most
    ``max_length`` tokens, plus ``overflow`` (tokens cut off). ``template``: None for the tokenizer's own."""
    text, spans = assistant_spans(tokenizer, messages, template)
    if train_on == "last":
        spans = spans[-1:]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    if train_on == "all":
        labels = list(ids)
    else:
        labels = [token if any(start <= begin < end for start, end in spans) else IGNORE_INDEX
                  for token, (begin, _) in zip(ids, offsets)]
    overflow = max(0, len(ids) - max_length)
    ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels, "overflow": overflow}


# ------------------------------------------------------------------------------------ the option
@dataclass
class ChatData(DataCommon):
    """``data=chat``: supervised fine-tuning on conversations (see the module docstring).

    Attributes:
        path: a JSON / JSONL / Parquet file, a ``save_to_disk`` folder, or a hub id.
        split / subset: which split (and configuration) of a hub dataset or a DatasetDict folder.
        messages_field: the column holding the turns (``conversations`` is found too).
        system_field: a column holding a system prompt, if any.
        template: ``chatml``, ``llama3`` or ``alpaca``; null: the tokenizer's own chat template.
        chat_template: a Jinja chat template of your own: a file, or the template text itself.
        add_special_tokens: add the special tokens the template needs and the vocabulary lacks.
        train_on: ``assistant`` (every assistant turn), ``last`` (the final one) or ``all``.
        overflow: ``truncate`` or ``drop`` conversations longer than ``max_length``.
        eval_fraction: the last fraction of the rows held out for evaluation (loss; at least one row).
        packing: pack each step's conversations into rows of ``max_length`` tokens (positions restart
            at every conversation, none attends across); the loss is unchanged.
        num_proc: processes that tokenise (``datasets.map``).
    """

    path: str = ""
    split: str = "train"
    subset: Optional[str] = None
    messages_field: str = "messages"
    system_field: str = "system"
    template: Optional[str] = None
    chat_template: Optional[str] = None
    add_special_tokens: bool = True
    train_on: str = "assistant"
    overflow: str = "truncate"
    eval_fraction: float = 0.05
    packing: bool = False
    num_proc: int = 1
    max_length: int = 1024
    batch_size: int = 8

    head = "causal_lm"
    num_labels = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError("data=chat needs data.path: a JSON/JSONL/Parquet file of conversations, a save_to_disk "
                              "folder, or a hub id.")
        if self.template is not None:
            check_choice("data.template", self.template, list(TEMPLATES))
        if self.template and self.chat_template:
            raise ConfigError("data.template and data.chat_template are both set; a run renders with one template. "
                              "Drop one of them.")
        check_choice("data.train_on", self.train_on, ["assistant", "last", "all"])
        check_choice("data.overflow", self.overflow, ["truncate", "drop"])
        check_range("data.eval_fraction", self.eval_fraction, 0.0, 0.5)
        check_range("data.num_proc", self.num_proc, 1)

    @property
    def eval_splits(self) -> tuple[str, ...]:
        return ("eval",) if self.eval_fraction > 0 else ()

    def split_name(self, split: str) -> str:
        return "chat"

    def configure(self, tokenizer: PreTrainedTokenizerBase) -> list[str]:
        return configure_tokenizer(tokenizer, template_text(self.template, self.chat_template), self.add_special_tokens)

    def rows(self, split: str) -> list[dict]:
        rows = read_conversations(self.path, self.split, self.subset)
        where = f"Conversation data {self.path}"
        turns = [conversation(row, f"{where}, row {i}", self.messages_field, self.system_field)
                 for i, row in enumerate(rows)]
        n_eval = max(1, int(round(len(turns) * self.eval_fraction))) if self.eval_fraction > 0 else 0
        turns = turns[: len(turns) - n_eval] if split == "train" else turns[len(turns) - n_eval:]
        return self.limited([{"messages": t} for t in turns], split)

    def encode(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
        return encode_conversation(tokenizer, row["messages"], self.train_on, self.max_length,
                                   template_text(self.template, self.chat_template))

    def keep(self, encoded: dict) -> bool:
        """``overflow=drop`` leaves out a conversation that was cut."""
        return self.overflow == "truncate" or encoded["overflow"] == 0

    def report(self, split: str, cut: int, total: int) -> None:
        if cut:
            action = "truncated to" if self.overflow == "truncate" else "dropped: longer than"
            console.print(f"data={self.split_name(split)}: {cut} of {total} {split} conversations {action} data.max_length={self.max_length}")

    def metrics(self, predictions: list, labels: list) -> dict[str, float]:
        return {}


@dataclass
class InstructData(ChatData):
    """``data=instruct``: alpaca-style rows (``instruction``, ``input``, ``output``), trained as a
    two-turn conversation rendered with the alpaca template (``data.template``: another template
    renders them as chat): the prompt is masked from the loss; the response and EOS are learnt.

    Attributes:
        path: a JSON list or JSONL file.
        (and data=chat's keys: eval_fraction, template, train_on, overflow, packing, num_proc ...)
    """

    template: Optional[str] = "alpaca"
    max_length: int = 256

    def __post_init__(self) -> None:
        if not self.path:
            raise ConfigError("data=instruct needs data.path=FILE (an alpaca-style JSON or JSONL file with "
                              "instruction, input and output fields).")
        super().__post_init__()

    def split_name(self, split: str) -> str:
        return "instruct"

    def rows(self, split: str) -> list[dict]:
        rows = read_rows(Path(self.path), required=("instruction", "output"))
        n_eval = int(round(len(rows) * self.eval_fraction))
        rows = rows[: len(rows) - n_eval] if split == "train" else rows[len(rows) - n_eval:]
        return self.limited([{"messages": instruction_turns(row, self.template == "alpaca")} for row in rows], split)

    def encode(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
        """An alpaca row, or its conversation form (what :meth:`rows` gives)."""
        if "messages" not in row:
            row = {"messages": instruction_turns(row, self.template == "alpaca")}
        return super().encode(row, tokenizer)


def instruction_turns(row: dict, separate_input: bool = True) -> list[dict]:
    """An alpaca row as a user turn (its ``input`` a field of its own for the alpaca template, else
    appended to the instruction) and the assistant's response."""
    instruction, extra = str(row["instruction"]).strip(), str(row.get("input") or "").strip()
    user = ({"role": "user", "content": instruction, "input": extra} if separate_input
            else {"role": "user", "content": f"{instruction}\n\n{extra}" if extra else instruction})
    return [user, {"role": "assistant", "content": str(row["output"])}]
