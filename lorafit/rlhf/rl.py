"""RL with an adapter policy and the adapter-off anchor (PE-RLHF, arXiv 2403.10704, Sec. 3).

The policy ``π`` is the backbone + adapter; the reference ``π_ref`` is the *same* backbone run
with every adapter switched off (:func:`lorafit.adapters.adapters_disabled`), so the anchor costs
one extra no-grad forward and no second copy of the weights.

One optimizer step, per micro-batch of prompts (``data=instruct``: the prompt part of each row;
``data=chat``: each conversation up to its final assistant turn, in the run's chat template):

1. sample ``k = task.samples_per_prompt`` completions per prompt (temperature, top-p, at most
   ``max_new_tokens``; a completion ends at EOS or the template's end-of-turn token, which it keeps);
2. per-token log-probs under ``π`` (with gradient) and ``π_ref`` (adapters off, no gradient);
3. reward ``r`` from the reward model (``reward.run``) or a function (``reward.function``);
   the shaped return is ``R = r - β · KL`` with the **k1** estimator
   ``KL = Σ_t (log π(y_t) - log π_ref(y_t))`` over the completion tokens (Ziegler et al. 2019;
   Ouyang et al. 2022, Eq. 2), computed under the sampling policy (no gradient);
4. advantages by **RLOO** (Ahmadian et al. 2024): ``A_i = R_i - mean_{j≠i} R_j`` within a prompt's
   ``k`` samples (no value network);
5. loss: ``estimator=rloo`` (default) ``-A_i Σ_t log π(y_t)``; ``estimator=ppo`` the clipped
   surrogate ``-min(ρ_t A_i, clip(ρ_t, 1-ε, 1+ε) A_i)`` averaged over the completion tokens,
   ``ρ_t = π/π_old`` (Schulman et al. 2017), each sample batch reused for ``ppo_epochs`` steps.
   Both are averaged over a prompt's ``k`` samples, so the trainer normalises by prompts.

Logged every step: ``reward_mean``, ``reward_std`` (the raw reward ``r``), ``kl`` (mean k1 per
completion), ``entropy`` (mean per completion token), ``clip_frac`` (PPO; 0 for RLOO) and
``completion_len``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lorafit.adapters import adapters_disabled
from lorafit.config import ConfigError, check_choice, check_range
from lorafit.data.batches import IGNORE_INDEX
from lorafit.data.chat import end_of_turn_ids
from lorafit.callbacks import Callback
from lorafit.rlhf.reward import encode_responses, load_reward_model, score_ids
from lorafit.task import evaluate_head

RewardFn = Callable[[list[str], list[str], list[list[int]]], Sequence[float]]


# ------------------------------------------------------------------------------------- maths
def token_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   n_completion: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the last ``n_completion`` tokens of each row, and the policy's entropy there, under
    the distribution that sampled them: ``softmax(logits / temperature)`` (as TRL computes them), so that
    the PPO ratio and the KL are on-policy at any sampling temperature.

    Rows are left-padded prompts followed by completions; positions count real tokens only, as in
    generation. Returns two ``(n, n_completion)`` fp32 tensors.
    """
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    logits = logits[:, -n_completion - 1:-1].float() / temperature
    logp_all = F.log_softmax(logits, dim=-1)
    targets = input_ids[:, -n_completion:]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence KL estimate ``Σ_t (log π(y_t) - log π_ref(y_t))`` over ``mask``ed tokens (k1)."""
    return ((logp - ref_logp) * mask).sum(-1)


def rloo_advantages(returns: torch.Tensor) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): ``A_i = R_i - (Σ_j R_j - R_i)/(k-1)`` per row of ``(prompts, k)``."""
    k = returns.shape[-1]
    baseline = (returns.sum(-1, keepdim=True) - returns) / (k - 1)
    return returns - baseline


