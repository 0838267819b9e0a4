"""``lorafit eval``: score a base model, a run (its adapter applied) or a merged folder.

- ``suite=glue`` — :mod:`lorafit.eval.glue` (GLUE and every classification/regression data option);
- ``suite=commonsense`` — :mod:`lorafit.eval.commonsense` (the loglik / generate / mc_head protocols);
- loading a model to score, for every suite — :mod:`lorafit.eval.load`;
- results on screen and on disk, and ``lorafit report`` — :mod:`lorafit.eval.report`.
"""

from __future__ import annotations

from lorafit.config import EvalConfig


def evaluate(path: str, cfg: EvalConfig) -> dict[str, dict]:
    """``lorafit eval PATH ...``: score ``path`` with the chosen suite; the results per task."""
    if cfg.suite == "commonsense":
        from lorafit.eval.commonsense import evaluate_commonsense
        return evaluate_commonsense(path, cfg)
    from lorafit.eval.glue import evaluate_glue
    return evaluate_glue(path, cfg)
