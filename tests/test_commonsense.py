"""The commonsense suite: parsing the LLM-Adapters layout, the three scorers, training and eval.

The fixtures under tests/fixtures/commonsense are small hand-written files in the LLM-Adapters
format (a JSON list of ``{instruction, input, output, answer}``) for all eight tasks; no test
touches the network. What is checked:

- parsing: question, choices, label, context and continuations of hand-checked rows of every
  task (ARC with 3, 4 and 5 choices, choices separated by blank lines or single spaces, a
  winogrande blank at the start, hellaswag's WikiHow tags);
- malformed files fail with the file, the row and the field named (missing field, unknown answer
  label, empty file, missing choice, wrong answer format), also through the CLI (exit code 2);
- ``acc`` / ``acc_norm`` against hand-computed values; LLM-Adapters' answer extraction;
- the ``loglik`` scorer (cached prompt, batched choices) against a brute-force reference that
  scores every prompt+choice sequence on its own, on a tiny random Llama, to 1e-4;
- multiple-choice batches padded to the most choices give the same logits and loss as each
  example alone;
- ``lorafit train data=commonsense`` (MiniLM + MC head, tiny Llama + SFT), ``merge`` and
  ``lorafit eval ... suite=commonsense`` with each protocol, as the documented commands.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pytest
import torch

from lorafit.eval.commonsense import (LoglikRequest, choice_metrics, continuation_logprobs, encode_loglik,
                                      extract_answer, loglik_batches)
from lorafit.config import ConfigError
from lorafit.data.commonsense import (COMMONSENSE_TASKS, encode_choices, get_commonsense_task, read_commonsense)
from lorafit.data.batches import collate
from lorafit.task import forward_logits, head_loss
from test_train import cli

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "commonsense"
REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "commonsense"
QUIET = ("progress=false", "eval_at_start=false", "log_every=1")

EXPECTED_COUNTS = {
    ("boolq", "test"): 4, ("boolq", "train"): 8, ("piqa", "test"): 3, ("social_i_qa", "test"): 3,
    ("hellaswag", "test"): 3, ("winogrande", "test"): 3, ("ARC-Easy", "test"): 4, ("ARC-Easy", "train"): 8,
    ("ARC-Challenge", "test"): 3, ("openbookqa", "test"): 4, ("openbookqa", "train"): 4,
}

# (task, row) -> (question, choices, label)
EXPECTED_ROWS = {
    ("boolq", 0): ("is the moon bigger than the earth", ["true", "false"], 1),
    ("piqa", 1): ("To loosen a tight jar lid,", ["pour ice water over the lid for a minute.",
                                                 "run the lid under hot water for a minute."], 1),
    ("piqa", 2): ("Clean a paint brush after using oil paint.",
                  ["Rinse the brush in mineral spirits, then wash it with soap.",
                   "Rinse the brush in milk, then dry it in the sun."], 0),
    ("social_i_qa", 2): ("Alex dropped a glass in the kitchen and it shattered. What will Alex want to do next?",
                         ["walk on the glass barefoot", "leave the house for a week", "sweep up the broken pieces"], 2),
    ("hellaswag", 0): ("Making tea: A woman fills a kettle with water and places it on the stove. She",
                       ["throws the kettle out of the window.",
                        "waits for the water to boil and pours it over a tea bag.", "paints the kettle bright blue.", "puts the stove in the refrigerator."], 1),
    ("winogrande", 1): ("Sam lent his umbrella to Ben because _ was going out into the rain.", ["Sam", "Ben"], 1),
    ("ARC-Easy", 1): ("What do plants need to make their own food?", ["sunlight", "sand", "plastic"], 0),
    ("ARC-Easy", 2): ("Which state of matter has a fixed shape?", ["gas", "liquid", "plasma", "steam", "solid"], 4),
    ("ARC-Challenge", 2): ("Why does a metal spoon feel colder than a wooden spoon at the same temperature?",
                           ["metal conducts heat away from the hand faster", "metal is always colder",
                            "wood makes its own heat"], 0),
    ("openbookqa", 3): ("The moon is visible at night because it",
                        ["makes its own light", "is on fire", "is very close to Mars",
                         "reflects light from the sun"], 3),
}


def results_of(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


# ----------------------------------------------------------------------------------- parsing
def test_the_eight_tasks() -> None:
    assert list(COMMONSENSE_TASKS) == ["boolq", "piqa", "social_i_qa", "hellaswag", "winogrande", "ARC-Easy",
                                       "ARC-Challenge", "openbookqa"]
    assert get_commonsense_task("arc_easy").name == "ARC-Easy"
    with pytest.raises(ConfigError, match="Unknown commonsense task 'siqa'.*social_i_qa"):
        get_commonsense_task("siqa")


@pytest.mark.parametrize(("task", "split"), list(EXPECTED_COUNTS))
def test_every_fixture_file_parses(task: str, split: str) -> None:
    rows = read_commonsense(FIXTURES, task, split)
    assert len(rows) == EXPECTED_COUNTS[(task, split)]
    for i, row in enumerate(rows):
        assert row["idx"] == i and row["task"] == task
        assert len(row["choices"]) == len(row["continuations"]) == len(row["answers"]) >= 2
        assert row["answers"][row["label"]] == row["answer"]
        assert all(row["choices"]) and row["question"] and not row["question"].startswith("Please")


@pytest.mark.parametrize(("task", "index"), list(EXPECTED_ROWS))
def test_specific_rows(task: str, index: int) -> None:
    row = read_commonsense(FIXTURES, task)[index]
    assert (row["question"], row["choices"], row["label"]) == EXPECTED_ROWS[(task, index)]


def test_question_tasks_score_the_choices_after_the_question() -> None:
    row = read_commonsense(FIXTURES, "ARC-Easy")[0]
    assert row["context"] == row["question"] and row["continuations"] == row["choices"]


def test_winogrande_context_is_the_text_before_the_blank() -> None:
    rows = read_commonsense(FIXTURES, "winogrande")
    assert rows[0]["context"] == "The trophy did not fit in the suitcase because the"
    assert rows[0]["continuations"] == ["trophy was too small.", "suitcase was too small."]
    assert rows[2]["context"] == ""  # the blank opens the sentence
    assert rows[2]["continuations"][1] == "Maria cooked dinner for Maria because Lucy loved to cook."


def test_hellaswag_tags_are_cleaned_for_scoring_only() -> None:
    row = read_commonsense(FIXTURES, "hellaswag")[1]
    assert row["question"].startswith("Home and Garden: [header] How to water")
    assert row["context"] == ("Home and Garden: How to water a cactus. Check the soil first. "
                              "Push a finger into the soil.")
    assert row["choices"][2] == "[title] Paint the pot. [step] Use a red marker on the spines."
    assert row["continuations"][2] == "Paint the pot. Use a red marker on the spines."


# ------------------------------------------------------------------------ malformed data files
GOOD = {"instruction": "Please choose the correct answer to the question: Which is a fruit?\n\nAnswer1: apple "
                       "Answer2: chair Answer3: rock\n\nAnswer format: answer1/answer2/answer3",
        "input": "", "output": "the correct answer is answer1", "answer": "answer1"}


def _bad_file(tmp_path: Path, content, task: str = "ARC-Easy") -> Path:
    folder = tmp_path / task
    folder.mkdir(parents=True)
    text = content if isinstance(content, str) else json.dumps(content)
    (folder / "test.json").write_text(text)
    return folder / "test.json"


@pytest.mark.parametrize(("content", "patterns"), [
    ([GOOD, {k: v for k, v in GOOD.items() if k != "answer"}], ["row 1", "field 'answer'", "is missing"]),
    ([{k: v for k, v in GOOD.items() if k != "instruction"}], ["row 0", "field 'instruction'", "is missing"]),
    ([GOOD, GOOD, {**GOOD, "answer": "answer4"}], ["row 2", "field 'answer'", "'answer4' is not one of",
                                                  "answer1/answer2/answer3"]),
    ([{**GOOD, "answer": "C"}], ["row 0", "field 'answer'", "'C'"]),
    ([{**GOOD, "instruction": GOOD["instruction"].replace("Answer3: rock", "rock")}],
     ["row 0", "field 'instruction'", "no 'Answer3:' found"]),
    ([{**GOOD, "instruction": GOOD["instruction"].replace("Answer format: answer1/answer2/answer3", "")}],
     ["row 0", "field 'instruction'", "no 'Answer format:' line"]),
    ([{**GOOD, "instruction": GOOD["instruction"].replace("answer1/answer2/answer3", "solution1/solution2")}],
     ["row 0", "field 'instruction'", "not a ARC-Easy answer format", "right task folder"]),
    ([{**GOOD, "answer": ""}], ["row 0", "field 'answer'", "non-empty string"]),
    ([GOOD, "just a string"], ["row 1", "not an object"]),
    ("", ["is empty"]),
    ("   \n", ["is empty"]),
    ([], ["empty list"]),
    ("[{\"instruction\": ", ["not valid JSON"]),
    ({"rows": []}, ["a JSON dict", "non-empty JSON list"]),
], ids=["missing_answer", "missing_instruction", "unknown_label", "letter_label", "missing_choice",
        "no_answer_format", "other_task_format", "empty_answer", "row_not_object", "empty_file", "blank_file",
        "empty_list", "bad_json", "not_a_list"])
def test_malformed_files_name_file_row_and_field(tmp_path: Path, content, patterns: list[str]) -> None:
    path = _bad_file(tmp_path, content)
    with pytest.raises(ConfigError) as info:
        read_commonsense(tmp_path, "ARC-Easy")
    message = str(info.value)
    assert str(path) in message
    for pattern in patterns:
        assert pattern in message, message


def test_winogrande_without_a_blank_is_refused(tmp_path: Path) -> None:
    row = {"instruction": "Please choose the correct answer to fill in the blank to complete the given sentence: "
                          "No blank here.\n\nOption1: a\n\nOption2: b\n\nAnswer format: option1/option2",
           "input": "", "output": "", "answer": "option1"}
    _bad_file(tmp_path, [row], task="winogrande")
    with pytest.raises(ConfigError, match=r"row 0 .*field 'instruction'.*exactly one blank '_', found 0"):
        read_commonsense(tmp_path, "winogrande")


def test_missing_file_lists_the_folder(tmp_path: Path) -> None:
    (tmp_path / "piqa").mkdir()
    (tmp_path / "piqa" / "train.json").write_text("[]")
    with pytest.raises(ConfigError, match=r"piqa/test.json does not exist.*holds: train.json"):
        read_commonsense(tmp_path, "piqa")


def test_malformed_file_through_the_cli(tmp_path: Path, minilm_dir: str) -> None:
    _bad_file(tmp_path / "cs", [GOOD, {**GOOD, "answer": "answer9"}])
    code, text = cli("eval", minilm_dir, "suite=commonsense", "tasks=[ARC-Easy]", f"data.path={tmp_path / 'cs'}",
                     f"output_dir={tmp_path / 'eval'}")
    assert code == 2, text
    assert "ARC-Easy/test.json," in text.replace(" ", "")  # the terminal may fold a long path
    assert "row 1 (0-based" in text and "field 'answer'" in text and "Traceback" not in text


# -------------------------------------------------------------------------- metric functions
def test_acc_and_acc_norm_by_hand() -> None:
    logliks = [[-4.0, -6.0], [-10.0, -9.0, -12.0], [-3.0, -8.0], [-2.0, -2.0]]
    lengths = [[5, 20], [10, 5, 30], [4, 4], [3, 3]]
    labels = [1, 2, 0, 1]
    # argmax of the sums: 0, 1, 0, 0 (a tie goes to the first choice) -> 1 of 4 right
    # per character: [-0.8, -0.3] -> 1; [-1.0, -1.8, -0.4] -> 2; [-0.75, -2.0] -> 0; tie -> 0: 3 of 4
    assert choice_metrics(logliks, lengths, labels) == {"acc": 0.25, "acc_norm": 0.75}


@pytest.mark.parametrize(("task", "text", "expected"), [
    ("ARC-Easy", "the correct answer is answer3, not answer1", "answer3"),
    ("ARC-Easy", "answer5", "answer5"),
    ("boolq", "  I think it is false; true would be wrong", "false"),
    ("piqa", "solution2", "solution2"),
    ("hellaswag", "ending4 fits", "ending4"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("social_i_qa", "The correct answer is Answer2", None),  # case-sensitive, as LLM-Adapters
    ("boolq", "yes", None),
])
def test_extract_answer_is_the_first_match(task: str, text: str, expected: Optional[str]) -> None:
    assert extract_answer(get_commonsense_task(task), text) == expected


# ----------------------------------------------------------------------------------- loglik
@pytest.fixture(scope="module")
def tiny_llama(make_tiny_llama_cfg):
    from lorafit.models import load_model, load_tokenizer

    cfg = make_tiny_llama_cfg()
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    return load_model(cfg, "causal_lm", tokenizer=tokenizer).eval(), tokenizer


def all_fixture_rows() -> list[dict]:
    return [row for task in COMMONSENSE_TASKS for row in read_commonsense(FIXTURES, task)]


@torch.no_grad()
def brute_force(model, request: LoglikRequest) -> list[float]:
    """Score each prompt+choice sequence on its own: no padding, no cache, no batching."""
    sums = []
    for ids in request.continuation_ids:
        logp = torch.log_softmax(model(torch.tensor([request.prompt_ids + ids])).logits[0].double(), -1)
        start = len(request.prompt_ids) - 1
        sums.append(sum(float(logp[start + t, token]) for t, token in enumerate(ids)))
    return sums


def test_loglik_matches_brute_force(tiny_llama) -> None:
    model, tokenizer = tiny_llama
    requests = [encode_loglik(row, tokenizer, max_length=128) for row in all_fixture_rows()]
    assert len({len(r.prompt_ids) for r in requests}) > 5
    assert {len(r.continuation_ids) for r in requests} == {2, 3, 4, 5}
    got = []
    for batch in loglik_batches(requests, batch_size=6):  # mixed prompt lengths and choice counts
        got += continuation_logprobs(model, batch, tokenizer.pad_token_id, torch.device("cpu"))
    worst = max(abs(a - b) for r, g in zip(requests, got) for a, b in zip(g, brute_force(model, r)))
    assert worst < 1e-4, worst
    one_by_one = [continuation_logprobs(model, [r], tokenizer.pad_token_id, torch.device("cpu"))[0] for r in requests]
    assert max(abs(a - b) for g, o in zip(got, one_by_one) for a, b in zip(g, o)) < 1e-4


def test_loglik_encoding(tiny_llama) -> None:
    _, tokenizer = tiny_llama
    row = read_commonsense(FIXTURES, "ARC-Easy")[0]
    request = encode_loglik(row, tokenizer, max_length=128)
    prompt = tokenizer(f"Question: {row['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
    assert request.prompt_ids == prompt  # MiniLM's tokenizer has no BOS
    assert request.continuation_ids[1] == tokenizer(" the Sun", add_special_tokens=False)["input_ids"]
    assert request.continuation_chars == [len(" " + c) for c in row["choices"]] and request.label == 1
    short = encode_loglik(row, tokenizer, max_length=8)  # the prompt loses its first tokens
    assert short.prompt_ids == prompt[-(8 - max(map(len, request.continuation_ids))):]
    blank_first = read_commonsense(FIXTURES, "winogrande")[2]
    assert encode_loglik(blank_first, tokenizer, 128).prompt_ids == [tokenizer.cls_token_id]


def test_loglik_batches_respect_the_budgets() -> None:
    requests = [LoglikRequest([1], [[1] * 10] * 4, [10] * 4, 0) for _ in range(10)]
    assert [len(b) for b in loglik_batches(requests, batch_size=4)] == [4, 4, 2]
    assert [len(b) for b in loglik_batches(requests, batch_size=64, max_tokens=100)] == [2] * 5
    assert [len(b) for b in loglik_batches(requests, batch_size=64, max_tokens=10)] == [1] * 10


# -------------------------------------------------------------------- multiple-choice batches
def test_padded_choices_change_nothing(minilm_dir: str) -> None:
    from transformers import AutoModelForMultipleChoice, AutoTokenizer, BertConfig

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    torch.manual_seed(0)
    model = AutoModelForMultipleChoice.from_config(BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64)).eval()
    rows = read_commonsense(FIXTURES, "ARC-Easy")  # 4, 3, 5 and 4 choices
    features = [encode_choices(tokenizer, row, 64) for row in rows]
    batch = collate(features, tokenizer.pad_token_id)
    assert batch["input_ids"].shape[:2] == (4, 5)
    assert batch["choice_mask"].tolist()[1] == [True, True, True, False, False]
    with torch.no_grad():
        logits = forward_logits(model, batch)
        alone = [forward_logits(model, collate([f], tokenizer.pad_token_id))[0] for f in features]
    for row, got, want in zip(logits, batch["choice_mask"], alone):
        n = len(want)
        assert float((row[:n] - want).abs().max()) < 1e-5
        assert (row[n:] == torch.finfo(row.dtype).min).all() and got[:n].all()
    total = head_loss(logits, batch["labels"], "multiple_choice")
    each = sum(float(head_loss(w[None], torch.tensor([f["labels"]]), "multiple_choice"))
               for w, f in zip(alone, features))
    assert abs(float(total) - each) < 1e-4


# ---------------------------------------------------------------------- train, merge, eval
@pytest.fixture(scope="module")
def mc_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM + LoRA + a multiple-choice head, 3 steps on the ARC-Easy fixture's train file."""
    run = tmp_path_factory.mktemp("mc") / "run"
    code, text = cli("train", "model=minilm", "data=commonsense", f"data.path={FIXTURES}", "data.tasks=[ARC-Easy]",
                     "max_steps=3", "data.batch_size=4", "optimizer.lr=5e-3", f"output_dir={run}", *QUIET)
    assert code == 0, text
    return run


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tiny_llama + LoRA, causal-LM SFT on the ARC-Easy and boolq train files (objective auto)."""
    run = tmp_path_factory.mktemp("sft") / "run"
    code, text = cli("train", "model=tiny_llama", "data=commonsense", f"data.path={FIXTURES}",
                     "data.tasks=[ARC-Easy,boolq]", "max_steps=3", "data.batch_size=8", "optimizer.lr=2e-3",
                     f"output_dir={run}", *QUIET)
    assert code == 0, text
    return run


def test_mc_head_training_run(mc_run: Path) -> None:
    from lorafit.config import load_run_config

    cfg = load_run_config(mc_run)
    assert cfg.data.objective == "mc_head" and cfg.data.head == "multiple_choice"
    meta = json.loads((mc_run / "adapter" / "lorafit_adapter.json").read_text())
    assert meta["task"] == "multiple_choice" and "classifier" in meta["modules_to_save"]
    results = results_of(mc_run)  # dev score during training: the ARC-Easy test file
    assert set(results) == {"ARC-Easy"} and results["ARC-Easy"]["n"] == 4
    losses = [json.loads(line)["loss"] for line in (mc_run / "metrics.jsonl").read_text().splitlines()
              if "split" not in json.loads(line)]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_mc_head_eval_of_the_run_and_of_its_merge(mc_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    code, text = cli("eval", str(mc_run), "suite=commonsense", "protocol=mc_head", "tasks=[ARC-Challenge,openbookqa]",
                     f"data.path={FIXTURES}", "limit=100", f"output_dir={out}", "save_predictions=true")
    assert code == 0, text
    results = results_of(out)
    assert list(results) == ["ARC-Challenge", "openbookqa"]
    assert [results[t]["n"] for t in results] == [3, 4]
    assert all(r["protocol"] == "mc_head" and 0 <= r["acc"] <= 1 for r in results.values())
    table = (out / "results.md").read_text()
    assert "| task | protocol | acc | n |" in table and "| openbookqa | mc_head |" in table

    merged = tmp_path / "merged"
    code, text = cli("merge", str(mc_run), str(merged))
    assert code == 0, text
    assert json.loads((merged / "config.json").read_text())["architectures"] == ["BertForMultipleChoice"]
    code, text = cli("eval", str(merged), "suite=commonsense", "tasks=[ARC-Challenge,openbookqa]",  # protocol auto
                     f"data.path={FIXTURES}", f"output_dir={tmp_path / 'eval_merged'}", "save_predictions=true")
    assert code == 0, text
    assert (tmp_path / "eval_merged" / "predictions.jsonl").read_text() == (out / "predictions.jsonl").read_text()

    code, text = cli("eval", str(mc_run), "suite=commonsense", "tasks=[ARC-Easy]", f"data.path={FIXTURES}", "limit=2",
                     f"output_dir={tmp_path / 'limited'}")
    assert code == 0, text
    assert results_of(tmp_path / "limited")["ARC-Easy"]["n"] == 2


def test_loglik_and_generate_on_a_decoder(sft_run: Path, tmp_path: Path) -> None:
    from lorafit.config import load_run_config

    assert load_run_config(sft_run).data.objective == "causal_lm"
    merged = tmp_path / "merged"
    code, text = cli("merge", str(sft_run), str(merged))
    assert code == 0, text
    preds = {}
    for name, model in (("merged", merged), ("run", sft_run)):
        out = tmp_path / f"eval_{name}"
        code, text = cli("eval", str(model), "suite=commonsense", "protocol=loglik", "tasks=[winogrande]",
                         f"data.path={FIXTURES}", "limit=40", f"output_dir={out}", "save_predictions=true")
        assert code == 0, text
        result = results_of(out)["winogrande"]
        assert result["protocol"] == "loglik" and result["n"] == 3
        assert 0 <= result["acc"] <= 1 and 0 <= result["acc_norm"] <= 1
        preds[name] = [json.loads(line)["loglik"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert max(abs(a - b) for x, y in zip(preds["run"], preds["merged"]) for a, b in zip(x, y)) < 1e-3

    out = tmp_path / "eval_generate"
    code, text = cli("eval", str(sft_run), "suite=commonsense", "protocol=generate", "tasks=[boolq,piqa]",
                     f"data.path={FIXTURES}", "limit=2", "max_new_tokens=4", f"output_dir={out}")
    assert code == 0, text
    results = results_of(out)
    assert all(r["protocol"] == "generate" and r["n"] == 2 and 0 <= r["no_answer"] <= 2 for r in results.values())


def test_protocol_must_fit_the_model(mc_run: Path, sft_run: Path, tmp_path: Path) -> None:
    code, text = cli("eval", str(mc_run), "suite=commonsense", "protocol=loglik", "tasks=[piqa]",
                     f"data.path={FIXTURES}", f"output_dir={tmp_path}")
    assert code == 2 and "protocol=loglik needs a causal_lm model" in text and "Use protocol=mc_head" in text
    code, text = cli("eval", str(sft_run), "suite=commonsense", "protocol=mc_head", "tasks=[piqa]",
                     f"data.path={FIXTURES}", f"output_dir={tmp_path}")
    assert code == 2 and "Use protocol=loglik (or generate)" in text and "Traceback" not in text
    code, text = cli("eval", str(sft_run), "protocol=loglik", "data.task=sst2")
    assert code == 2 and "protocol=loglik applies to suite=commonsense only" in text
    code, text = cli("eval", str(sft_run), "suite=commonsense", "tasks=[siqa]", f"data.path={FIXTURES}")
    assert code == 2 and "Unknown commonsense task 'siqa'" in text


def test_causal_training_needs_the_output_field(tmp_path: Path) -> None:
    rows = [{k: v for k, v in GOOD.items() if k != "output"}] * 8
    folder = tmp_path / "cs" / "ARC-Easy"
    folder.mkdir(parents=True)
    (folder / "train.json").write_text(json.dumps(rows))
    code, text = cli("train", "model=tiny_llama", "data=commonsense", f"data.path={tmp_path / 'cs'}",
                     "max_steps=1", "data.batch_size=4", f"output_dir={tmp_path / 'run'}", *QUIET)
    assert code == 2 and "ARC-Easy/train.json," in text.replace(" ", "")
    assert "row 0 (0-based" in text and "field 'output'" in text


# -------------------------------------------------------------------------------- real files
REAL_COUNTS = {("boolq", "test"): 3270, ("piqa", "test"): 1838, ("ARC-Easy", "test"): 2376,
               ("boolq", "train"): 9427, ("ARC-Easy", "train"): 2251}


@pytest.mark.slow
@pytest.mark.parametrize(("task", "split"), list(REAL_COUNTS))
def test_real_files_parse(task: str, split: str) -> None:
    path = REAL / task / f"{split}.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (real LLM-Adapters files are optional)")
    rows = read_commonsense(REAL, task, split)
    assert len(rows) == REAL_COUNTS[(task, split)]
    assert {len(r["choices"]) for r in rows} <= {2, 3, 4, 5}
    assert all(r["answers"][r["label"]] == r["answer"] for r in rows)


@pytest.mark.slow
def test_loglik_on_the_real_files(tiny_llama, tmp_path: Path) -> None:
    from lorafit.models import save_base

    if not all((REAL / t / "test.json").is_file() for t in ("boolq", "piqa", "ARC-Easy")):
        pytest.skip(f"real LLM-Adapters test files not found under {REAL} (optional check)")
    model, tokenizer = tiny_llama
    save_base(model, tokenizer, tmp_path / "tiny")
    out = tmp_path / "eval"
    code, text = cli("eval", str(tmp_path / "tiny"), "suite=commonsense", "protocol=loglik",
                     "tasks=[boolq,piqa,ARC-Easy]", f"data.path={REAL}", "data.max_length=128", "limit=50",
                     f"output_dir={out}")
    assert code == 0, text
    results = results_of(out)
    assert list(results) == ["boolq", "piqa", "ARC-Easy"]
    assert all(r["n"] == 50 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 for r in results.values())
