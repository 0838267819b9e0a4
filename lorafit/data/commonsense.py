"""The commonsense suite in the LLM-Adapters layout: task table, parsing, and ``data=commonsense``.

Files (``data.path`` is the folder holding the task folders, named exactly as below)::

    <root>/boolq/{train,test}.json        <root>/piqa/test.json          <root>/social_i_qa/test.json
    <root>/hellaswag/test.json            <root>/winogrande/test.json    <root>/ARC-Easy/{train,test}.json
    <root>/ARC-Challenge/test.json        <root>/openbookqa/test.json

Each file is a JSON list of ``{"instruction", "input", "output", "answer"}``. The answer
choices are not separate fields: they are written into the instruction, which always ends with
an ``Answer format:`` line naming the answer words. How each task is parsed:

============== ===================================================== ==========================
task           choices in the instruction                            ``answer`` values
============== ===================================================== ==========================
boolq          none: the choices are the answer words themselves     ``true`` / ``false``
piqa           ``Solution1: ... Solution2: ...``                     ``solution1`` ..
social_i_qa    ``Answer1: ... Answer2: ... Answer3: ...``            ``answer1`` ..
hellaswag      ``Ending1: ... Ending4: ...``                         ``ending1`` ..
winogrande     ``Option1: ... Option2: ...`` (the sentence has ``_``) ``option1`` / ``option2``
ARC-Easy,      ``Answer1: ... AnswerN: ...`` (N = 3, 4 or 5; the     ``answer1`` ..
ARC-Challenge  ``Answer format`` line says how many)
openbookqa     ``Answer1: ... Answer4: ...``                         ``answer1`` ..
============== ===================================================== ==========================

Parsing, in order: (1) split the instruction at its *last* ``Answer format:``; the words after it,
split on ``/``, are the answer vocabulary of the row (its length is the number of choices, and the
``answer`` field must be one of them); (2) find ``<Marker>1:``, ``<Marker>2:``, ... in that order
(each at the start of the text or after whitespace); the text between two markers, stripped, is
a choice, the text before the first marker is the question; (3) drop the leading request sentence
(``Please choose the correct answer to the question:``, or any ``Please ...:`` up to its first colon)
from the question. Whitespace between the parts (``\\n\\n`` or a single space) does not matter.

What the scorers compare (``context`` and ``continuations`` of a parsed row):

- every task but two: the context is the question, the continuations are the choice texts;
- hellaswag: both are cleaned as lm-evaluation-harness does (`` [title]`` → ``. ``, other
  ``[...]`` tags removed, double spaces collapsed);
- winogrande: the sentence must hold exactly one ``_``; the context is the text before it, each
  continuation is an option followed by the rest of the sentence (so the shared prefix is the
  prompt, and the options are compared as whole-sentence completions).

``data=commonsense`` trains on the ``train.json`` files: a multiple-choice head
(``AutoModelForMultipleChoice``, inputs ``(context, continuation)`` per choice) for encoders, or
causal-LM SFT on the alpaca-formatted ``instruction`` → ``output`` text for decoders
(``data.objective=auto`` picks by the model).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError, ModelConfig, check_choice
from lorafit.data.options import DataCommon, alpaca_prompt, encode_sft
from lorafit.files import read_text
from lorafit.metrics import accuracy

QUESTION_ANSWER = "Question: {context}\nAnswer:"
OBJECTIVES = ("auto", "mc_head", "causal_lm")


@dataclass(frozen=True)
class CommonsenseTask:
    """Static description of one commonsense task.

    Attributes:
        name: the folder name in the LLM-Adapters layout (also the result key).
        marker: the word numbering the choices in the instruction (``Answer`` → ``Answer1:``);
            ``None`` when the answer words are the choices (boolq).
        vocabulary: the answer words ``generate`` looks for, as LLM-Adapters' ``extract_answer``.
        template: the ``loglik`` prompt, formatted with the parsed ``context``.
    """

    name: str
    marker: Optional[str]
    vocabulary: tuple[str, ...]
    template: str = QUESTION_ANSWER

    @property
    def answer_pattern(self) -> re.Pattern:
        """The regex whose first match in generated text is the predicted answer."""
        return re.compile("|".join(map(re.escape, self.vocabulary)))


def _numbered(word: str, count: int) -> tuple[str, ...]:
    return tuple(f"{word}{k}" for k in range(1, count + 1))


COMMONSENSE_TASKS: dict[str, CommonsenseTask] = {
    task.name: task
    for task in (
        CommonsenseTask("boolq", None, ("true", "false")),
        CommonsenseTask("piqa", "Solution", _numbered("solution", 2)),
        CommonsenseTask("social_i_qa", "Answer", _numbered("answer", 5)),
        CommonsenseTask("hellaswag", "Ending", _numbered("ending", 4), "{context}"),
        CommonsenseTask("winogrande", "Option", _numbered("option", 2), "{context}"),
        CommonsenseTask("ARC-Easy", "Answer", _numbered("answer", 5)),
        CommonsenseTask("ARC-Challenge", "Answer", _numbered("answer", 5)),
        CommonsenseTask("openbookqa", "Answer", _numbered("answer", 5)),
    )
}


def get_commonsense_task(name: str) -> CommonsenseTask:
    """A task by its folder name (case-insensitive; ``-`` and ``_`` are interchangeable)."""
    key = str(name).strip().lower().replace("-", "_")
    for task in COMMONSENSE_TASKS.values():
        if task.name.lower().replace("-", "_") == key:
            return task
    raise ConfigError(f"Unknown commonsense task '{name}'. The tasks are the folder names of the LLM-Adapters "
                      f"layout: {', '.join(COMMONSENSE_TASKS)}. Fix the name in tasks=[...] / data.tasks=[...].")


# ------------------------------------------------------------------------------------ parsing
_LEAD = re.compile(r"^\s*Please\b[^:\n]*:\s*")
_FORMAT = "Answer format:"


def _row_error(path: Path, index: int, field: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"Commonsense file {path}, row {index} (0-based position in the JSON list), field "
                       f"'{field}': {problem} {fix}")


def _marker_positions(text: str, marker: str, count: int, path: Path, index: int) -> list[tuple[int, int]]:
    """(start, end) of ``<marker>1:`` ... ``<marker>count:`` in order, each at a word start."""
    spans, pos = [], 0
    for k in range(1, count + 1):
        found = re.compile(rf"(?:(?<=\s)|^){re.escape(marker)}{k}:").search(text, pos)
        if found is None:
            raise _row_error(path, index, "instruction", f"no '{marker}{k}:' found, but its 'Answer format' line "
                             f"announces {count} choices.", f"Each choice must be written as '{marker}1: ...', "
                             f"'{marker}2: ...' before the 'Answer format:' line; fix or drop the row.")
        spans.append((found.start(), found.end()))
        pos = found.end()
    return spans


def _hellaswag_clean(text: str) -> str:
    """The text cleanup lm-evaluation-harness applies to HellaSwag (WikiHow tags and spacing)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def parse_row(task: CommonsenseTask, row: Any, path: Path, index: int) -> dict[str, Any]:
    """Parse one LLM-Adapters row into question, choices, label, context and continuations.

    Raises:
        ConfigError: naming the file, the row and the field, for a missing or empty field, an
            instruction without ``Answer format:`` or without a choice it announces, an ``answer``
            outside the row's answer words, or a winogrande sentence without exactly one ``_``.
    """
    if not isinstance(row, dict):
        raise ConfigError(f"Commonsense file {path}, row {index} (0-based position in the JSON list) is a "
                          f"{type(row).__name__}, not an object with instruction, input, output and answer fields.")
    for field in ("instruction", "answer"):
        if not isinstance(row.get(field), str) or not row[field].strip():
            problem = "is missing." if field not in row else f"must be a non-empty string, got {row[field]!r}."
            raise _row_error(path, index, field, problem, "Every row needs 'instruction' (the question with its "
                             "choices and an 'Answer format:' line) and 'answer' (e.g. 'answer2').")
    instruction, answer = row["instruction"], row["answer"].strip()
    if _FORMAT not in instruction:
        raise _row_error(path, index, "instruction", "has no 'Answer format:' line naming the answer words.",
                         "LLM-Adapters instructions end with e.g. 'Answer format: answer1/answer2/answer3/answer4'.")
    head, _, fmt = instruction.rpartition(_FORMAT)
    words = [w.strip() for w in fmt.strip().split("/") if w.strip()]
    expected = (list(task.vocabulary) if task.marker is None
                else [f"{task.marker.lower()}{k}" for k in range(1, len(words) + 1)])
    if not 2 <= len(words) <= len(task.vocabulary) or words != expected:
        allowed = (("/".join(task.vocabulary)) if task.marker is None else
                   f"{task.vocabulary[0]}/{task.vocabulary[1]}/... up to {task.vocabulary[-1]}")
        raise _row_error(path, index, "instruction", f"its 'Answer format' line lists {'/'.join(words) or 'nothing'},"
                         f" which is not a {task.name} answer format ({allowed}).",
                         f"Is the file in the right task folder ({task.name}/)?")
    if answer not in words:
        raise _row_error(path, index, "answer", f"'{answer}' is not one of the row's answer words "
                         f"{'/'.join(words)}.", "Use one of the words of its 'Answer format' line.")
    if task.marker is None:
        question, choices = head, list(words)
    else:
        spans = _marker_positions(head, task.marker, len(words), path, index)
        question = head[:spans[0][0]]
        ends = [s for s, _ in spans[1:]] + [len(head)]
        choices = [head[e:end].strip() for (_, e), end in zip(spans, ends)]
        extra = re.search(rf"(?:(?<=\s)|^){re.escape(task.marker)}{len(words) + 1}:", head[spans[-1][1]:])
        if extra:
            raise _row_error(path, index, "instruction", f"it holds '{task.marker}{len(words) + 1}:' but its "
                             f"'Answer format' line lists only {len(words)} answers.",
                             "Make the 'Answer format' line list every choice.")
        for k, choice in enumerate(choices, 1):
            if not choice:
                raise _row_error(path, index, "instruction", f"the text of '{task.marker}{k}:' is empty.",
                                 "Every choice needs a text; fix or drop the row.")
    question = _LEAD.sub("", question, count=1).strip()
    if not question:
        raise _row_error(path, index, "instruction", "the question text before the choices is empty.",
                         "Fix or drop the row.")
    context, continuations = question, list(choices)
    if task.name == "hellaswag":
        context, continuations = _hellaswag_clean(question), [_hellaswag_clean(c) for c in choices]
    elif task.name == "winogrande":
        if question.count("_") != 1:
            raise _row_error(path, index, "instruction", f"the winogrande sentence must hold exactly one blank "
                             f"'_', found {question.count('_')}: {question!r}.", "Fix or drop the row.")
        prefix, suffix = question.split("_")
        context, continuations = prefix.rstrip(), [f"{option}{suffix}" for option in choices]
    return {"task": task.name, "file": str(path), "idx": index, "instruction": instruction,
            "input": str(row.get("input") or ""), "output": row.get("output"), "answer": answer, "answers": words, "label": words.index(answer),
            "question": question, "choices": choices, "context": context, "continuations": continuations}


