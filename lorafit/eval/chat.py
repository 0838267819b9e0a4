"""``lorafit chat MODEL``: talk to a trained model with its chat template — to try a run.

``MODEL`` is a run folder (its adapter applied, unmerged), a merged folder or any causal-LM folder
whose tokenizer has a chat template. Interactive by default (``/reset`` starts a new conversation,
``/exit`` or Ctrl-D leaves); ``--prompt TEXT`` answers one message on stdout, for scripts.
Decoding is greedy unless ``--temperature`` is above 0; it stops at the template's end-of-turn
token (:func:`lorafit.data.chat.end_of_turn_ids`) or after ``--max-new-tokens``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers import PreTrainedTokenizerBase

from lorafit.config import ConfigError
from lorafit.console import console
from lorafit.data.chat import end_of_turn_ids, render
from lorafit.eval.load import load_for_scoring


@torch.no_grad()
def reply(model: Any, tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_new_tokens: int = 256,
          temperature: float = 0.0, streamer: Any = None) -> str:
    """The model's next assistant turn after ``messages`` (rendered with the tokenizer's chat template)."""
    text = render(tokenizer, messages, generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(model.device)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         eos_token_id=end_of_turn_ids(tokenizer) or None, pad_token_id=pad, streamer=streamer,
                         **sampling)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def load_chat_model(path: str) -> tuple[Any, PreTrainedTokenizerBase]:
    """The causal LM of ``path`` on the best device, and its tokenizer (which must carry a chat template)."""
    scored = load_for_scoring(path, "causal_lm", wanted="lorafit chat")
    if not getattr(scored.tokenizer, "chat_template", None):
        raise ConfigError(f"{path} has no chat template (its tokenizer carries none), so lorafit chat cannot render a "
                          f"conversation. Train with data=chat (data.template=chatml|llama3|alpaca) or data=instruct, "
                          f"or give a model whose tokenizer has a chat template.")
    model = scored.model
    if torch.cuda.is_available() and not getattr(model, "is_quantized", False):
        model = model.to("cuda")
    return model, scored.tokenizer


def chat(path: str, prompt: Optional[str] = None, system: Optional[str] = None, max_new_tokens: int = 256,
         temperature: float = 0.0) -> None:
    """One answer to ``prompt`` on stdout, or an interactive conversation."""
    if max_new_tokens < 1 or temperature < 0:
        raise ConfigError(f"--max-new-tokens must be at least 1 and --temperature at least 0 (got {max_new_tokens} "
                          f"and {temperature}).")
    model, tokenizer = load_chat_model(path)
    start = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        print(reply(model, tokenizer, start + [{"role": "user", "content": prompt}], max_new_tokens, temperature))
        return
    from transformers import TextStreamer

    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    messages = list(start)
    console.print(f"lorafit chat with {path}: type a message; /reset starts over, /exit (or Ctrl-D) leaves.")
    while True:
        try:
            text = console.input("[bold cyan]you>[/] ").strip()
        except EOFError:
            return
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            messages = list(start)
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": text})
        console.print("[bold green]model>[/] ", end="")
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, max_new_tokens,
                                                                temperature, streamer)})
