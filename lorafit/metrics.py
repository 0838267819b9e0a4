"""Classification and regression metrics: accuracy, binary F1, Matthews correlation, Pearson, Spearman.

:func:`metric_values` computes metrics by name (a GLUE task's list is
:attr:`lorafit.data.glue.GlueTask.metrics`; :func:`lorafit.data.glue.glue_metrics` picks it) and
returns plain Python floats.
Degenerate inputs, such as constant predictions, give 0.0 for the correlation
metrics instead of NaN and warnings.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

ArrayLike = Sequence[float] | np.ndarray


def _as_vectors(
    predictions: ArrayLike, labels: ArrayLike, regression: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Validate and convert predictions and labels to 1-D arrays of equal length.

    Classification inputs become int64 class ids; regression inputs float64.

    Raises:
        ValueError: On shape mismatch, empty input, non-integral class ids or
            non-finite regression values.
    """
    preds = np.asarray(predictions)
    gold = np.asarray(labels)
    if preds.ndim != 1 or gold.ndim != 1:
        raise ValueError(
            f"Metrics need 1-D predictions and labels, got shapes {preds.shape} and "
            f"{gold.shape}; for classification pass class ids (e.g. logits.argmax(-1))."
        )
    if len(preds) != len(gold):
        raise ValueError(
            f"Metrics need as many predictions as labels, got {len(preds)} predictions "
            f"and {len(gold)} labels."
        )
    if len(preds) == 0:
        raise ValueError("Metrics need at least one prediction, got none.")
    if regression:
        preds, gold = preds.astype(np.float64), gold.astype(np.float64)
        if not (np.isfinite(preds).all() and np.isfinite(gold).all()):
            raise ValueError("Regression predictions and labels must be finite numbers.")
        return preds, gold
    return _as_class_ids(preds, "predictions"), _as_class_ids(gold, "labels")


def _as_class_ids(values: np.ndarray, what: str) -> np.ndarray:
    """Convert an array of class ids to int64, rejecting fractional values."""
    if values.dtype.kind in "iub":
        return values.astype(np.int64)
    floats = values.astype(np.float64)
    if not (np.isfinite(floats).all() and (floats == np.round(floats)).all()):
        raise ValueError(
            f"Classification {what} must be integer class ids; got values such as "
            f"{floats[:3].tolist()}. Take the argmax of the logits first."
        )
    return floats.astype(np.int64)


def accuracy(predictions: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of predictions equal to their labels.

    Args:
        predictions: Predicted class ids.
        labels: Gold class ids.

    Returns:
        Accuracy in ``[0, 1]``.
    """
    preds, gold = _as_vectors(predictions, labels)
    return float(accuracy_score(gold, preds))


def _f1(preds: np.ndarray, gold: np.ndarray) -> float:
    """Binary F1 with class 1 as the positive class (0.0 when undefined)."""
    return float(f1_score(gold, preds, average="binary", pos_label=1, zero_division=0.0))


def _mcc(preds: np.ndarray, gold: np.ndarray) -> float:
    """Matthews correlation coefficient (0.0 when undefined)."""
    if np.unique(np.concatenate([preds, gold])).size < 2:
        return 0.0  # a single class overall: sklearn would warn about the matrix shape
    value = float(matthews_corrcoef(gold, preds))
    return value if np.isfinite(value) else 0.0


def _is_degenerate(preds: np.ndarray, gold: np.ndarray) -> bool:
    """True when a correlation is undefined: fewer than 2 points or a constant input."""
    return len(preds) < 2 or np.ptp(preds) == 0 or np.ptp(gold) == 0


def _correlation(
    func: Callable[[np.ndarray, np.ndarray], object], preds: np.ndarray, gold: np.ndarray
) -> float:
    """Run a scipy correlation quietly, mapping undefined results to 0.0."""
    if _is_degenerate(preds, gold):
        return 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.NearConstantInputWarning)
        value = float(func(preds, gold).statistic)
    return value if np.isfinite(value) else 0.0


def _pearson(preds: np.ndarray, gold: np.ndarray) -> float:
    """Pearson correlation (0.0 for constant inputs)."""
    return _correlation(stats.pearsonr, preds, gold)


def _spearman(preds: np.ndarray, gold: np.ndarray) -> float:
    """Spearman rank correlation (0.0 for constant inputs)."""
    return _correlation(stats.spearmanr, preds, gold)


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": lambda preds, gold: float(accuracy_score(gold, preds)),
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _pearson,
    "spearman": _spearman,
}


def metric_values(names: Sequence[str], predictions: ArrayLike, labels: ArrayLike,
                  regression: bool = False) -> dict[str, float]:
    """Compute the named metrics (``accuracy``, ``f1``, ``mcc``, ``pearson``, ``spearman``).

    Args:
        names: metric names, in the order wanted back.
        predictions: class ids (classification) or floats (regression).
        labels: gold class ids or scores, same length as ``predictions``.
        regression: whether predictions and labels are real-valued.

    Returns:
        ``{metric_name: value}`` in the order of ``names``; values are Python floats.

    Raises:
        ValueError: for malformed inputs.
    """
    preds, gold = _as_vectors(predictions, labels, regression=regression)
    return {name: _METRICS[name](preds, gold) for name in names}