def task_file(root: str | Path, task: str, split: str) -> Path:
    """``<root>/<task>/<split>.json``."""
    return Path(root).expanduser() / get_commonsense_task(task).name / f"{split}.json"


def read_commonsense(root: str | Path, task: str, split: str = "test") -> list[dict[str, Any]]:
    """Read and parse ``<root>/<task>/<split>.json`` (see the module docstring for the parsing).

    Returns:
        One dict per row, in file order: ``task``, ``file``, ``idx``, ``instruction``, ``input``, ``output``,
        ``answer``, ``answers`` (the row's answer words), ``label`` (index of ``answer``),
        ``question``, ``choices``, ``context``, ``continuations``.

    Raises:
        ConfigError: a missing, empty or non-JSON file, or a malformed row (file, row and field named).
    """
    spec = get_commonsense_task(task)
    path = task_file(root, spec.name, split)
    if not path.is_file():
        folder = path.parent
        hint = (f"The folder {folder} holds: {', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'}."
                if folder.is_dir() else f"There is no {spec.name}/ folder in {path.parent.parent}.")
        raise ConfigError(f"Commonsense file {path} does not exist. data.path must point at the folder holding the "
                          f"LLM-Adapters task folders (<data.path>/{spec.name}/{split}.json). {hint}")
    text = read_text(path, "Commonsense file")
    if not text.strip():
        raise ConfigError(f"Commonsense file {path} is empty. It must be a JSON list of {{instruction, input, "
                          f"output, answer}} rows; download it again.")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"Commonsense file {path} is not valid JSON ({exc}). It must be a JSON list of "
                          f"{{instruction, input, output, answer}} rows.") from None
    if not isinstance(rows, list) or not rows:
        what = "an empty list" if isinstance(rows, list) else f"a JSON {type(rows).__name__}"
        raise ConfigError(f"Commonsense file {path} holds {what}; it must be a non-empty JSON list of "
                          f"{{instruction, input, output, answer}} rows.")
    return [parse_row(spec, row, path, i) for i, row in enumerate(rows)]


