"""``lorafit eval MODEL suite=commonsense``: the three scorers of the commonsense suite.

Each protocol is reported under its own name (``"protocol"`` in every task's results):

- ``loglik`` (causal LMs): for each choice, the summed log-probability of its continuation given
  the task's prompt (``CommonsenseTask.template`` formatted with the parsed context, e.g.
  ``"Question: {question}\\nAnswer:"`` and continuations ``" {choice}"``). ``acc`` takes the
  argmax of the sums; ``acc_norm`` the argmax of the sums divided by the continuation's length in
  *characters* (the scored string, leading space included), as lm-evaluation-harness does. Ties
  go to the first choice. The prompt is run once per example (a batch of left-padded prompts) and
  every choice continues from its cached keys and values (``past_key_values``), so the shared
  prompt is never recomputed. A prompt longer than ``data.max_length`` minus the longest
  continuation loses its *first* tokens.
- ``generate`` (causal LMs): greedy decoding of ``max_new_tokens`` after the alpaca prompt of the
  instruction (the prompt ``data=commonsense`` trains on), then LLM-Adapters' answer extraction:
  the first match of the task's answer words (``true|false``, ``solution1|solution2``,
  ``answer1|...|answer5``, ``ending1|...|ending4``, ``option1|option2``; case-sensitive) in the
  generated text; no match counts as wrong (``no_answer`` counts them).
- ``mc_head`` (encoders): ``AutoModelForMultipleChoice`` over ``(context, continuation)`` pairs,
  argmax over the choices (``acc``).

**Prompts** (``prompt=``, recorded in every task's results): ``plain`` is the above; ``chat`` renders
the loglik context, or the generate instruction, as a user turn with the model's chat template and
the generation prompt (what a chat-trained run learnt to answer; choices then follow without a
leading space, and decoding stops at the template's end of turn); ``auto`` is ``chat`` when the
tokenizer has a chat template (a ``data=chat`` / ``instruct`` run records its own), else ``plain``.

The parsing of each task (question, choices, context, continuations) lives in
:mod:`lorafit.data.commonsense`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from rich.progress import Progress
from torch import nn
from transformers import PreTrainedTokenizerBase

from lorafit.adapters.io import find_adapter_dir
from lorafit.config import ConfigError, EvalConfig
from lorafit.console import console
from lorafit.data.chat import ALPACA_TEMPLATE, end_of_turn_ids, instruction_turns, render
from lorafit.data.commonsense import CommonsenseData, CommonsenseTask, get_commonsense_task
from lorafit.data.options import alpaca_prompt
from lorafit.eval.load import Scored, load_for_scoring, natural_head
from lorafit.eval.report import print_results, save_eval
from lorafit.metrics import accuracy
from lorafit.task import predict


PROTOCOL_OF_HEAD = {"multiple_choice": "mc_head", "causal_lm": "loglik"}
HEAD_OF_PROTOCOL = {"mc_head": "multiple_choice", "loglik": "causal_lm", "generate": "causal_lm"}
MAX_CONTINUATION_TOKENS = 4096
"""``loglik`` batches hold at most this many (padded) continuation tokens, which bounds the
``tokens × vocabulary`` logits tensor; a batch always holds at least one example."""

Advance = Callable[[int], None]


# ------------------------------------------------------------------------------------ loglik
@dataclass
class LoglikRequest:
    """One example for ``loglik``: the prompt's token ids and each choice's continuation ids."""

    prompt_ids: list[int]
    continuation_ids: list[list[int]]
    continuation_chars: list[int]
    label: int


def _start_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """What a sequence starts with: BOS if the tokenizer has one (as ``encode_sft`` trains)."""
    return [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []


def _any_special_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.cls_token_id,
                     tokenizer.sep_token_id, tokenizer.pad_token_id):
        if token_id is not None:
            return token_id
    return 0


def encode_loglik(row: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, chat: bool = False) -> LoglikRequest:
    """Token ids of the prompt and of each continuation of a parsed row.

    The continuation ids are the tail of ``tokenize(prompt + continuation)`` after the prompt's
    ids (so a tokenizer that merges across the boundary is handled as lm-evaluation-harness
    does); if the prompt's ids are not a prefix of it, the continuation is tokenised alone.
    ``chat``: the prompt is the context as a user turn in the chat template, with the generation prompt.
    """
    task = get_commonsense_task(row["task"])
    context = task.template.format(context=row["context"])
    if chat:
        context = render(tokenizer, [{"role": "user", "content": context}], generation_prompt=True)
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    continuations, chars = [], []
    for text in row["continuations"]:
        cont = (" " if context and not chat else "") + text
        whole = tokenizer(context + cont, add_special_tokens=False)["input_ids"]
        ids = (whole[len(context_ids):] if whole[:len(context_ids)] == context_ids
               else tokenizer(cont, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ConfigError(f"Commonsense file {row['file']}, row {row['idx']}, field 'instruction': the choice "
                              f"{text!r} gives no tokens. Fix or drop the row.")
        continuations.append(ids)
        chars.append(len(cont))
    prompt = ([] if chat else _start_ids(tokenizer)) + context_ids or [_any_special_id(tokenizer)]
    keep = max(1, max_length - max(len(c) for c in continuations))
    return LoglikRequest(prompt[-keep:], continuations, chars, int(row["label"]))


def _forward(model: nn.Module, keep_last: bool, **inputs: Any) -> Any:
    """``model(**inputs)``, asking for the last position's logits only when ``keep_last``."""
    if keep_last:
        try:
            return model(**inputs, logits_to_keep=1)
        except TypeError:  # an architecture without logits_to_keep
            pass
    return model(**inputs)