def rloo_loss(logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """REINFORCE with the leave-one-out baseline: per sequence ``-A_i Σ_t log π(y_t)``, shape ``(n,)``."""
    return -advantages * (logp * mask).sum(-1)


def ppo_clip_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                  clip_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), one advantage per sequence.

    Returns the per-sequence loss (mean over its completion tokens) ``(n,)`` and the per-token
    clip indicator ``|ρ - 1| > ε`` ``(n, T)``.
    """
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(-1)
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    per_seq = -(surrogate * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    clipped = ((ratio - 1).abs() > clip_eps) & mask.bool()
    return per_seq, clipped


def completion_mask(completions: torch.Tensor, stop: int | list[int]) -> torch.Tensor:
    """1 for completion tokens up to and including the first stop token (EOS, end of turn), 0 after it."""
    stop = [stop] if isinstance(stop, int) else stop
    if not stop:
        return torch.ones_like(completions, dtype=torch.float32)
    is_eos = torch.isin(completions, torch.tensor(stop, device=completions.device)).long()
    after = (is_eos.cumsum(-1) - is_eos) > 0
    return (~after).float()


# ------------------------------------------------------------------------------------- sampling
def prompts_of(batch: dict[str, torch.Tensor]) -> list[list[int]]:
    """The prompt token ids of each SFT or chat row: its real tokens before the last learnt span (an
    instruction's prompt; a conversation up to its final assistant turn, generation prompt included)."""
    prompts = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        learnt = (labels != IGNORE_INDEX).tolist()
        start = max((i for i, on in enumerate(learnt) if on), default=len(ids))
        while start > 0 and learnt[start - 1]:
            start -= 1
        keep = mask[:start] == 1
        prompts.append(ids[:start][keep].tolist())
    return prompts


def left_pad(seqs: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one length: ``(input_ids, attention_mask)``."""
    longest = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (longest - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (longest - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


@dataclass
class Rollout:
    """Sampled completions of one micro-batch (prompts repeated ``k`` times, ``k`` adjacent)."""

    input_ids: torch.Tensor       # (n, P + T): left-padded prompt, then completion
    attention_mask: torch.Tensor  # (n, P + T)
    mask: torch.Tensor            # (n, T) completion tokens that count
    prompts: list[str]
    completions: list[str]
    completion_ids: list[list[int]]
    old_logp: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None
    stats: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def sample(model: nn.Module, tokenizer: Any, prompts: list[list[int]], k: int, max_new_tokens: int,
           temperature: float, top_p: float, synced: bool = False) -> Rollout:
    """Sample ``k`` completions per prompt with ``model.generate`` (the adapter on). ``synced``: every
    process keeps running forwards until all have finished (a sharded model's forwards are collectives)."""
    device = next(model.parameters()).device
    repeated = [p for p in prompts for _ in range(k)]
    ids, mask = left_pad(repeated, tokenizer.pad_token_id, device)
    eos_id = stop_ids(tokenizer)
    was_training = model.training
    model.eval()
    out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=top_p,
                         top_k=0, max_new_tokens=max_new_tokens, min_new_tokens=1, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=eos_id, synced_gpus=synced)
    model.train(was_training)
    completions = out[:, ids.shape[1]:]
    cmask = completion_mask(completions, eos_id)
    full_mask = torch.cat([mask, cmask.long()], dim=1)
    kept = [c[m.bool()].tolist() for c, m in zip(completions, cmask)]
    return Rollout(out, full_mask, cmask,
                   prompts=tokenizer.batch_decode(repeated, skip_special_tokens=True),
                   completions=tokenizer.batch_decode(kept, skip_special_tokens=True), completion_ids=kept)


def stop_ids(tokenizer: Any) -> list[int]:
    """The ids that end a completion: the chat template's end of turn (and EOS), else EOS, else SEP
    (BERT-style tokenizers)."""
    if getattr(tokenizer, "chat_template", None):
        found = end_of_turn_ids(tokenizer)
        if found:
            return found
    single = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return [] if single is None else [single]


# ------------------------------------------------------------------------------------- rewards
@dataclass
class RewardConfig:
    """Where ``task=rl`` gets its rewards: exactly one of ``run`` and ``function``.

    Attributes:
        run: a ``lorafit train task=reward`` run folder; its adapter and head score
            ``format_conversation(prompt, completion)``.
        function: a Python import path ``package.module:function`` (or ``package.module.function``)
            called as ``function(prompts, completions, completion_ids)`` → one float per completion.
        batch_size: completions per reward-model forward pass.
    """

    run: Optional[str] = None
    function: Optional[str] = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.run and self.function:
            raise ConfigError(f"reward.run={self.run!r} and reward.function={self.function!r} are both set; "
                              f"rewards come from one source. Drop one of them.")
        check_range("reward.batch_size", self.batch_size, 1)

    def build(self, device: torch.device, max_length: int) -> RewardFn:
        """The reward function: a loaded reward model, or the imported function."""
        if self.function:
            return import_function(self.function)
        if not self.run:
            raise ConfigError("task=rl needs a reward: reward.run=RM_RUN (a `lorafit train task=reward` run) or "
                              "reward.function=package.module:function (a programmatic reward).")
        assembled = load_reward_model(self.run, device)

        def reward_model(prompts: list[str], completions: list[str], completion_ids: list[list[int]]) -> torch.Tensor:
            # encoded as in training: prompt cut from the left, completion from the right
            ids = [encode_responses(assembled.tokenizer, [{"role": "user", "content": p}], [c], max_length)[0]
                   for p, c in zip(prompts, completions)]
            with torch.no_grad():
                return score_ids(assembled.model, assembled.tokenizer, ids, self.batch_size, device)

        return reward_model


def import_function(path: str) -> RewardFn:
    """Import ``package.module:function`` or ``package.module.function``."""
    module_name, sep, name = path.partition(":")
    if not sep:
        module_name, _, name = path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"reward.function={path!r} cannot be imported ({exc}). Give an import path like "
                          f"lorafit.rlhf.toy:token_range_fraction, importable from this Python.") from None
    if not callable(fn):
        raise ConfigError(f"reward.function={path!r} is not callable. Name a function "
                          f"f(prompts, completions, completion_ids) -> list of floats.")
    return fn


# ------------------------------------------------------------------------------------- task
@dataclass
class RLTask:
    """``task=rl``: optimise the adapter policy against a reward, KL-anchored to the adapter-off base.

    Attributes:
        estimator: ``rloo`` (default: REINFORCE with the leave-one-out baseline) or ``ppo``
            (clipped surrogate on the same advantages; no value head).
        samples_per_prompt: ``k`` completions per prompt (at least 2, for the baseline).
        max_new_tokens / temperature: sampling; the policy's and the anchor's log-probabilities are
            taken at the same temperature. top_p: must stay 1 (nucleus sampling would be off-policy).
        kl_coef: ``β`` of the shaped return ``r - β·KL``.
        clip_eps: PPO's ``ε``.
        ppo_epochs: PPO: optimizer steps taken on each batch of samples (1 = fresh samples every step).
        reward: where rewards come from (``task.reward.run`` / ``task.reward.function``; the
            top-level ``reward.run=`` / ``reward.function=`` of earlier versions still work).
    """

    estimator: str = "rloo"
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    kl_coef: float = 0.05
    clip_eps: float = 0.2
    ppo_epochs: int = 1
    reward: RewardConfig = field(default_factory=lambda: RewardConfig())

    def __post_init__(self) -> None:
        check_choice("task.estimator", self.estimator, ["rloo", "ppo"])
        check_range("task.samples_per_prompt", self.samples_per_prompt, 2)
        check_range("task.max_new_tokens", self.max_new_tokens, 1)
        check_range("task.temperature", self.temperature, 0.0, low_inclusive=False)
        check_range("task.top_p", self.top_p, 0.0, 1.0, low_inclusive=False)
        if self.top_p < 1:
            raise ConfigError(f"task.top_p={self.top_p}: nucleus sampling draws from a truncated distribution that "
                              f"is not the policy whose log-probabilities the update and the KL use, so the RL step "
                              f"would be off-policy. Keep task.top_p=1 and sharpen with task.temperature (below 1) "
                              f"instead, which the log-probabilities follow.")
        check_range("task.kl_coef", self.kl_coef, 0.0)
        check_range("task.clip_eps", self.clip_eps, 0.0, 1.0, low_inclusive=False)
        check_range("task.ppo_epochs", self.ppo_epochs, 1)
        if self.estimator == "rloo" and self.ppo_epochs != 1:
            raise ConfigError(f"task.ppo_epochs={self.ppo_epochs} needs task.estimator=ppo (RLOO is on-policy: "
                              f"every step samples afresh). Add task.estimator=ppo or drop task.ppo_epochs.")
        self._reward_fn: Optional[RewardFn] = None
        self._cache: dict[int, Rollout] = {}
        self._micro = 0
        self._stats: list[dict[str, Any]] = []

    # -- the lorafit.task.Task protocol
    def prepare(self, cfg: Any) -> None:
        """Check model, data and reward fit RL; the reward source is loaded at the first step."""
        if cfg.data.head != "causal_lm":
            raise ConfigError(f"task=rl samples completions from a causal LM, so it needs prompts from data=instruct "
                              f"or data=chat (data.path=FILE); data={type(cfg.data).__name__} was chosen.")
        if getattr(cfg.data, "packing", False):
            raise ConfigError("task=rl samples completions for each prompt on its own, so data.packing=true does not "
                              "apply to it. Set data.packing=false.")
        if not (self.reward.run or self.reward.function):
            raise ConfigError("task=rl needs a reward: reward.run=RM_RUN (a `lorafit train task=reward` run) or "
                              "reward.function=package.module:function (e.g. lorafit.rlhf.toy:token_range_fraction).")
        if self.reward.function:
            import_function(self.reward.function)  # fail now, not at the first step

    def callbacks(self) -> list[Callback]:
        return [RLStepCallback(self)]

    def count_units(self, batch: dict[str, torch.Tensor]) -> int:
        """Loss terms of a micro-batch: one per prompt."""
        return int(batch["input_ids"].shape[0])

    def forward(self, trainer: Any, batch: dict[str, torch.Tensor], model: nn.Module) -> tuple[None, torch.Tensor]:
        """Sample (or reuse, PPO), score, and return the micro-batch's summed per-prompt loss (no
        outputs: the loss depends on samples, not on logits of the batch alone)."""
        k = self.samples_per_prompt
        key = self._micro
        self._micro += 1
        fresh = trainer.step % self.ppo_epochs == 0 or key not in self._cache
        if fresh:
            rollout = sample(trainer.unwrapped(), trainer.assembled.tokenizer, prompts_of(batch), k,
                             self.max_new_tokens, self.temperature, self.top_p, synced=getattr(trainer, "sharded", False))
        else:
            rollout = self._cache[key]
        n_completion = rollout.mask.shape[1]
        logp, entropy = token_logprobs(model, rollout.input_ids, rollout.attention_mask, n_completion,
                                       self.temperature)
        mask = rollout.mask
        if fresh:
            rollout.old_logp = logp.detach()
            self._score(trainer, rollout)
            if self.estimator == "ppo" and self.ppo_epochs > 1:
                self._cache[key] = rollout
        if self.estimator == "ppo":
            per_seq, clipped = ppo_clip_loss(logp, rollout.old_logp, rollout.advantages, mask, self.clip_eps)
        else:
            per_seq, clipped = rloo_loss(logp, rollout.advantages, mask), torch.zeros_like(mask, dtype=torch.bool)
        n_tokens = float(mask.sum())
        self._stats.append({**rollout.stats, "entropy_sum": float((entropy.detach() * mask).sum()),
                            "clipped": float(clipped.sum()), "tokens": n_tokens})
        return None, per_seq.sum() / k

    def evaluate(self, trainer: Any, dataset: Any) -> dict[str, float]:
        """The held-out prompts' language-model loss, as ``task=supervised`` scores them."""
        return evaluate_head(trainer, dataset)

    @torch.no_grad()
    def _score(self, trainer: Any, rollout: Rollout) -> None:
        """Reference log-probs (adapters off), rewards, k1 KL, shaped returns and RLOO advantages."""
        if self._reward_fn is None:
            with torch.random.fork_rng(devices=[]):  # loading seeds new heads; keep the sampling stream intact
                self._reward_fn = self.reward.build(trainer.accelerator.device, trainer.cfg.data.max_length)
        model = trainer.unwrapped()
        with adapters_disabled(model):
            ref_logp, _ = token_logprobs(model, rollout.input_ids, rollout.attention_mask, rollout.mask.shape[1],
                                         self.temperature)
        kl = kl_k1(rollout.old_logp, ref_logp, rollout.mask)
        rewards = torch.as_tensor(list(map(float, self._reward_fn(rollout.prompts, rollout.completions,
                                                                  rollout.completion_ids))),
                                  dtype=torch.float32, device=kl.device)
        if rewards.shape != kl.shape:
            raise ConfigError(f"The reward returned {rewards.numel()} values for {kl.numel()} completions; it must "
                              f"return one float per completion.")
        returns = rewards - self.kl_coef * kl
        rollout.advantages = rloo_advantages(returns.view(-1, self.samples_per_prompt)).reshape(-1)
        rollout.stats = {"rewards": rewards.tolist(), "kl": kl.tolist(),
                         "lengths": rollout.mask.sum(-1).tolist()}

    def step_summary(self) -> dict[str, float]:
        """This step's metrics (over all its micro-batches on this process); clears them."""
        stats, self._stats = self._stats, []
        if not stats:
            return {}
        rewards = torch.tensor([r for s in stats for r in s.get("rewards", [])])
        kls = torch.tensor([v for s in stats for v in s.get("kl", [])])
        lengths = [v for s in stats for v in s.get("lengths", [])]
        tokens = max(sum(s["tokens"] for s in stats), 1.0)
        out = {"entropy": sum(s["entropy_sum"] for s in stats) / tokens,
               "clip_frac": sum(s["clipped"] for s in stats) / tokens}
        if rewards.numel():  # a PPO step reusing its samples reports the rewards of those samples
            out.update(reward_mean=float(rewards.mean()),
                       reward_std=float(rewards.std()) if rewards.numel() > 1 else 0.0,
                       kl=float(kls.mean()), completion_len=sum(lengths) / len(lengths))
        return out


class RLStepCallback(Callback):
    """Writes the RL metrics into every step's row; resets the micro-batch counter, drops stale samples."""

    works_sharded = True

    def __init__(self, task: RLTask) -> None:
        self.task = task
        self._metrics: dict[str, float] = {}

    def after_optimizer_step(self, trainer: Any) -> None:
        self.task._micro = 0
        self._metrics = self.task.step_summary()
        if (trainer.step + 1) % self.task.ppo_epochs == 0:
            self.task._cache.clear()

    def step_metrics(self, trainer: Any) -> dict[str, float]:
        return self._metrics
