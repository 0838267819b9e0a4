"""logging.backends: TensorBoard and MLflow through accelerate's trackers, offline; metrics.jsonl stays."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ARGS = ("model=tiny_llama", "data=sentiment_demo", "data.max_train_examples=16", "data.max_eval_examples=8",
        "data.batch_size=4", "max_steps=4", "log_every=2", "eval_at_start=false", "progress=false")


def test_tensorboard_and_mlflow_receive_what_metrics_jsonl_holds(run_cli, tmp_path: Path, monkeypatch) -> None:
    """The losses logged at steps 2 and 4 reach both trackers with the same values as metrics.jsonl; MLflow
    keeps its store in RUN/mlflow.db (nothing lands in the working folder)."""
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    result = run_cli("train", f"output_dir={run}", *ARGS, "logging.backends=[tensorboard,mlflow]",
                     "logging.run_name=trial")
    assert result.code == 0, result.text
    logged = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "loss" in r}
    assert sorted(logged) == [2, 4]

    events = EventAccumulator(str(next((run / "tb").rglob("events.out.tfevents.*")).parent))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert tb.keys() == logged.keys() and all(abs(tb[s] - logged[s]) < 1e-5 for s in tb)

    from mlflow.tracking import MlflowClient
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("lorafit")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.run_name == "trial" and found.data.params["adapter.r"] == "8"
    history = {m.step: m.value for m in client.get_metric_history(found.info.run_id, "train/loss")}
    assert history.keys() == logged.keys() and all(abs(history[s] - logged[s]) < 1e-5 for s in history)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_tensorboard_true_still_works_and_bad_backends_are_named(run_cli, tmp_path: Path, monkeypatch) -> None:
    assert (r := run_cli("train", f"output_dir={tmp_path / 'tb'}", *ARGS, "tensorboard=true")).code == 0, r.text
    assert list((tmp_path / "tb" / "tb").rglob("events.out.tfevents.*"))
    r = run_cli("train", f"output_dir={tmp_path / 'x'}", *ARGS, "logging.backends=[comet]")
    assert r.code == 2 and "logging.backends" in r.text and "comet" in r.text and "mlflow" in r.text
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    r = run_cli("train", f"output_dir={tmp_path / 'y'}", *ARGS, "logging.backends=[wandb]")
    assert r.code == 2 and "pip install 'lorafit[wandb]'" in r.text