def _token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log p(ids) under ``logits`` (``[..., V]``), in float32, without a full log-softmax copy."""
    logits = logits.float()
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


@torch.no_grad()
def continuation_logprobs(model: nn.Module, requests: list[LoglikRequest], pad_token_id: int,
                          device: torch.device) -> list[list[float]]:
    """Summed log-probability of every continuation of every request, in two forward passes.

    1. The prompts, left-padded to a common length (explicit position ids, so padding changes
       nothing), with ``use_cache``; the last position predicts each continuation's first token.
    2. The cache is repeated once per choice (``batch_select_indices``), and all continuations
       (right-padded, positions continuing each prompt) run on top of it; position ``t``
       predicts token ``t + 1``.
    """
    n, longest = len(requests), max(len(r.prompt_ids) for r in requests)
    prompt = torch.full((n, longest), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((n, longest), dtype=torch.long)
    for i, r in enumerate(requests):
        prompt[i, longest - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        prompt_mask[i, longest - len(r.prompt_ids):] = 1
    prompt, prompt_mask = prompt.to(device), prompt_mask.to(device)
    positions = (prompt_mask.cumsum(1) - 1).clamp(min=0)
    out = _forward(model, True, input_ids=prompt, attention_mask=prompt_mask, position_ids=positions, use_cache=True)

    owner = torch.tensor([i for i, r in enumerate(requests) for _ in r.continuation_ids], device=device)
    conts = [c for r in requests for c in r.continuation_ids]
    width = max(len(c) for c in conts)
    cont = torch.full((len(conts), width), pad_token_id, dtype=torch.long)
    cont_mask = torch.zeros((len(conts), width), dtype=torch.long)
    for j, c in enumerate(conts):
        cont[j, :len(c)] = torch.tensor(c)
        cont_mask[j, :len(c)] = 1
    cont, cont_mask = cont.to(device), cont_mask.to(device)
    totals = _token_logprobs(out.logits[:, -1][owner], cont[:, 0])
    if width > 1:
        cache = out.past_key_values
        if cache is None or not hasattr(cache, "batch_select_indices"):
            raise ConfigError(f"protocol=loglik continues each choice from the prompt's key/value cache, but "
                              f"{type(model).__name__} returned none with use_cache=True. Use protocol=generate.")
        cache.batch_select_indices(owner)
        mask = torch.cat([prompt_mask[owner], cont_mask[:, :-1]], dim=1)
        steps = prompt_mask.sum(1)[owner, None] + torch.arange(width - 1, device=device)[None]
        logits = model(input_ids=cont[:, :-1], attention_mask=mask, position_ids=steps, past_key_values=cache,
                       use_cache=True).logits
        totals = totals + (_token_logprobs(logits, cont[:, 1:]) * cont_mask[:, 1:]).sum(1)
    sums = totals.tolist()
    result, start = [], 0
    for r in requests:
        result.append(sums[start:start + len(r.continuation_ids)])
        start += len(r.continuation_ids)
    return result


def loglik_batches(requests: list[LoglikRequest], batch_size: int,
                   max_tokens: int = MAX_CONTINUATION_TOKENS) -> list[list[LoglikRequest]]:
    """Consecutive groups of at most ``batch_size`` examples and ``max_tokens`` padded continuation tokens."""
    batches: list[list[LoglikRequest]] = []
    current: list[LoglikRequest] = []
    for r in requests:
        rows = sum(len(x.continuation_ids) for x in current) + len(r.continuation_ids)
        width = max([len(c) for x in current + [r] for c in x.continuation_ids])
        if current and (len(current) >= batch_size or rows * width > max_tokens):
            batches.append(current)
            current = []
        current.append(r)
    if current:
        batches.append(current)
    return batches


def choice_metrics(logliks: list[list[float]], lengths: list[list[int]], labels: list[int]) -> dict[str, float]:
    """``acc``: argmax of the log-likelihoods; ``acc_norm``: argmax of log-likelihood / length.

    Args:
        logliks: per example, the summed log-probability of each choice.
        lengths: per example, each choice's length in characters.
        labels: per example, the index of the correct choice.
    """
    plain = [int(np.argmax(ll)) for ll in logliks]
    normed = [int(np.argmax(np.asarray(ll) / np.asarray(n, dtype=float))) for ll, n in zip(logliks, lengths)]
    return {"acc": accuracy(plain, labels), "acc_norm": accuracy(normed, labels)}


def score_loglik(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], cfg: EvalConfig,
                 device: torch.device, advance: Optional[Advance] = None) -> tuple[dict, list[dict]]:
    """``loglik`` over parsed rows: metrics (``acc``, ``acc_norm``) and one prediction record per row."""
    chat = uses_chat(tokenizer, cfg.prompt)
    requests = [encode_loglik(row, tokenizer, cfg.data.max_length, chat) for row in rows]
    logliks: list[list[float]] = []
    for batch in loglik_batches(requests, cfg.batch_size):
        logliks += continuation_logprobs(model, batch, _pad_id(tokenizer), device)
        if advance is not None:
            advance(len(batch))
    metrics = choice_metrics(logliks, [r.continuation_chars for r in requests], [r.label for r in requests])
    records = [{"idx": row["idx"], "label": row["label"], "prediction": int(np.argmax(ll)), "loglik": ll}
               for row, ll in zip(rows, logliks)]
    return metrics, records


# ---------------------------------------------------------------------------------- generate
def extract_answer(task: CommonsenseTask, text: str) -> Optional[str]:
    """The first of the task's answer words in ``text`` (LLM-Adapters' ``extract_answer``), or None."""
    found = task.answer_pattern.search(text.strip())
    return found.group(0) if found else None


@torch.no_grad()
def generate_texts(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int,
                   max_new_tokens: int, device: torch.device, chat: bool = False) -> list[str]:
    """Greedy continuations of ``prompts`` (left-padded batch); only the new tokens, decoded. ``chat``:
    the prompts are rendered chat templates (no BOS added), and decoding stops at the end of turn."""
    start = [] if chat else _start_ids(tokenizer)
    encoded = [(start + tokenizer(p, add_special_tokens=False)["input_ids"])[-max_length:] for p in prompts]
    longest, pad = max(map(len, encoded)), _pad_id(tokenizer)
    ids = torch.tensor([[pad] * (longest - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (longest - len(e)) + [1] * len(e) for e in encoded], device=device)
    stop = end_of_turn_ids(tokenizer) if chat else [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad, **({"eos_token_id": stop} if stop else {}))
    return tokenizer.batch_decode(out[:, longest:], skip_special_tokens=True)


def uses_chat(tokenizer: PreTrainedTokenizerBase, prompt: str) -> bool:
    """Whether questions are rendered with the chat template (``prompt=chat``, or ``auto`` and it has one)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt == "chat" and not has_template:
        raise ConfigError("prompt=chat renders questions with the model's chat template, but its tokenizer has none. "
                          "Use prompt=plain, or a run trained with data=chat / data=instruct.")
    return prompt == "chat" or (prompt == "auto" and has_template)


