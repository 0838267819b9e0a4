"""``lorafit train -m`` (sweeps) and ``lorafit report SWEEP_DIR`` (each group at its best learning rate).

The sweeps train the tiny random Llama for 2-3 steps on 16 examples of the shipped sentiment set,
in-process. What each test catches:

- expansion: the product of the swept values (a zip or a product missing a factor fails), the
  common overrides kept in each run, in order;
- a key one option lacks (``optimizer.lr`` under ``optimizer=ctr``) is refused before anything runs:
  no folder is created (validating lazily, run by run, would have trained the adamw run first);
- 2×2: four run folders, and the same command again retrains nothing (the adapters' mtimes and the
  metrics files are unchanged);
- an interrupted run (SIGTERM after its step-2 checkpoint) is resumed from that checkpoint by the
  same command (restarting it would log steps 1, 2 twice), and the finished run before it is skipped;
- one failing run does not stop the others; the exit code is 2;
- a changed sweep in an existing sweep folder, and a folder with foreign files, are refused untouched;
- the report picks the best lr per group (max for accuracy, min for a loss), on synthetic run folders.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lorafit.config import ConfigError
from lorafit.eval.report import quarters, sweep_rows
from lorafit.sweep import SWEEP_MARKER, expand, folder_name

from test_failures import cli

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TINY = ("model=tiny_llama", "progress=false", "eval_at_start=false", "log_every=1",
        "data=sentiment_demo", "data.max_train_examples=16", "data.max_eval_examples=8", "data.batch_size=8")


def sweep(root: Path, *overrides: str) -> tuple[int, str]:
    return cli("train", "-m", *TINY, *overrides, f"output_dir={root}")


def snapshot(root: Path) -> dict[str, tuple[float, bytes]]:
    """mtime and bytes of every file under ``root`` (the tokenised-data cache aside)."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and "cache" not in p.parts}


def steps_logged(run: Path) -> list[int]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "split" not in r]


# ------------------------------------------------------------------------------------ expansion
def test_expand_is_the_product_of_the_swept_values_in_command_line_order() -> None:
    common, runs = expand(["model=tiny_llama", "init=kaiming,pissa,lora_ga", "optim.lr=1e-4,1e-3", "seed=range(0,2)",
                           "data.path=/a/b"])
    assert common == ["model=tiny_llama", "data.path=/a/b"]
    assert len(runs) == 3 * 2 * 2
    assert len({r.folder for r in runs}) == 12
    assert {tuple(r.swept.values()) for r in runs} == {(i, lr, s) for i in ("kaiming", "pissa", "lora_ga")
                                                       for lr in ("0.0001", "0.001") for s in ("0", "1")}
    first = runs[0]
    assert first.swept == {"init": "kaiming", "optimizer.lr": "0.0001", "seed": "0"}   # optim → optimizer
    assert first.overrides == ["model=tiny_llama", "init=kaiming", "optim.lr=0.0001", "seed=0", "data.path=/a/b"]
    assert first.folder == "init=kaiming,optimizer.lr=0.0001,seed=0"
    # choice() and list values: a list is one value, not a sweep
    _, runs = expand(["+adapter=choice(lora,dora)", "data.tasks=[a,b]"])
    assert [r.overrides for r in runs] == [["+adapter=lora", "data.tasks=[a,b]"], ["+adapter=dora", "data.tasks=[a,b]"]]
    assert folder_name({"data.path": "/x/y"}) == "data.path=_x_y"


