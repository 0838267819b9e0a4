"""``lorafit eval`` on all nine GLUE tasks at once (``tasks=[...]``), ``results.md``, and ``lorafit report``.

The GLUE fixtures (tests/fixtures/glue, the download-script formats) are scored by a tiny random
Llama saved as a plain Hugging Face folder (a new classification head per task): the point is
the plumbing (every task, MNLI's two dev sets, STS-B as regression, ``n`` per task), not the
scores. The metric functions themselves are checked by hand in tests/test_glue.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pytest
from test_train import cli

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

GLUE = Path(__file__).resolve().parent / "fixtures" / "glue"
NINE = ["cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"]
# result name -> (metrics, dev rows in the fixture)
EXPECTED = {
    "cola": ({"mcc"}, 5), "sst2": ({"accuracy"}, 5), "mrpc": ({"accuracy", "f1"}, 5),
    "stsb": ({"pearson", "spearman"}, 6), "qqp": ({"accuracy", "f1"}, 6), "mnli": ({"accuracy"}, 5),
    "mnli_mismatched": ({"accuracy"}, 7), "qnli": ({"accuracy"}, 6), "rte": ({"accuracy"}, 5),
    "wnli": ({"accuracy"}, 5),
}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, make_tiny_llama_cfg) -> Path:
    """A tiny random Llama written as a plain HF folder (config, weights, MiniLM's tokenizer)."""
    from lorafit.models import load_model, load_tokenizer, save_base

    cfg = make_tiny_llama_cfg()
    tokenizer = load_tokenizer(cfg)
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    save_base(load_model(cfg, "causal_lm", tokenizer=tokenizer), tokenizer, folder)
    return folder


def test_all_nine_glue_tasks_in_one_eval(tiny_llama_dir: Path, tmp_path: Path) -> None:
    code, text = cli("eval", str(tiny_llama_dir), f"tasks=[{','.join(NINE)}]", f"data.path={GLUE}",
                     f"output_dir={tmp_path}", "batch_size=4", "save_predictions=true")
    assert code == 0, text
    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results) == list(EXPECTED)
    for name, (metrics, n) in EXPECTED.items():
        assert set(results[name]) == metrics | {"n"}, name
        assert results[name]["n"] == n
        assert all(math.isfinite(v) for v in results[name].values())
    table = (tmp_path / "results.md").read_text().splitlines()
    assert table[2].startswith("| task | mcc | n | accuracy | f1 | pearson | spearman |")
    assert any(line.startswith("| mnli_mismatched |  | 7 |") for line in table)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(records) == sum(n for _, n in EXPECTED.values())
    assert all(isinstance(r["prediction"], float) for r in records if r["split"] == "stsb")


def test_glue_task_names_are_checked(tiny_llama_dir: Path) -> None:
    code, text = cli("eval", str(tiny_llama_dir), "tasks=[sst2,boolq]", f"data.path={GLUE}")
    assert code == 2 and "Unknown GLUE task 'boolq'" in text and "Traceback" not in text
    code, text = cli("eval", str(tiny_llama_dir), "tasks=[sst2]", "data=sentiment_demo")
    assert code == 2 and "tasks=[...] with suite=glue names GLUE tasks" in text


# ------------------------------------------------------------------------------------ report
def _fake_run(folder: Path, results: dict, losses: Optional[list[float]] = None, config: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "results.json").write_text(json.dumps(results))
    if losses is not None:
        rows = [{"step": i + 1, "loss": x, "lr": 1e-3} for i, x in enumerate(losses)]
        rows.insert(1, {"step": 1, "split": "rte", "eval/accuracy": 0.5})
        (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    if config:
        (folder / "config.yaml").write_text(
            "model:\n  _target_: lorafit.config.ModelConfig\n  name_or_path: tiny_llama\n"
            "adapter:\n  _target_: lorafit.adapters.lora.LoRAConfig\n  r: 8\n"
            "optimizer:\n  _target_: lorafit.optim.basic.AdamWConfig\n  lr: 0.001\n"
            "data:\n  _target_: lorafit.data.tasks.GlueData\n  task: rte\nmax_steps: 3\n")
    return folder


def test_report_puts_runs_side_by_side(tmp_path: Path) -> None:
    a = _fake_run(tmp_path / "a" / "run",
                  {"rte": {"accuracy": 0.6, "n": 277}, "mrpc": {"accuracy": 0.7, "f1": 0.8, "n": 408}}, losses=[0.9, 0.7, 0.5])
    b = _fake_run(tmp_path / "b" / "run", {"rte": {"accuracy": 0.65, "n": 277}}, losses=[1.0, 0.8, 0.6])
    c = _fake_run(tmp_path / "eval", {"ARC-Easy": {"protocol": "loglik", "acc": 0.3, "acc_norm": 0.31, "n": 40}},
                  config=False)
    out = tmp_path / "report"
    code, text = cli("report", str(a), str(b), str(c), "--output-dir", str(out))
    assert code == 0, text
    report = (out / "report.md").read_text()
    assert "| task | metric | a/run | b/run | eval |" in report  # duplicate folder names get their parent
    assert "| rte | accuracy | 0.6000 | **0.6500** |  |" in report  # the best of each row in bold
    assert "| rte | n | 277 | 277 |  |" in report  # counts are not ranked
    assert "| ARC-Easy | protocol |  |  | loglik |" in report
    assert "| a/run | tiny_llama | LoRA r=8 | AdamW lr=0.001 | Glue rte | 3 |" in report
    rows = [line.split(" | ")[0] for line in report.splitlines() if line.startswith("| ")]
    assert rows.index("| mrpc") > rows.index("| rte")  # the rows of one task stay together
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![training loss](loss.png)" in report


def test_report_refuses_folders_without_results(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, text = cli("report", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "r"))
    assert code == 2 and "holds neither results.json nor metrics.jsonl" in text
    code, text = cli("report", str(tmp_path / "nowhere"))
    assert code == 2 and "does not exist" in text
