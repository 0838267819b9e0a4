"""A mutation table for the method files: does the test suite notice a wrong formula?

Each mutant replaces one exact snippet of a method file (``adapters/``, ``inits/``, ``optim/``,
``rlhf/``) with a semantically wrong one — a wrong scale, a wrong slice, a missing term, a flipped
sign, stale state, an off-by-one in a schedule — in a temporary copy of the repository's tracked
files, and runs the tests mapped to that file there (``PYTHONPATH`` = the copy, so the editable
install's code is not what runs). A failing run kills the mutant; a run past ``--timeout`` counts as
killed by timeout (shown apart). A mutant that cannot change any result is marked equivalent, with
the reason. The unmutated tests of each file run first and must pass.

    python scripts/mutants.py --list                     # the table of mutants, nothing run
    python scripts/mutants.py --only rosa --markdown     # one file's mutants, a Markdown table
    python scripts/mutants.py --jobs 2 --markdown        # everything (not in CI: tens of minutes)

The latest full table, with the command, is docs/mutants.md.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutant:
    """Replace ``find`` (exactly once in ``file``) by ``replace``; ``equivalent``: why no test can fail."""

    file: str
    find: str
    replace: str
    kind: str            # scale | slice | term | sign | state | schedule | other
    what: str
    equivalent: str = ""


@dataclass
class Outcome:
    mutant: Mutant
    result: str          # killed | timeout | survived | equivalent | baseline-failed
    killer: str = ""     # the first failing test
    seconds: float = 0.0


def check_snippets(mutants: list[Mutant]) -> None:
    """Every snippet must occur exactly once in its file (a stale one fails loudly here)."""
    problems = []
    for m in mutants:
        count = (ROOT / m.file).read_text().count(m.find)
        if count != 1:
            problems.append(f"{m.file}: {m.find!r} occurs {count} times (must be once)")
        if m.file not in TESTS:
            problems.append(f"{m.file}: no tests mapped in TESTS")
    if problems:
        sys.exit("mutants.py: stale mutant table:\n  " + "\n  ".join(problems))


def copy_repo(dest: Path) -> None:
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for rel in filter(None, files.decode().split("\0")):
        src, target = ROOT / rel, dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():                       # lorafit/configs -> ../configs
            os.symlink(os.readlink(src), target)
        elif src.is_file():
            shutil.copy2(src, target)


def run_tests(copy: Path, tests: list[str], timeout: float) -> tuple[str, str, float]:
    """('passed' | 'failed' | 'timeout', first failing test, seconds) of the mapped tests in ``copy``."""
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", "", time.monotonic() - start
    seconds = time.monotonic() - start
    if proc.returncode == 0:
        return "passed", "", seconds
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return "failed", failed[0] if failed else f"exit {proc.returncode}: {out.strip().splitlines()[-1:]}", seconds


def run_mutant(copy: Path, m: Mutant, timeout: float) -> Outcome:
    if m.equivalent:
        return Outcome(m, "equivalent", m.equivalent)
    path = copy / m.file
    original = path.read_text()
    path.write_text(original.replace(m.find, m.replace, 1))
    try:
        status, killer, seconds = run_tests(copy, TESTS[m.file], timeout)
    finally:
        path.write_text(original)
    return Outcome(m, {"passed": "survived", "failed": "killed", "timeout": "timeout"}[status], killer, seconds)


def markdown(outcomes: list[Outcome]) -> str:
    rows = ["| file | kind | mutant | result | killed by / why equivalent |", "|---|---|---|---|---|"]
    for o in outcomes:
        m = o.mutant
        why = o.killer.replace("|", "\\|")
        rows.append(f"| {m.file.removeprefix('lorafit/')} | {m.kind} | {m.what} | {o.result} | {why} |")
    return "\n".join(rows)


def summary(outcomes: list[Outcome]) -> str:
    files: dict[str, dict[str, int]] = {}
    for o in outcomes:
        counts = files.setdefault(o.mutant.file, {})
        counts[o.result] = counts.get(o.result, 0) + 1
    lines = ["| file | mutants | killed | timeout | equivalent | survived |", "|---|---|---|---|---|---|"]
    for f, c in files.items():
        failed = f" (baseline failed: {c['baseline-failed']} not run)" if "baseline-failed" in c else ""
        lines.append(f"| {f.removeprefix('lorafit/')} | {sum(c.values())} | {c.get('killed', 0)} | "
                     f"{c.get('timeout', 0)} | {c.get('equivalent', 0)} | {c.get('survived', 0)}{failed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run only the mutants of files whose path contains this")
    parser.add_argument("--list", action="store_true", help="print the mutants and their tests, run nothing")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run in parallel (one repository copy each)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per mutant's test run")
    parser.add_argument("--markdown", action="store_true", help="print the result as Markdown tables")
    args = parser.parse_args()
    check_snippets(MUTANTS)
    mutants = [m for m in MUTANTS if not args.only or args.only in m.file]
    if args.list:
        for m in mutants:
            print(f"{m.file:34} {m.kind:10} {m.what}" + (f"   [equivalent: {m.equivalent}]" if m.equivalent else ""))
        for f in dict.fromkeys(m.file for m in mutants):
            print(f"\n{f}: pytest {' '.join(TESTS[f])}")
        return
    copies = [Path(tempfile.mkdtemp(prefix="lorafit-mutants-")) for _ in range(max(1, args.jobs))]
    outcomes: list[Outcome] = []
    try:
        for copy in copies:
            copy_repo(copy)
        for f in dict.fromkeys(m.file for m in mutants):
            status, killer, seconds = run_tests(copies[0], TESTS[f], args.timeout)
            print(f"baseline {f}: {status} in {seconds:.0f}s {killer}", file=sys.stderr, flush=True)
            todo = [m for m in mutants if m.file == f]
            if status != "passed":
                outcomes += [Outcome(m, "baseline-failed", killer) for m in todo]
                continue
            free = list(copies)

            def one(m: Mutant) -> Outcome:
                copy = free.pop()
                try:
                    o = run_mutant(copy, m, args.timeout)
                finally:
                    free.append(copy)
                print(f"  {o.result:10} {o.seconds:5.0f}s {m.file} {m.what} {o.killer}", file=sys.stderr, flush=True)
                return o

            with ThreadPoolExecutor(len(copies)) as pool:
                outcomes += list(pool.map(one, todo))
    finally:
        for copy in copies:
            shutil.rmtree(copy, ignore_errors=True)
    if args.markdown:
        print(summary(outcomes) + "\n\n" + markdown(outcomes))
    else:
        for o in outcomes:
            print(f"{o.result:10} {o.mutant.file:34} {o.mutant.what}  {o.killer}")
    if any(o.result in ("survived", "baseline-failed") for o in outcomes):
        sys.exit(1)


# ----------------------------------------------------------------------------- the table
A = "tests/test_adapters.py::"
EFF = A + "test_effective_weight_matches_the_methods_md_formula"
IDENT = A + "test_init_identity_and_phase_switches"
MERGE = A + "test_merge_unmerge_in_place"
PINNED = "tests/test_pinned.py::test_step_rule_values_are_unchanged"   # regression pins: listed last

# file → the tests that exercise it (pytest node ids), fastest and most telling first; -x stops at the first failure.
TESTS: dict[str, list[str]] = {
    "lorafit/adapters/lora.py": ["tests/test_lora.py", f"{EFF}[lora]", f"{EFF}[rslora]", "tests/test_inits.py",
                                 A + "test_lora_dash_launch_after_a_rebasing_init_scores_the_trained_update_on_the_original_w0"],
    "lorafit/adapters/dora.py": ["tests/test_dora.py", f"{EFF}[dora]", "tests/test_inits.py"],
    "lorafit/adapters/adalora.py": [A + "test_adalora_triplet_score_adds_e_and_the_means_of_its_a_row_and_b_column", f"{EFF}[adalora]", "tests/test_peft_parity.py::test_adalora_forward_and_orthogonal_penalty_match_peft",
                                    "tests/test_peft_parity.py::test_adalora_budget_schedule_matches_peft",
                                    "tests/test_peft_parity.py::test_adalora_masks_match_peft_given_the_same_gradients",
                                    A + "test_adalora_refuses_a_kept_triplets_set_by_hand"],
    "lorafit/adapters/bone.py": [f"{EFF}[bone]", f"{EFF}[bat]", "tests/test_peft_parity.py::test_bone_and_bat_match_peft_miss",
                                 f"{MERGE}[minilm-bone]", f"{MERGE}[minilm-bat]", f"{MERGE}[llama-bone]", f"{MERGE}[llama-bat]"],
    "lorafit/adapters/lora_dash.py": [A + "test_lora_dash_launch_picks_the_top_directions",
                                      A + "test_lora_dash_launch_after_a_rebasing_init_scores_the_trained_update_on_the_original_w0",
                                      f"{EFF}[lora_dash]", f"{IDENT}[minilm-lora_dash]", f"{IDENT}[llama-lora_dash]",
                                      f"{MERGE}[minilm-lora_dash]", "tests/test_adapters.py::test_lora_dash_callback_launches_after_step_t"],
    "lorafit/adapters/rosa.py": [A + "test_rosa_mask_is_the_top_k_of_the_score", A + "test_rosa_mask_is_the_top_k_of_the_mean_squared_gradient",
                                 A + "test_rosa_fisher_squares_the_step_or_each_micro_batch", f"{EFF}[rosa]",
                                 f"{IDENT}[minilm-rosa]", f"{MERGE}[minilm-rosa]", A + "test_rosa_sparse_values_get_their_own_learning_rate"],
    "lorafit/adapters/spectral.py": [A + "test_spectral_buffers_are_the_top_singular_triplets",
                                     A + "test_spectral_rotation_keeps_singular_vectors_orthonormal",
                                     A + "test_spectral_r_trained_scale_multiplies_the_rotated_singular_values",
                                     f"{EFF}[spectral_a]", f"{EFF}[spectral_r]", f"{IDENT}[minilm-spectral_a]",
                                     f"{IDENT}[minilm-spectral_r]"],
    "lorafit/adapters/tokens.py": ["tests/test_chat.py::test_token_rows_on_the_output_layer_give_the_grown_matrix_and_its_gradients",
                                   "tests/test_chat.py::test_added_token_rows_train_save_load_and_merge"],
    "lorafit/adapters/peft_import.py": ["tests/test_export.py::test_unsupported_peft_folders_are_refused_with_the_reason",
                                        "tests/test_export.py::test_a_peft_adapter_loads_merges_and_trains_on"],
    "lorafit/adapters/io.py": ["tests/test_lora.py::test_save_load_roundtrip_minilm_with_head",
                               "tests/test_lora.py::test_an_adapter_with_one_inf_is_not_written",
                               "tests/test_lora.py::test_lorafits_own_files_win_over_an_old_layout_in_the_same_folder",
                               "tests/test_lora.py::test_tampered_base_is_refused",
                               "tests/test_export.py::test_native_files_are_not_peft_names_and_the_old_layout_still_loads"],
    "lorafit/inits/basic.py": ["tests/test_lora.py::test_gaussian_init_statistics", "tests/test_lora.py::test_init_is_identity_and_disabled_is_base"],
    "lorafit/inits/svd.py": ["tests/test_inits.py"],
    "lorafit/linalg.py": ["tests/test_linalg.py", "tests/test_inits.py", "tests/test_quant.py"],
    "lorafit/quant.py": ["tests/test_quant.py"],
    "lorafit/inits/lora_ga.py": ["tests/test_lora_ga.py"],
    "lorafit/optim/basic.py": ["tests/test_train.py::test_warmup_ratio_rounds_to_whole_steps_and_every_schedule_warms_up",
                               "tests/test_train.py::test_sgd_applies_its_momentum",
                               A + "test_rosa_sparse_values_get_their_own_learning_rate", "tests/test_step_rules.py",
                               PINNED + "[adamw]", PINNED + "[sgd]"],
    "lorafit/optim/loraplus.py": ["tests/test_loraplus.py", "tests/test_step_rules.py", PINNED + "[loraplus]"],
    "lorafit/optim/reflora.py": ["tests/test_step_rules.py", PINNED + "[reflora]", PINNED + "[reflora_s]"],
    "lorafit/optim/trust_region.py": ["tests/test_ctr.py", PINNED + "[ctr]", PINNED + "[ctr_fisher_rank]", "-m", "not slow"],
    "lorafit/optim/ctr.py": ["tests/test_ctr.py", PINNED + "[ctr]", PINNED + "[ctr_fisher_rank]", "-m", "not slow"],
    "lorafit/rlhf/reward.py": ["tests/test_rlhf.py", "-m", "not slow"],
    "lorafit/rlhf/rl.py": ["tests/test_rlhf.py", "-m", "not slow"],
    "lorafit/rlhf/toy.py": ["tests/test_rlhf.py", "-m", "not slow"],
}

M = Mutant
MUTANTS: list[Mutant] = [
    # --------------------------------------------------------------- adapters/lora.py
    M("lorafit/adapters/lora.py", "self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)",
      "self.alpha / (self.r if self.use_rslora else math.sqrt(self.r))", "scale", "LoRA and rsLoRA scales swapped (α/√r ↔ α/r)"),
    M("lorafit/adapters/lora.py", "self.lora_A) * self.scaling  # (..., r)", "self.lora_A)  # (..., r)",
      "scale", "forward drops s: y = W0x + B A x"),
    M("lorafit/adapters/lora.py", "return (self.lora_B @ self.lora_A) * self.scaling", "return self.lora_B @ self.lora_A",
      "scale", "merge/ΔW drops s"),
    M("lorafit/adapters/lora.py", "addmm_(self.init_B, self.init_A, alpha=-self.scaling)",
      "addmm_(self.init_B, self.init_A, alpha=self.scaling)", "sign", "rebase residual W0 + s·B0A0"),
    M("lorafit/adapters/lora.py", "return weight + self.scaling * (self.init_B @ self.init_A) if self.rebased else weight",
      "return weight", "term", "original_weight forgets s·B0A0 after a rebase (the residual taken for W0)"),
    M("lorafit/adapters/lora.py", "F.linear(x.to(self.init_A.dtype), self.init_A) * self.scaling, self.init_B)",
      "F.linear(x.to(self.init_A.dtype), self.init_A), self.init_B)", "scale", "disabled layer adds B0A0 x without s"),
    # --------------------------------------------------------------- adapters/dora.py
    M("lorafit/adapters/dora.py", "self.w0_norm_sq + 2 * s * cross + s * s * quad", "self.w0_norm_sq + s * cross + s * s * quad",
      "scale", "row norm: cross term 2s → s"),
    M("lorafit/adapters/dora.py", "self.w0_norm_sq + 2 * s * cross + s * s * quad", "self.w0_norm_sq + 2 * s * cross + s * quad",
      "scale", "row norm: quadratic term s² → s"),
    M("lorafit/adapters/dora.py", "quad = ((B @ (A @ A.T)) * B).sum(1)", "quad = (B * B).sum(1)",
      "term", "row norm: ‖(BA)_i‖² taken as ‖B_i‖² (A Aᵀ dropped)"),
    M("lorafit/adapters/dora.py", "        self.w0_norm_sq = torch.zeros(0, device=self.magnitude.device)\n        self.magnitude.copy_(self.row_norm())",
      "        self.magnitude.copy_(self.row_norm())", "state",
      "reset_magnitude keeps the cached ‖W0‖² of the base from before a rebase"),
    M("lorafit/adapters/dora.py", "c = self.magnitude / self.row_norm().detach()", "c = self.magnitude / self.row_norm()",
      "other", "dropout form: norm not detached",
      equivalent="row_norm() runs under @torch.no_grad, so its output has no graph: .detach() is a no-op"),
    M("lorafit/adapters/dora.py", "return out + ((c - 1) * w0_dropped + c * low_rank).to(out.dtype)",
      "return out + ((c - 1) * w0_dropped + low_rank).to(out.dtype)", "scale", "dropout form: low-rank term not rescaled by c"),
    M("lorafit/adapters/dora.py", "            grad_B = gh * c", "            grad_B = gh", "term", "DoRAProduct: ∂L/∂B misses the row scale c"),
    M("lorafit/adapters/dora.py", "                grad_m = grad_m / m", "                grad_m = grad_m / n", "scale",
      "DoRAProduct (kept y): ∂L/∂m divides by n instead of m"),
    M("lorafit/adapters/dora.py", "grad_m = ((w0.to(m.dtype) * gw).sum(1) + (B * gh).sum(1)) / n",
      "grad_m = ((w0.to(m.dtype) * gw).sum(1) - (B * gh).sum(1)) / n", "sign", "DoRAProduct (recompute): ∂L/∂m low-rank term sign"),
    M("lorafit/adapters/dora.py", "(self.merge_norm / self.magnitude).unsqueeze(1)", "(self.magnitude / self.merge_norm).unsqueeze(1)",
      "scale", "unmerge multiplies by m/n instead of n/m"),
    # --------------------------------------------------------------- adapters/adalora.py
    M("lorafit/adapters/adalora.py", "self.alpha / self.init_r, self.dropout", "self.alpha / self.target_r, self.dropout",
      "scale", "scale α/target_r instead of α/init_r"),
    M("lorafit/adapters/adalora.py", "smoothed = b1 * smoothed + (1 - b1) * sensitivity", "smoothed = sensitivity",
      "state", "sensitivity not smoothed (no EMA)"),
    M("lorafit/adapters/adalora.py", "(1 - b2) * (sensitivity - smoothed).abs()", "(1 - b2) * (sensitivity - smoothed)",
      "term", "uncertainty without |·|"),
    M("lorafit/adapters/adalora.py", 'score(f"{name}.lora_E") + score(f"{name}.lora_A").mean(1) + score(f"{name}.lora_B").mean(0)',
      'score(f"{name}.lora_E") + score(f"{name}.lora_A").mean(1)', "term", "triplet score drops the B term"),
    M("lorafit/adapters/adalora.py", "progress ** 3 + target_budget", "progress ** 2 + target_budget", "schedule", "budget decreases quadratically"),
    M("lorafit/adapters/adalora.py", "    if t <= tinit:\n        return init_budget, False", "    if t < tinit:\n        return init_budget, False",
      "schedule", "off-by-one: pruning starts a step early"),
    M("lorafit/adapters/adalora.py", "keep = {name: s > threshold for", "keep = {name: s >= threshold for", "slice",
      "mask keeps the k-th smallest score too"),
    M("lorafit/adapters/adalora.py", "torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T - eye)",
      "torch.linalg.matrix_norm(self.lora_A @ self.lora_A.T + eye)", "sign", "orthogonality penalty ‖AAᵀ + I‖"),
    # --------------------------------------------------------------- adapters/bone.py
    M("lorafit/adapters/bone.py", "summed = h.unflatten(-1, (-1, self.r)).sum(-2)", "summed = h.unflatten(-1, (-1, self.r)).mean(-2)",
      "scale", "Bone forward averages the blocks instead of summing"),
    M("lorafit/adapters/bone.py", "return self.bone_D.T.repeat(1, blocks)[:, :self.base.in_features]",
      "return self.bone_D.T.repeat(1, blocks)[:, -self.base.in_features:]", "slice", "Bone ΔW cropped at the wrong end"),
    M("lorafit/adapters/bone.py", "        if pad:\n            h = F.pad(h, (0, pad))", "        if pad:\n            h = F.pad(h, (pad, 0))",
      "slice", "Bone ragged block padded on the left"),
    M("lorafit/adapters/bone.py", "self._blocks(self.base.weight.float()) @ D + D)", "D @ self._blocks(self.base.weight.float()) + D)",
      "slice", "Bat ΔW = D W_ij + D (left instead of right multiply)"),
    M("lorafit/adapters/bone.py", "self._blocks(self.base.weight.float()) @ D + D)", "self._blocks(self.base.weight.float()) @ D)",
      "term", "Bat ΔW drops the + D_i term"),
    M("lorafit/adapters/bone.py", "self._blocks(self.base.weight.float()) - D, left=False)", "self._blocks(self.base.weight.float()) - D, left=True)",
      "slice", "Bat unmerge solves (I+D)X = … instead of X(I+D) = …"),
    # --------------------------------------------------------------- adapters/lora_dash.py
    M("lorafit/adapters/lora_dash.py", "score = delta.abs() / S.clamp_min(torch.finfo(S.dtype).tiny)", "score = delta.abs()",
      "term", "launch score |δ| without /σ"),
    M("lorafit/adapters/lora_dash.py", "torch.topk(score, self.s)", "torch.topk(-score, self.s)", "sign", "launch keeps the s smallest scores"),
    M("lorafit/adapters/lora_dash.py", "self.dash_U.copy_(U[:, chosen])", "self.dash_U.copy_(U[:, :self.s])", "slice",
      "U_s = the top singular vectors, not the chosen ones"),
    M("lorafit/adapters/lora_dash.py", "        self.dash_d.zero_()\n", "", "state", "launch keeps the pre-launch d"),
    M("lorafit/adapters/lora_dash.py", "if trainer.step + 1 == self.t:", "if trainer.step == self.t:", "schedule",
      "off-by-one: launch after step t+1"),
    M("lorafit/adapters/lora_dash.py", "                trainer.optimizer.state.pop(layer.dash_d, None)\n", "", "state",
      "d's Adam state not reset at the launch"),
    # --------------------------------------------------------------- adapters/rosa.py
    M("lorafit/adapters/rosa.py", "                square = grad.pow(2)", "                square = grad", "term",
      "mask scored by the signed gradient sum, not Σg² (issue 21)"),
    M("lorafit/adapters/rosa.py", "square = grad.float().pow(2)", "square = grad.float()", "term", "micro_batch Fisher not squared"),
    M("lorafit/adapters/rosa.py", "self.fisher[name] = square if previous is None else previous.to(square.device) + square",
      "self.fisher[name] = square", "state", "Fisher keeps the last collection step only"),
    M("lorafit/adapters/rosa.py", "return self.warmup <= step < self.warmup + self.num_grads",
      "return self.warmup < step <= self.warmup + self.num_grads", "schedule", "off-by-one: collection a step late"),
    M("lorafit/adapters/rosa.py", "torch.topk(score.flatten(), k)", "torch.topk(-score.flatten(), k)", "sign", "mask = the k smallest scores"),
    M("lorafit/adapters/rosa.py", 'rows = torch.div(self.sparse_index, self.base.in_features, rounding_mode="floor")',
      'rows = torch.div(self.sparse_index, self.base.out_features, rounding_mode="floor") % self.base.out_features',
      "slice", "flat index → row with out_features (transposed layout)"),
    M("lorafit/adapters/rosa.py", "layer.set_mask(self.fisher.pop(name) / self.num_grads)", "layer.set_mask(self.fisher.pop(name))",
      "scale", "mask from Σg² instead of its mean",
      equivalent="the score only feeds topk, which a positive factor (1/spa_num_grads) leaves unchanged (up to ties made by rounding)"),
    # --------------------------------------------------------------- adapters/spectral.py
    M("lorafit/adapters/spectral.py", "K = (X - X.T) / 2", "K = (X + X.T) / 2", "sign", "Cayley map of the symmetric part (not orthogonal)"),
    M("lorafit/adapters/spectral.py", "torch.linalg.solve(eye + K, eye - K)", "torch.linalg.solve(eye - K, eye + K)", "sign",
      "cay(X) → cay(−X) (the inverse rotation)"),
    M("lorafit/adapters/spectral.py", "U, S, V = singular_triplets(weight_rows(base), r)",
      "U, S, V = singular_triplets(weight_rows(base), r, minor=True)", "slice", "S_r = the smallest singular values"),
    M("lorafit/adapters/spectral.py", "delta = ((xf @ BV) * S) @ (U + BU).T + (h * S) @ BU.T", "delta = ((xf @ BV) * S) @ (U + BU).T",
      "term", "Spectral-A forward drops B_U S V_rᵀ x"),
    M("lorafit/adapters/spectral.py", "delta = (rotated - h * S) @ U.T", "delta = rotated @ U.T", "term",
      "Spectral-R forward does not subtract U S Vᵀ x"),
    M("lorafit/adapters/spectral.py", "return self.spectral_S if scale is None else self.spectral_S * scale",
      "return self.spectral_S", "term", "train_scale λ ignored"),
    # --------------------------------------------------------------- adapters/tokens.py
    M("lorafit/adapters/tokens.py", "new = (x >= first) & (x < end)", "new = (x > first) & (x < end)", "slice",
      "off-by-one: the first new token's row gets no offset"),
    M("lorafit/adapters/tokens.py", "out[..., first:end] += extra.to(out.dtype)", "out[..., first:end] = extra.to(out.dtype)",
      "term", "new logits replace W0's instead of adding"),
    M("lorafit/adapters/tokens.py", "weight[self.first:self.first + self.token_rows.shape[0]] += self.token_rows",
      "weight[self.first + 1:self.first + 1 + self.token_rows.shape[0]] += self.token_rows", "slice", "merged rows shifted by one"),
    # --------------------------------------------------------------- adapters/peft_import.py
    M("lorafit/adapters/peft_import.py", '"use_rslora": bool(config.get("use_rslora", False))', '"use_rslora": False',
      "scale", "PEFT rsLoRA read as LoRA (α/r)"),
    M("lorafit/adapters/peft_import.py", 'float(config.get("lora_alpha", 8))', 'float(config["r"])', "scale", "PEFT alpha ignored (α = r)"),
    M("lorafit/adapters/peft_import.py", 'if config.get("rank_pattern") or config.get("alpha_pattern"):',
      'if config.get("rank_pattern"):', "term", "per-layer alphas not refused"),
    # --------------------------------------------------------------- adapters/io.py
    M("lorafit/adapters/io.py", 'adapter_state_dict(model, meta["modules_to_save"])', "adapter_state_dict(model, [])",
      "term", "the trained head is not saved"),
    M("lorafit/adapters/io.py", "if v.is_floating_point() and not bool(torch.isfinite(v).all())]",
      "if v.is_floating_point() and bool(torch.isnan(v).all())]", "other", "NaN check only catches all-NaN tensors"),
    M("lorafit/adapters/io.py", "if (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / LEGACY_CONFIG).is_file():",
      "if not (adapter_dir / LEGACY_CONFIG).is_file():", "other", "an old-layout file wins over lorafit's own"),
    # --------------------------------------------------------------- inits/basic.py
    M("lorafit/inits/basic.py", "std=1.0 / math.sqrt(lora_A.shape[0])", "std=1.0 / lora_A.shape[0]", "scale", "gaussian A ~ N(0, 1/r²)"),
    M("lorafit/inits/basic.py", "std=1.0 / math.sqrt(lora_A.shape[0])", "std=1.0 / math.sqrt(lora_A.shape[1])", "slice",
      "gaussian A ~ N(0, 1/in) (wrong dimension)"),
    M("lorafit/inits/basic.py", "            lora_B.zero_()\n", "", "state", "gaussian init leaves B as it is",
      equivalent="apply() runs once, right after attaching, when every LoRA layer's B was just created as zeros"),
    # --------------------------------------------------------------- inits/svd.py
    M("lorafit/inits/svd.py", "U, S, V = singular_triplets(weight, r, minor)", "U, S, V = singular_triplets(weight, r)", "slice",
      "MiLoRA takes the principal triplets (minor ignored)"),
    M("lorafit/inits/svd.py", "root = (S / scaling).sqrt()", "root = S.sqrt()", "scale", "PiSSA factors ignore s (s·BA ≠ top-r part)"),
    M("lorafit/inits/svd.py", "return root[:, None] * V.T, U * root[None, :]", "return V.T, U * (root * root)[None, :]", "scale",
      "all of S on B (same B A, unbalanced factors)"),
    M("lorafit/inits/svd.py", "A[:, :r] = R ", "A[:, :r] = R.T ", "slice", "OLoRA's R block transposed"),
    M("lorafit/inits/svd.py", "Q, R = torch.linalg.qr(weight[:, :r])", "Q, R = torch.linalg.qr(weight[:, 1:r + 1])", "slice",
      "OLoRA's QR of columns 1…r"),
    # --------------------------------------------------------------- linalg.py (the SVD inits' and Spectral's triplets)
    M("lorafit/linalg.py", "first = 0 if minor else k - r", "first = 0 if minor else k - r - 1", "slice",
      "top-r triplets off by one (skips the largest)"),
    M("lorafit/linalg.py", "S = Y.norm(dim=0)", "S = Y.norm(dim=0) ** 2", "scale", "S_r = σ² (the Gram's eigenvalue, not its root)"),
    M("lorafit/linalg.py", "U, V = (X, Y) if wide else (Y, X)", "U, V = (Y, X)", "slice", "U and V swapped for wide matrices"),
    M("lorafit/linalg.py", "G.addmm_(part.T, part)", "G.add_(part.T[:, :k] @ part[:k])", "term", "each chunk adds only its first k rows to the Gram"),
    M("lorafit/linalg.py", "G[c:c + len(Wc), a:a + len(Wa)] = block.T", "G[c:c + len(Wc), a:a + len(Wa)] = 0", "term",
      "W Wᵀ of a wide quantised layer: its lower-triangle blocks not mirrored"),
    M("lorafit/linalg.py", "Y.addmm_(W.rows(i, i + step).double().T, X[i:i + step])", "Y.addmm_(W.rows(i, i + step).double().T, X[:step])",
      "slice", "Wᵀ U_r of a wide quantised layer summed against U_r's first rows only"),
    # --------------------------------------------------------------- quant.py (4-bit rows read block by block)
    M("lorafit/quant.py", "            absmax += state.offset\n", "", "term", "nested absmax: the offset (the global mean) not added back"),
    M("lorafit/quant.py", "first = pos // size * size", "first = pos", "slice", "a row range dequantised from its first element, not its block's"),
    # --------------------------------------------------------------- inits/lora_ga.py
    M("lorafit/inits/lora_ga.py", "sums[name] += weight.grad.float().cpu()", "sums[name] = weight.grad.float().cpu()", "state",
      "gradient of the last batch only (issue 21)"),
    M("lorafit/inits/lora_ga.py", "return V[:, :r].T * scale, U[:, r:2 * r] * scale", "return V[:, :r].T * scale, U[:, :r] * scale",
      "slice", "B0 from U[:, :r] (ArBr) instead of U[:, r:2r]"),
    M("lorafit/inits/lora_ga.py", "scale = out_features ** 0.25 / gamma ** 0.5", "scale = out_features ** 0.5 / gamma ** 0.5", "scale",
      "stable scale out^{1/2}/√γ"),
    M("lorafit/inits/lora_ga.py", "mine = range(acc.process_index, cfg.batches, acc.num_processes)",
      "mine = range(acc.process_index, cfg.batches - 1, acc.num_processes)", "schedule", "off-by-one: the last init batch is skipped"),
    M("lorafit/inits/lora_ga.py", "order[b * cfg.batch_size:(b + 1) * cfg.batch_size]", "order[b:b + cfg.batch_size]", "slice",
      "overlapping init batches"),
    # --------------------------------------------------------------- optim/basic.py
    M("lorafit/optim/basic.py", 'groups.setdefault(getattr(param, "lorafit_lr", self.lr), [])', "groups.setdefault(self.lr, [])",
      "scale", "an adapter's own lr (RoSA's sparse_lr) ignored"),
    M("lorafit/optim/basic.py", "warmup = self.warmup_steps or int(round(self.warmup_ratio * total_steps))",
      "warmup = self.warmup_steps or int(self.warmup_ratio * total_steps)", "schedule", "warm-up ratio floored instead of rounded"),
    M("lorafit/optim/basic.py", 'name = "constant_with_warmup" if self.scheduler == "constant" else self.scheduler',
      "name = self.scheduler", "schedule", "constant schedule ignores the warm-up"),
    M("lorafit/optim/basic.py", "betas=(self.beta1, self.beta2)", "betas=(self.beta2, self.beta1)", "state", "Adam betas swapped"),
    M("lorafit/optim/basic.py", "lr=self.lr, momentum=self.momentum,", "lr=self.lr, momentum=0.0,", "state", "SGD momentum ignored"),
    # --------------------------------------------------------------- optim/loraplus.py
    M("lorafit/optim/loraplus.py", 'return ratio * lr if role in OUTPUT_SIDE or (param.ndim == 1 and role != "delta") else lr',
      'return lr if role in OUTPUT_SIDE or (param.ndim == 1 and role != "delta") else ratio * lr', "scale", "λ on A instead of B"),
    M("lorafit/optim/loraplus.py", 'OUTPUT_SIDE = ("B", "vector")', 'OUTPUT_SIDE = ("B",)', "term", "vectors (DoRA m, LoRA-Dash d) at lr",
      equivalent='role "vector" is 1-D by definition (lorafit.adapters.ROLES: m, d, a bias), and every 1-D tensor '
                 'but a "delta" gets λ·lr from the ndim clause anyway'),
    M("lorafit/optim/loraplus.py", '(param.ndim == 1 and role != "delta")', "(param.ndim == 1)", "term",
      "RoSA's sparse values (1-D, role delta) at λ·lr"),
    M("lorafit/optim/loraplus.py", 'return not (name.endswith("bias") or "norm" in module)', 'return not name.endswith("bias")',
      "term", "normalisation weights decayed"),
    # --------------------------------------------------------------- optim/reflora.py
    M("lorafit/optim/reflora.py", "(layer.lora_A, S_inv[i] @ layer.lora_A.grad.float())", "(layer.lora_A, S[i] @ layer.lora_A.grad.float())",
      "slice", "grad_A preconditioned by S instead of S⁻¹"),
    M("lorafit/optim/reflora.py", "sig_A = lam_A.clamp_min(0).sqrt().unsqueeze(-2)", "sig_A = lam_A.clamp_min(0).unsqueeze(-2)",
      "term", "Σ_A = eigenvalues, not their square roots"),
    M("lorafit/optim/reflora.py", "live = gram_B.diagonal(dim1=-2, dim2=-1).sum(-1) > 0", "live = gram_B.diagonal(dim1=-2, dim2=-1).sum(-1) >= 0",
      "term", "a layer with B = 0 is preconditioned (its gradients zeroed)"),
    M("lorafit/optim/reflora.py", "(norm_B / torch.where(live, norm_A, 1.0)).sqrt()", "(norm_B / torch.where(live, norm_A, 1.0))",
      "term", "RefLoRA-S p = ‖B‖/‖A‖ (no square root)"),
    M("lorafit/optim/reflora.py", 'state["exp_avg_sq"].mul_(factor * factor)', 'state["exp_avg_sq"].mul_(factor)', "state",
      "RefLoRA-S second moment scaled by 1/p, not 1/p²"),
    M("lorafit/optim/reflora.py", "if trainer.step >= self.warmup:", "if trainer.step > self.warmup:", "schedule",
      "off-by-one: preconditioning starts a step late"),
    M("lorafit/optim/reflora.py", "if trainer.step + 1 >= self.warmup:", "if trainer.step >= self.warmup:", "schedule",
      "off-by-one: balancing starts a step late"),
    # --------------------------------------------------------------- optim/trust_region.py
    M("lorafit/optim/trust_region.py", "r = r + alpha * Hd", "r = r - alpha * Hd", "sign", "CG residual update sign"),
    M("lorafit/optim/trust_region.py", "d = -y + (ry_next / ry) * d", "d = -y", "term", "CG without conjugation (steepest descent)"),
    M("lorafit/optim/trust_region.py", "Hd = first_product if it == 1 and first_product is not None else hvp(d)",
      "Hd = hvp(d)", "other", "the caller's first product ignored (one product wasted per step)"),
    M("lorafit/optim/trust_region.py", "return (-b + math.sqrt(max(b * b - a * c, 0.0))) / a",
      "return (-b - math.sqrt(max(b * b - a * c, 0.0))) / a", "sign", "boundary τ: the negative root"),
    M("lorafit/optim/trust_region.py", "value += alpha * float(r @ d) + 0.5 * alpha * alpha * dHd", "value += alpha * float(r @ d)",
      "term", "m(δ) misses the quadratic term (interior steps)"),
    M("lorafit/optim/trust_region.py", "return False, cfg.shrink * radius", "return False, radius", "state", "rejection does not shrink Δ"),
    M("lorafit/optim/trust_region.py", "if rho >= cfg.eta2 and boundary:", "if rho >= cfg.eta2:", "term", "Δ grows off the boundary too"),
    M("lorafit/optim/trust_region.py", "return total + self.damping * v if self.damping else total", "return total", "term",
      "damping λ ignored"),
    # --------------------------------------------------------------- optim/ctr.py
    M("lorafit/optim/ctr.py", "actual = judged_before - loss_after", "actual = predicted", "state",
      "actual reduction := predicted (ρ ≡ 1, issue 21)"),
    M("lorafit/optim/ctr.py", "active[torch.topk(utility, keep).indices] = True", "active[torch.topk(-utility, keep).indices] = True",
      "sign", "rank schedule keeps the least useful components: topk(−utility) (issue 21)"),
    M("lorafit/optim/ctr.py", "return 0.5 * (g_a / (h_a + floor) + g_b / (h_b + floor))", "return 0.5 * (g_a / (h_a + floor))",
      "term", "utility drops the B column"),
    M("lorafit/optim/ctr.py", "return 0.5 * (g_a / (h_a + floor) + g_b / (h_b + floor))", "return 0.5 * (g_a + g_b)",
      "term", "utility without curvature (½‖g‖², the budget blind to stiffness)"),
    M("lorafit/optim/ctr.py", "return (t.sum(1), t.mean(1)) if a else (t.sum(0), t.mean(0))",
      "return (t.sum(1), t.mean(1)) if a else (t.sum(1), t.mean(1))", "slice", "B's components read by row, not column"),
    M("lorafit/optim/ctr.py", "return v * hvp(v)", "return v * v", "term", "Hutchinson probe without the curvature product"),
    M("lorafit/optim/ctr.py", "sub = closure.every(max(1, round(1 / cfg.curvature_batch)))", "sub = closure",
      "slice", "curvature products on the whole batch (curvature_batch ignored)"),
    M("lorafit/optim/ctr.py", "judged_before = closure.start_loss if judge is closure else judge.loss()",
      "judged_before = closure.start_loss", "state", "rho_batch=next compares the next batch's L(θ+δ) with this batch's L(θ)"),
    M("lorafit/optim/ctr.py", "        if not accepted:\n", "        if accepted:\n", "sign", "the accepted step is undone, the rejected kept"),
    M("lorafit/optim/ctr.py", "beta * self.fisher.to(grad.device) + (1 - beta) * squared",
      "(1 - beta) * self.fisher.to(grad.device) + beta * squared", "state", "Fisher EMA weights swapped"),
    M("lorafit/optim/ctr.py", "if self.active is None or trainer.step % self.cfg.rank_every == 0:", "if self.active is None:",
      "state", "rank choice never re-made (stale active set)"),
    M("lorafit/optim/ctr.py", "return max(0.0, damping + 2.0 * (predicted - actual) / step_sq)",
      "return max(0.0, damping + 2.0 * (actual - predicted) / step_sq)", "sign",
      "adaptive damping moves the wrong way (raises λ when the model over-estimated the curvature)"),
    M("lorafit/optim/ctr.py", "            operator.damping = damping\n", "", "state",
      "the adapted λ never reaches CG's operator (the model stays undamped)"),
    M("lorafit/optim/ctr.py", "damping = max(self.damping, cfg.relative_damping * curvature_along(first, seen))",
      "damping = self.damping", "term", "the relative floor on λ dropped"),
    M("lorafit/optim/ctr.py", "first_product=seen + damping * first)", "first_product=seen)", "term",
      "CG's reused first product lacks λ (its first iteration on the undamped model)"),
    M("lorafit/optim/ctr.py", "return float(direction @ product) / norm_sq if norm_sq > 0 else 0.0",
      "return float(direction @ product) if norm_sq > 0 else 0.0", "scale", "curvature along −g not divided by ‖g‖²"),
    M("lorafit/optim/ctr.py", "self.damping = 0.5 * damping + 0.5 * target", "self.damping = 0.5 * self.damping + 0.5 * target",
      "state", "the secant smoothed from its stale state instead of the λ the step used"),
    M("lorafit/optim/ctr.py", "        if cfg.adaptive_damping and judge is closure:", "        if cfg.adaptive_damping:",
      "state", "λ adapted under rho_batch=next from two losses of another batch"),
    # --------------------------------------------------------------- rlhf/reward.py
    M("lorafit/rlhf/reward.py", "return -F.logsigmoid(r_chosen - r_rejected).sum()", "return -F.logsigmoid(r_chosen - r_rejected).mean()",
      "scale", "pairwise loss averaged (the trainer divides by pairs again)"),
    M("lorafit/rlhf/reward.py", "return -F.logsigmoid(r_chosen - r_rejected).sum()", "return -F.logsigmoid(r_rejected - r_chosen).sum()",
      "sign", "pairwise loss prefers the rejected response"),
    M("lorafit/rlhf/reward.py", '"pairwise_accuracy": float((margin > 0).double().mean())', '"pairwise_accuracy": float((margin >= 0).double().mean())',
      "other", "a tie counts as right"),
    M("lorafit/rlhf/reward.py", "mask.reshape(b * k, length)).reshape(b, k)", "mask.reshape(b * k, length)).reshape(k, b).T",
      "slice", "pair rewards unpacked in the wrong order"),
    M("lorafit/rlhf/reward.py", "prompt = prompt[len(prompt) - keep_prompt:]", "prompt = prompt[:keep_prompt]", "slice",
      "long prompts cut from the right"),
    # --------------------------------------------------------------- rlhf/rl.py
    M("lorafit/rlhf/rl.py", "baseline = (returns.sum(-1, keepdim=True) - returns) / (k - 1)",
      "baseline = (returns.sum(-1, keepdim=True) - returns) / k", "scale", "RLOO baseline divides by k"),
    M("lorafit/rlhf/rl.py", "logits = logits[:, -n_completion - 1:-1].float() / temperature", "logits = logits[:, -n_completion:].float() / temperature",
      "slice", "log-probs not shifted (token t scored by its own position)"),
    M("lorafit/rlhf/rl.py", "logits = logits[:, -n_completion - 1:-1].float() / temperature", "logits = logits[:, -n_completion - 1:-1].float()",
      "scale", "log-probs at T = 1 whatever the sampling temperature"),
    M("lorafit/rlhf/rl.py", "positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)",
      "positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)",
      "slice", "positions count the left padding"),
    M("lorafit/rlhf/rl.py", "returns = rewards - self.kl_coef * kl", "returns = rewards + self.kl_coef * kl", "sign", "KL rewarded, not penalised"),
    M("lorafit/rlhf/rl.py", "torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)",
      "torch.maximum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)", "sign", "PPO takes the optimistic bound"),
    M("lorafit/rlhf/rl.py", "after = (is_eos.cumsum(-1) - is_eos) > 0", "after = is_eos.cumsum(-1) > 0", "slice",
      "completion mask drops the EOS token itself"),
    M("lorafit/rlhf/rl.py", "return ((logp - ref_logp) * mask).sum(-1)", "return (logp - ref_logp).sum(-1)", "term", "KL counts padding after EOS"),
    # --------------------------------------------------------------- rlhf/toy.py
    M("lorafit/rlhf/toy.py", "low <= t < high", "low < t < high", "slice", "off-by-one: id 1000 not counted"),
    M("lorafit/rlhf/toy.py", "low <= t < high", "low <= t <= high", "slice", "off-by-one: id 4000 counted"),
    M("lorafit/rlhf/toy.py", "/ len(ids) if ids else 0.0", "/ (len(ids) + 1) if ids else 0.0", "scale", "fraction over len + 1"),
]


if __name__ == "__main__":
    main()