@pytest.mark.parametrize("overrides, named", [
    (["output_dir=a,b"], "output_dir"),
    (["optimizer.lr=interval(0,1)"], "interval"),
    (["optim.lr=1,2", "optimizer.lr=3,4"], "swept twice"),
])
def test_expand_refuses_what_a_sweep_cannot_vary(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        expand(overrides)


def test_a_key_that_one_option_lacks_is_refused_before_anything_runs(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    code, text = sweep(root, "optimizer=adamw,ctr", "optimizer.lr=1e-3", "max_steps=2")
    assert code == 2 and "Traceback" not in text
    assert "Sweep run 2 of 2 (optimizer=ctr)" in text and "'optimizer.lr'" in text and "Nothing has run" in text
    assert not root.exists()


def test_sweep_syntax_without_m_asks_for_it(tmp_path: Path) -> None:
    code, text = cli("train", *TINY, "optim.lr=1e-3,1e-2", f"output_dir={tmp_path / 'x'}")
    assert code == 2 and "Add -m" in text and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------- running and resuming
def test_a_2x2_sweep_runs_four_runs_and_the_same_command_retrains_none(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    args = ("init=kaiming,pissa", "optimizer.lr=1e-3,1e-2", "max_steps=2")
    code, text = sweep(root, *args)
    assert code == 0, text
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    assert folders == ["init=kaiming,optimizer.lr=0.001", "init=kaiming,optimizer.lr=0.01",
                       "init=pissa,optimizer.lr=0.001", "init=pissa,optimizer.lr=0.01"]
    for name in folders:
        assert (root / name / "results.json").is_file() and steps_logged(root / name) == [1, 2]
    manifest = json.loads((root / SWEEP_MARKER).read_text())
    assert [r["folder"] for r in manifest["runs"]] == manifest["files"]
    assert manifest["runs"][3]["overrides"][-4:-1] == ["init=pissa", "optimizer.lr=0.01", "max_steps=2"]
    # each run trained with its own values (the folder name is not just a label)
    configs = {name: (root / name / "config.yaml").read_text() for name in folders}
    assert "lr: 0.01\n" in configs["init=pissa,optimizer.lr=0.01"]
    assert "PiSSAInit" in configs["init=pissa,optimizer.lr=0.01"] and "KaimingInit" in configs[folders[0]]

    before = snapshot(root)
    code, text = sweep(root, *args)
    assert code == 0, text
    assert text.count("finished earlier, skipped") == 4
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k != SWEEP_MARKER} == {k: v for k, v in before.items() if k != SWEEP_MARKER}

    # a third lr extends the sweep: only its two runs train (save_every changes no result: accepted)
    code, text = sweep(root, "init=kaiming,pissa", "optimizer.lr=1e-3,1e-2,1e-1", "max_steps=2", "save_every=5")
    assert code == 0, text
    assert text.count("finished earlier, skipped") == 4 and len([p for p in root.iterdir() if p.is_dir()]) == 6
    assert {k: v for k, v in snapshot(root).items() if k in before and k != SWEEP_MARKER} == \
        {k: v for k, v in before.items() if k != SWEEP_MARKER}

    # other common settings in the same folder: refused, nothing touched
    kept = snapshot(root)
    code, text = sweep(root, "init=kaiming,pissa", "optimizer.lr=1e-3,1e-2", "max_steps=3")
    assert code == 2 and "max_steps=2 then, max_steps=3 now" in text and "Traceback" not in text
    assert snapshot(root) == kept

    # the report of it: one row per init, each at its best lr
    code, text = cli("report", str(root), "--markdown")
    assert code == 0, text
    assert "| init=kaiming |" in text and "| init=pissa |" in text and "accuracy at each lr" in text


def test_an_interrupted_run_is_resumed_and_a_failed_one_does_not_stop_the_others(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lorafit.run
    from lorafit.train import trainer as trainer_module

    root = tmp_path / "sweep"
    args = ("optimizer.lr=1e-3,2e-3,3e-3", "max_steps=3", "save_every=1", "keep_checkpoints=5")
    real_save = trainer_module.Trainer.save_checkpoint

    def sigterm_after_step_2(self):
        folder = real_save(self)
        if self.run_dir.name == "optimizer.lr=0.002" and self.step == 2:
            self._signal = "SIGTERM"          # what the SIGTERM handler sets
        return folder

    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", sigterm_after_step_2)
    code, text = sweep(root, *args)
    assert code == 130, text
    assert "stopped by SIGTERM after step 2 of 3" in text
    assert "Resume with: lorafit train -m" in text and "resume=true" not in text
    assert steps_logged(root / "optimizer.lr=0.001") == [1, 2, 3]
    assert steps_logged(root / "optimizer.lr=0.002") == [1, 2]
    assert not (root / "optimizer.lr=0.003").exists()
    monkeypatch.setattr(trainer_module.Trainer, "save_checkpoint", real_save)

    real_train = lorafit.run.train

    def third_fails(cfg):
        if cfg.output_dir.endswith("optimizer.lr=0.003"):
            raise ConfigError("a made-up failure of run 3")
        return real_train(cfg)

    monkeypatch.setattr(lorafit.run, "train", third_fails)
    first = snapshot(root / "optimizer.lr=0.001")
    code, text = sweep(root, *args)
    assert code == 2, text
    assert "finished earlier, skipped" in text and "(resuming)" in text
    assert "a made-up failure of run 3" in text and "1 of 3 runs failed" in text
    assert snapshot(root / "optimizer.lr=0.001") == first
    assert steps_logged(root / "optimizer.lr=0.002") == [1, 2, 3]     # resumed at step 3, not restarted
    assert (root / "optimizer.lr=0.002" / "results.json").is_file()


def test_a_folder_with_foreign_files_or_a_single_run_is_refused(tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    code, text = sweep(foreign, "optimizer.lr=1e-3,1e-2", "max_steps=2")
    assert code == 2 and "notes.txt" in text and "did not write" in text
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]


# ----------------------------------------------------------------------------------- the report
def fake_run(root: Path, folder: str, results: dict, losses: list[float], evals: tuple = ()) -> None:
    run = root / folder
    run.mkdir(parents=True)
    (run / "results.json").write_text(json.dumps(results))
    rows = [{"step": i + 1, "loss": loss} for i, loss in enumerate(losses)]
    rows += [{"step": step, "split": "sst2", "eval/accuracy": acc} for step, acc in evals]
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def fake_sweep(root: Path, cells: dict[tuple[str, str], float], metric: str = "accuracy") -> None:
    runs = []
    for (init, lr), value in cells.items():
        folder = f"init={init},optimizer.lr={lr}"
        runs.append({"folder": folder, "swept": {"init": init, "optimizer.lr": lr}, "overrides": []})
        if value is not None:
            losses = [1.0 + value, 0.5, 0.4, value]
            fake_run(root, folder, {"sst2": {metric: value, "n": 100}}, losses, evals=((2, value / 2), (4, value)))
    (root / SWEEP_MARKER).write_text(json.dumps({"command": "sweep", "common": [], "runs": runs,
                                                 "files": [r["folder"] for r in runs]}))


def test_the_report_picks_each_groups_best_lr(tmp_path: Path) -> None:
    fake_sweep(tmp_path, {("kaiming", "0.0001"): 0.80, ("kaiming", "0.001"): 0.85, ("kaiming", "0.0003"): 0.82,
                          ("pissa", "0.0001"): 0.84, ("pissa", "0.001"): None, ("pissa", "0.0003"): 0.83})
    split, metric, rows = sweep_rows(tmp_path)
    assert (split, metric) == ("sst2", "accuracy")
    by_group = {r["group"]: r for r in rows}
    assert list(by_group) == ["init=kaiming", "init=pissa"]
    assert (by_group["init=kaiming"]["best_lr"], by_group["init=kaiming"]["best"]) == ("0.001", 0.85)
    assert (by_group["init=pissa"]["best_lr"], by_group["init=pissa"]["best"]) == ("0.0001", 0.84)
    # every lr listed in numeric order (the unfinished one without a value)
    assert by_group["init=pissa"]["by_lr"] == [("0.0001", 0.84), ("0.0003", 0.83), ("0.001", None)]
    assert by_group["init=kaiming"]["evals"] == [(2, 0.425), (4, 0.85)]
    # 4 steps: quarters are step 1 and step 4 (the first loss is 1 + accuracy)
    assert by_group["init=kaiming"]["loss_early"] == pytest.approx(1.85)
    assert by_group["init=kaiming"]["loss_late"] == pytest.approx(0.85)
    code, text = cli("report", str(tmp_path), "--markdown")
    assert code == 0, text
    assert "| init=kaiming | 1e-3 | 0.8500 |" in text and "1e-4: 0.8000, 3e-4: 0.8200, 1e-3: 0.8500" in text
    assert "| init=pissa | 1e-4 | 0.8400 |" in text and "1e-3: –" in text


def test_the_report_ranks_a_loss_lowest_first_and_names_a_missing_metric(tmp_path: Path) -> None:
    fake_sweep(tmp_path, {("kaiming", "0.001"): 2.0, ("kaiming", "0.01"): 1.5}, metric="loss")
    _, metric, rows = sweep_rows(tmp_path)
    assert metric == "loss" and rows[0]["best_lr"] == "0.01"
    with pytest.raises(ConfigError, match="Available: sst2/loss"):
        sweep_rows(tmp_path, "accuracy")


def test_report_errors_for_a_missing_or_empty_sweep(tmp_path: Path) -> None:
    code, text = cli("report", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in text
    fake_sweep(tmp_path, {("kaiming", "0.001"): None})
    code, text = cli("report", str(tmp_path))
    assert code == 2 and "No run of this sweep has results yet" in text
    code, text = cli("report", str(tmp_path / "init=kaiming,optimizer.lr=0.001"), "--markdown")
    assert code == 2 and "apply to a sweep folder" in text


def test_quarters_of_the_steps() -> None:
    assert quarters([(s, 0.0) for s in range(1, 101)]) == ((1, 25), (76, 100))
    assert quarters([(s, 0.0) for s in range(1, 4)]) == ((1, 1), (3, 3))