def generate_prompt(tokenizer: PreTrainedTokenizerBase, row: dict, chat: bool) -> str:
    """The instruction as the alpaca prompt, or (``chat``) as a user turn in the chat template."""
    if not chat:
        return alpaca_prompt(row)
    user = instruction_turns({**row, "output": ""}, tokenizer.chat_template == ALPACA_TEMPLATE)[0]
    return render(tokenizer, [user], generation_prompt=True)


def score_generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], cfg: EvalConfig,
                   device: torch.device, advance: Optional[Advance] = None) -> tuple[dict, list[dict]]:
    """``generate`` over parsed rows: ``acc`` (extracted answer == ``answer``) and ``no_answer``."""
    records = []
    chat = uses_chat(tokenizer, cfg.prompt)
    for start in range(0, len(rows), cfg.batch_size):
        batch = rows[start:start + cfg.batch_size]
        texts = generate_texts(model, tokenizer, [generate_prompt(tokenizer, r, chat) for r in batch],
                               cfg.data.max_length, cfg.max_new_tokens, device, chat)
        for row, text in zip(batch, texts):
            answer = extract_answer(get_commonsense_task(row["task"]), text)
            records.append({"idx": row["idx"], "label": row["answer"], "prediction": answer, "output": text})
        if advance is not None:
            advance(len(batch))
    correct = [float(r["prediction"] == r["label"]) for r in records]
    return ({"acc": float(np.mean(correct)), "no_answer": sum(r["prediction"] is None for r in records)}, records)


