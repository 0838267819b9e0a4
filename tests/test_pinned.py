"""Pinned-value regression tests: the numbers of every adapter and step rule must not move.

``tests/pinned_values.json`` is produced by ``scripts/pin_values.py`` (its docstring lists what is
pinned); the tests here recompute the same quantities with the script's own functions and compare:

- adapters (``ADAPTER_CASES``: every option of ``configs/adapter/``): init state, outputs,
  gradients of a fixed loss w.r.t. every trainable tensor and the inputs, and ``merged_weight()``
  of one seeded 12×16 layer, to within 1e-5 absolute plus 1e-5 of the tensor's own scale;
- step rules (``STEP_RULE_CASES``: every option of ``configs/optimizer/``): the per-step loss and
  gradient norm of a 4-step tiny-Llama run and the final adapter's sum of |·|, to within 1e-5
  relative;
- for both, the config each case used and its schema's defaults (strings and integers exactly).

**A failure means the maths changed.** If the change is a bug, fix it. If it is intended, regenerate
the file with ``PYTHONPATH=. python scripts/pin_values.py``, commit it with the change and list in the
commit message every intended numerical change that moved the values. Never regenerate the file
just to make this test pass.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

import pin_values  # noqa: E402  (scripts/pin_values.py: the one implementation of every pinned quantity)

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

PINS = json.loads(pin_values.PINS_FILE.read_text(encoding="utf-8"))
ADAPTER_TOL = {"rtol": 1e-5, "atol": 1e-5}
STEP_RULE_TOL = {"rtol": 1e-5, "atol": 1e-8}
REGENERATE = ("pinned value(s) moved, so the maths changed. If the change is intended, regenerate "
              "tests/pinned_values.json with scripts/pin_values.py and list the change in the commit message.")


def mismatches(got: Any, want: Any, path: str, rtol: float, atol: float, scale: float | None = None) -> list[str]:
    """Every leaf where ``got`` differs from ``want`` (structure exactly; floats within tolerance).

    A float passes when ``|got − want| ≤ atol + rtol·max(|want|, scale)``; inside a tensor summary
    the scale is the tensor's (``abs_sum`` for the sums, ``max_abs`` for the entries).
    """
    if isinstance(want, dict):
        if not isinstance(got, dict) or got.keys() != want.keys():
            keys = sorted(got) if isinstance(got, dict) else type(got).__name__
            return [f"{path}: pinned keys {sorted(want)}, now {keys}"]
        if {"sum", "abs_sum", "max_abs", "entries"} == want.keys():          # a tensor summary
            scales = {"sum": want["abs_sum"], "abs_sum": want["abs_sum"], "max_abs": want["max_abs"],
                      "entries": want["max_abs"]}
            return [m for k in want for m in mismatches(got[k], want[k], f"{path}.{k}", rtol, atol, scales[k])]
        return [m for k in want for m in mismatches(got[k], want[k], f"{path}.{k}", rtol, atol, scale)]
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return [f"{path}: pinned {want}, now {got}"]
        return [m for i, (g, w) in enumerate(zip(got, want))
                for m in mismatches(g, w, f"{path}[{i}]", rtol, atol, scale)]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        tol = atol + rtol * max(abs(want), abs(scale or 0.0))
        if not (math.isfinite(got) and abs(got - want) <= tol):
            return [f"{path}: pinned {want!r}, now {got!r} (|diff| {abs(got - want):.3g} > tol {tol:.3g})"]
        return []
    if type(got) is not type(want) or got != want:
        return [f"{path}: pinned {want!r}, now {got!r}"]
    return []


def check(kind: str, case: str, got: dict[str, Any], tol: dict[str, float]) -> None:
    assert case in PINS[kind], f"{kind} case '{case}' has no pinned values: run scripts/pin_values.py"
    bad = mismatches(got, PINS[kind][case], f"{kind}.{case}", **tol)
    shown = "\n  ".join(bad[:25]) + (f"\n  ... and {len(bad) - 25} more" if len(bad) > 25 else "")
    assert not bad, f"{kind} case '{case}': {len(bad)} {REGENERATE}\n  {shown}"


def test_every_adapter_and_step_rule_option_is_pinned() -> None:
    assert set(PINS["adapters"]) == set(pin_values.ADAPTER_CASES)
    assert set(PINS["step_rules"]) == set(pin_values.STEP_RULE_CASES)
    adapter_options = {path.stem for path in (REPO / "configs" / "adapter").glob("*.yaml")}
    assert adapter_options == {option for option, _ in pin_values.ADAPTER_CASES.values()}
    rule_options = {path.stem for path in (REPO / "configs" / "optimizer").glob("*.yaml")}
    chosen = {o.split("=", 1)[1] for args in pin_values.STEP_RULE_CASES.values() for o in args
              if o.startswith("optimizer=")}
    assert rule_options == chosen


def test_the_mismatch_check_catches_a_small_change() -> None:
    """The comparison itself: a change of 1e-4 of a tensor's scale is caught, 1e-7 is not."""
    pinned = PINS["adapters"]["lora"]
    for change, caught in ((1e-4, 3), (1e-7, 0)):
        moved = json.loads(json.dumps(pinned))
        moved["grad"]["lora_B"]["entries"][2] += change * pinned["grad"]["lora_B"]["max_abs"]
        moved["out_rows"]["sum"] += change * pinned["out_rows"]["abs_sum"]
        moved["step_loss"] = 1.0 + change
        assert len(mismatches(moved, {**pinned, "step_loss": 1.0}, "lora", **ADAPTER_TOL)) == caught
    assert mismatches({**pinned, "launched": [1]}, pinned, "lora", **ADAPTER_TOL)


@pytest.mark.parametrize("case", list(pin_values.ADAPTER_CASES))
def test_adapter_values_are_unchanged(case: str) -> None:
    check("adapters", case, pin_values.adapter_values(case), ADAPTER_TOL)


@pytest.mark.parametrize("case", list(pin_values.STEP_RULE_CASES))
def test_step_rule_values_are_unchanged(case: str, tmp_path: Path) -> None:
    check("step_rules", case, pin_values.step_rule_values(case, tmp_path), STEP_RULE_TOL)
