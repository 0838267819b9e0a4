"""PE-RLHF: reward models and RL with LoRA-family adapters (arXiv 2403.10704).

Both stages train an adapter on a frozen backbone, as the paper does:

- ``task=reward`` (:mod:`lorafit.rlhf.reward`): backbone + adapter + a scalar head, trained on
  preference pairs with the pairwise loss ``-log σ(r(x, y_chosen) - r(x, y_rejected))``;
- ``task=rl`` (:mod:`lorafit.rlhf.rl`): the policy is backbone + adapter; the KL anchor is the
  *same* backbone with the adapter switched off (:func:`lorafit.adapters.adapters_disabled`), so no
  second copy of the model is held in memory.

The paper publishes no code; what is ours (RLOO by default, PPO-clip on the same advantages as an
option, the k1 KL estimator folded into the reward, no value head) is listed in ``docs/rlhf.md``.
"""