# ----------------------------------------------------------------------------------- mc_head
def score_mc_head(model: nn.Module, tokenizer: PreTrainedTokenizerBase, rows: list[dict], cfg: EvalConfig,
                  device: torch.device, advance: Optional[Advance] = None) -> tuple[dict, list[dict]]:
    """``mc_head`` over parsed rows: the multiple-choice head's argmax (``acc``)."""
    import datasets

    data = dataclasses.replace(cfg.data, objective="mc_head")
    dataset = datasets.Dataset.from_list([data.encode(row, tokenizer) for row in rows]).with_format(None)
    result = predict(model, dataset, "multiple_choice", cfg.batch_size, _pad_id(tokenizer), device, progress=advance)
    records = [{"idx": row["idx"], "label": label, "prediction": pred}
               for row, label, pred in zip(rows, result["labels"], result["predictions"])]
    return {"acc": accuracy(result["predictions"], result["labels"])}, records


SCORERS = {"loglik": score_loglik, "generate": score_generate, "mc_head": score_mc_head}


# ------------------------------------------------------------------------------------ models
def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else _any_special_id(tokenizer)


def load_for_protocol(path: str, protocol: str) -> tuple[Scored, str]:
    """The model to score and the protocol (``auto`` resolved from the folder's head: a run's own, or
    for a plain folder ``*ForMultipleChoice`` → ``mc_head``, a causal LM → ``loglik``)."""
    natural = natural_head(path)
    run = find_adapter_dir(path) is not None
    if run and natural not in PROTOCOL_OF_HEAD:
        raise ConfigError(f"{path} was trained for {natural} (e.g. a GLUE task), not for the commonsense suite. "
                          f"Train with data=commonsense (a multiple-choice head or causal-LM SFT), or evaluate a "
                          f"base or merged model folder.")
    protocol = PROTOCOL_OF_HEAD[natural] if protocol == "auto" else protocol
    head = HEAD_OF_PROTOCOL[protocol]
    if run and head != natural:
        raise ConfigError(f"protocol={protocol} needs a {head} model, but {path} was trained as {natural}. Use "
                          f"protocol={PROTOCOL_OF_HEAD[natural]}{' (or generate)' if natural == 'causal_lm' else ''}.")
    return load_for_scoring(path, head, wanted=f"protocol={protocol}"), protocol


# -------------------------------------------------------------------------------------- eval
def evaluate_commonsense(path: str, cfg: EvalConfig) -> dict[str, dict]:
    """``lorafit eval PATH suite=commonsense``: score each task's test file; write the results.

    Returns:
        ``{task: {"protocol", "acc", ("acc_norm" for loglik, "no_answer" for generate), "n"}}``.
    """
    data = cfg.data
    if not isinstance(data, CommonsenseData):
        raise ConfigError(f"suite=commonsense reads data=commonsense, but data={type(data).__name__} was chosen. "
                          f"Drop the data= override (or write data=commonsense) and set data.path=DIR.")
    data.max_eval_examples = cfg.limit
    tasks = [get_commonsense_task(t).name for t in cfg.tasks] if cfg.tasks else data.task_names("test")
    rows = {task: data.rows(task) for task in tasks}  # every file is checked before the model loads
    accelerator = cfg.hardware.accelerator()
    if accelerator.num_processes > 1:
        raise ConfigError("lorafit eval suite=commonsense runs in one process; start it without accelerate launch.")
    scored, protocol = load_for_protocol(path, cfg.protocol)
    model, tokenizer, kind = scored.model.to(accelerator.device), scored.tokenizer, scored.kind
    results, predictions = {}, {}
    with Progress(console=console) as progress:
        for task in tasks:
            bar = progress.add_task(f"{protocol} {task}", total=len(rows[task]))
            metrics, records = SCORERS[protocol](model, tokenizer, rows[task], cfg, accelerator.device,
                                                 lambda n, b=bar: progress.advance(b, n))
            prompt = {} if protocol == "mc_head" else {"prompt": "chat_template" if uses_chat(tokenizer, cfg.prompt)
                                                       else "task" if protocol == "loglik" else "alpaca"}
            results[task] = {"protocol": protocol, **prompt, **metrics, "n": len(rows[task])}
            predictions[task] = records
    print_results(results, title=f"{path} [{kind}, {protocol}]")

    def write_predictions(folder: Path) -> None:
        with open(folder / "predictions.jsonl", "w") as f:
            for task, records in predictions.items():
                for record in records:
                    f.write(json.dumps({"task": task, **record}) + "\n")

    save_eval(path, cfg, results, f"lorafit eval {path} ({kind}), suite=commonsense, protocol={protocol}",
              write_predictions)
    return results
