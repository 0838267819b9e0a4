"""Programmatic rewards for checks and demos (``reward.function=lorafit.rlhf.toy:...``).

A reward function takes the decoded prompts, the decoded completions and the completion token
ids (one entry per completion) and returns one float per completion.
"""

from __future__ import annotations

# Token ids 1000 ≤ id < 4000: about 10% of the 30,522-token MiniLM/BERT vocabulary the tiny
# Llama uses, so a random policy starts near 0.1 and has room to learn.
TOKEN_RANGE = (1000, 4000)


def token_range_fraction(prompts: list[str], completions: list[str], completion_ids: list[list[int]]) -> list[float]:
    """The fraction of each completion's tokens whose id lies in ``TOKEN_RANGE`` (0 if empty)."""
    low, high = TOKEN_RANGE
    return [sum(low <= t < high for t in ids) / len(ids) if ids else 0.0 for ids in completion_ids]