def objective_for(model_cfg: ModelConfig) -> str:
    """``mc_head`` for architectures with a multiple-choice head (encoders), else ``causal_lm``."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES

    if model_cfg.build is not None:
        model_type = model_cfg.build.get("model_type")
    else:
        try:
            model_type = AutoConfig.from_pretrained(model_cfg.name_or_path,
                                                    trust_remote_code=model_cfg.trust_remote_code).model_type
        except (OSError, ValueError) as exc:
            raise ConfigError(f"Could not load a model config from model.name_or_path='{model_cfg.name_or_path}': "
                              f"{str(exc).splitlines()[0]} Give a local Hugging Face folder (with "
                              f"config.json).") from None
    return "mc_head" if model_type in MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES else "causal_lm"


# ------------------------------------------------------------------------------ data option
@dataclass
class CommonsenseData(DataCommon):
    """``data=commonsense``: the LLM-Adapters commonsense files, for training and for ``lorafit eval``.

    Attributes:
        path: the folder holding the task folders (e.g. ``../shared/data/commonsense``).
        tasks: task folder names; ``null`` means every task folder found under ``path`` (with a
            ``train.json`` for training, a ``test.json`` for evaluation).
        objective: ``mc_head`` (a multiple-choice head, encoders), ``causal_lm`` (SFT on the
            alpaca prompt → ``output``, decoders) or ``auto`` (chosen from the model's architecture).
    """

    path: str = ""
    tasks: Optional[list[str]] = None
    objective: str = "auto"
    max_length: int = 256

    num_labels = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise ConfigError("data=commonsense needs data.path=DIR, the folder holding the LLM-Adapters task "
                              "folders (DIR/ARC-Easy/train.json, DIR/boolq/test.json, ...).")
        check_choice("data.objective", self.objective, OBJECTIVES)
        if self.tasks is not None:
            if not self.tasks:
                raise ConfigError("data.tasks=[] names no task. Name some, e.g. \"data.tasks=[ARC-Easy]\", or "
                                  "drop the key to use every task folder under data.path.")
            self.tasks = [get_commonsense_task(t).name for t in self.tasks]

    @property
    def head(self) -> str:
        if self.objective == "auto":
            raise ConfigError("data.objective=auto is resolved from the model before training; set "
                              "data.objective=mc_head (encoders) or data.objective=causal_lm (decoders).")
        return "multiple_choice" if self.objective == "mc_head" else "causal_lm"

    def resolve(self, model_cfg: ModelConfig) -> None:
        """Turn ``objective=auto`` into ``mc_head`` or ``causal_lm`` for this model."""
        found = objective_for(model_cfg)
        if self.objective == "auto":
            self.objective = found
        elif self.objective == "mc_head" and found != "mc_head":
            raise ConfigError(f"data.objective=mc_head needs a model with a multiple-choice head (an encoder such as "
                              f"model=minilm); {model_cfg.name_or_path} has none. Use data.objective=causal_lm.")

    def task_names(self, split: str) -> list[str]:
        """``tasks``, or every task folder under ``path`` that holds ``<split>.json``."""
        if self.tasks:
            return list(self.tasks)
        found = [name for name in COMMONSENSE_TASKS if task_file(self.path, name, split).is_file()]
        if not found:
            raise ConfigError(f"No commonsense task folder with a {split}.json under data.path={self.path}. Expected "
                              f"<data.path>/<task>/{split}.json for tasks among {', '.join(COMMONSENSE_TASKS)}.")
        return found

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """During training: the test file of each trained task that has one (first ``max_eval_examples``)."""
        return tuple(t for t in self.task_names("train") if task_file(self.path, t, "test").is_file())

    def split_name(self, split: str) -> str:
        return split

    def rows(self, split: str) -> list[dict]:
        """``train``: the train files of all tasks, concatenated; a task name: that task's test file."""
        if split == "train":
            rows = [row for task in self.task_names("train") for row in read_commonsense(self.path, task, "train")]
        else:
            rows = read_commonsense(self.path, split, "test")
        if self.objective == "causal_lm":
            for row in rows:
                if not isinstance(row["output"], str) or not row["output"].strip():
                    raise ConfigError(f"Commonsense file {row['file']}, row {row['idx']} (0-based position in the "
                                      f"JSON list), field 'output': missing or empty. Causal-LM training learns "
                                      f"the 'output' text (e.g. 'the correct answer is answer2'); add it or train "
                                      f"an encoder with data.objective=mc_head.")
        return self.limited(rows, split)

    def encode(self, row: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
        if self.head == "causal_lm":
            return encode_sft(tokenizer, alpaca_prompt(row), str(row["output"]), self.max_length)
        return encode_choices(tokenizer, row, self.max_length)

    def metrics(self, predictions: list, labels: list) -> dict[str, float]:
        return {"acc": accuracy(predictions, labels)}


def encode_choices(tokenizer: PreTrainedTokenizerBase, row: dict, max_length: int) -> dict:
    """One ``(context, continuation)`` pair per choice: lists of token lists, and the label index."""
    encoded = [tokenizer(row["context"], cont, truncation=True, max_length=max_length) for cont in row["continuations"]]
    features = {key: [list(e[key]) for e in encoded] for key in encoded[0].keys()}
    return {**features, "labels": int(row["label"])}
