"""Tests for GLUE loading (lorafit.data.glue) and the GLUE metrics (lorafit.metrics).

The fixtures under tests/fixtures/glue are small hand-written files in the original
download-script formats; no test touches the network.
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from pathlib import Path

import pytest

from lorafit.data import glue
from lorafit.data.glue import GLUE_TASKS, get_task, glue_metrics, load_glue_hub, read_glue_split
from lorafit.metrics import accuracy

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "glue"
REAL_GLUE = Path(__file__).resolve().parents[2] / "shared" / "data" / "glue"

# (task, split) -> number of rows in the fixture file.
EXPECTED_COUNTS = {
    ("cola", "train"): 6,
    ("cola", "dev"): 5,
    ("sst2", "train"): 7,
    ("sst2", "dev"): 5,
    ("mrpc", "train"): 6,
    ("mrpc", "dev"): 5,
    ("stsb", "train"): 5,
    ("stsb", "dev"): 6,
    ("qqp", "train"): 5,
    ("qqp", "dev"): 6,
    ("mnli", "train"): 6,
    ("mnli", "dev_matched"): 5,
    ("mnli", "dev_mismatched"): 7,
    ("qnli", "train"): 5,
    ("qnli", "dev"): 6,
    ("rte", "train"): 7,
    ("rte", "dev"): 5,
    ("wnli", "train"): 5,
    ("wnli", "dev"): 5,
}

# (task, split, row index) -> the full expected row.
EXPECTED_ROWS = {
    ("cola", "train", 3): ("Who did you see the cat and?", None, 0),
    ("cola", "dev", 4): ("The kettle, which was old, still whistled.", None, 1),
    ("sst2", "train", 0): ("a warm , generous little film about two stubborn brothers ", None, 1),
    ("sst2", "dev", 3): ("it 's as flat as the paper it was written on ", None, 0),
    ("mrpc", "train", 1): (
        "Shares of the bakery chain rose 4 percent on Tuesday.",
        "The bakery chain opened twelve new stores last year.",
        0,
    ),
    ("mrpc", "dev", 4): (
        "Doctors said the patient was in stable condition.",
        "The patient is stable, according to doctors.",
        1,
    ),
    ("stsb", "train", 3): ("I think the answer is no.", "The answer is probably yes.", 1.6),
    ("stsb", "dev", 1): ("A man is cutting bread.", "A woman is singing.", 0.25),
    ("qqp", "train", 1): ("Why is the sky blue?", "Why are sunsets red?", 0),
    ("qqp", "dev", 2): (
        "Which language should I learn first, Python or C?",
        "Should a beginner start with Python or C?",
        1,
    ),
    ("mnli", "train", 2): (
        "The old harbour is lined with fish restaurants.",
        "The restaurants are expensive.",
        1,
    ),
    ("mnli", "dev_matched", 4): (
        "i don't really watch much television",
        "I watch television all day.",
        2,
    ),
    ("mnli", "dev_mismatched", 4): (
        "The call lasted about four minutes.",
        "The call was short.",
        1,
    ),
    ("qnli", "train", 1): (
        "Who designed the town hall?",
        "The town hall is painted a pale shade of yellow.",
        1,
    ),
    ("qnli", "dev", 2): (
        "How many moons does the planet have?",
        "Astronomers have counted three moons around the planet.",
        0,
    ),
    ("rte", "train", 4): (
        "Mara Lind, a painter from Bergen, won the prize.",
        "Mara Lind is from Bergen.",
        0,
    ),
    ("rte", "dev", 0): (
        "The festival attracted more than 20,000 visitors this year.",
        "The festival was cancelled this year.",
        1,
    ),
    ("wnli", "train", 1): (
        "The trophy didn't fit in the bag because it was too small.",
        "The trophy was too small.",
        0,
    ),
    ("wnli", "dev", 4): ("Lucy lent Mia a coat because she was cold.", "Mia was cold.", 1),
}

# Label column of each whole split, to check the id mapping row by row.
EXPECTED_LABELS = {
    ("cola", "train"): [1, 0, 1, 0, 1, 0],
    ("mnli", "train"): [0, 2, 1, 2, 0, 1],
    ("mnli", "dev_mismatched"): [0, 2, 1, 2, 1, 0, 2],
    ("rte", "dev"): [1, 0, 0, 1, 0],
    ("qnli", "dev"): [0, 1, 0, 1, 0, 1],
    ("stsb", "dev"): [5.0, 0.25, 2.4, 4.4, 3.0, 4.6],
}


# ----------------------------------------------------------------------------- tasks


def test_task_table_covers_the_nine_tasks() -> None:
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert {(t, s) for t in GLUE_TASKS for s in ("train", *GLUE_TASKS[t].dev_splits)} == set(
        EXPECTED_COUNTS
    )


def test_label_order_matches_the_hub_copy() -> None:
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    assert get_task("qnli").labels == ("entailment", "not_entailment")
    assert get_task("rte").labels == ("entailment", "not_entailment")
    for name in ("cola", "sst2", "mrpc", "qqp", "wnli"):
        assert get_task(name).labels == ("0", "1")


def test_num_labels_and_regression() -> None:
    assert get_task("stsb").is_regression and get_task("stsb").num_labels == 1
    assert get_task("stsb").labels is None
    assert get_task("mnli").num_labels == 3 and not get_task("mnli").is_regression
    assert get_task("sst2").num_labels == 2


def test_metric_names_per_task() -> None:
    assert get_task("cola").metrics == ("mcc",)
    assert get_task("mrpc").metrics == ("accuracy", "f1")
    assert get_task("qqp").metrics == ("accuracy", "f1")
    assert get_task("stsb").metrics == ("pearson", "spearman")
    assert get_task("mnli").dev_splits == ("dev_matched", "dev_mismatched")


def test_get_task_accepts_folder_names() -> None:
    assert get_task("SST-2") is GLUE_TASKS["sst2"]
    assert get_task("STS-B").name == "stsb"
    assert get_task(" MNLI ").name == "mnli"


def test_get_task_unknown_name_lists_allowed() -> None:
    with pytest.raises(ValueError) as err:
        get_task("sst5")
    message = str(err.value)
    assert "'sst5'" in message and "\n" not in message
    for name in GLUE_TASKS:
        assert name in message


# ----------------------------------------------------------------------------- fixtures


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED_COUNTS))
def test_every_split_loads(task: str, split: str) -> None:
    rows = read_glue_split(task, FIXTURES, split)
    assert len(rows) == EXPECTED_COUNTS[(task, split)]
    assert [r["idx"] for r in rows] == list(range(len(rows)))
    spec = get_task(task)
    single = len(spec.text_columns) == 1
    for row in rows:
        assert set(row) == {"idx", "text_a", "text_b", "label"}
        assert isinstance(row["text_a"], str) and row["text_a"]
        assert (row["text_b"] is None) if single else isinstance(row["text_b"], str)
        if spec.is_regression:
            assert isinstance(row["label"], float)
        else:
            assert isinstance(row["label"], int) and 0 <= row["label"] < spec.num_labels


@pytest.mark.parametrize(("task", "split", "index"), sorted(EXPECTED_ROWS))
def test_specific_rows(task: str, split: str, index: int) -> None:
    text_a, text_b, label = EXPECTED_ROWS[(task, split, index)]
    row = read_glue_split(task, FIXTURES, split)[index]
    assert row == {"idx": index, "text_a": text_a, "text_b": text_b, "label": label}


@pytest.mark.parametrize(("task", "split"), sorted(EXPECTED_LABELS))
def test_label_columns(task: str, split: str) -> None:
    labels = [r["label"] for r in read_glue_split(task, FIXTURES, split)]
    assert labels == EXPECTED_LABELS[(task, split)]


def test_mnli_dev_means_dev_matched() -> None:
    assert read_glue_split("mnli", FIXTURES, "dev") == read_glue_split(
        "mnli", FIXTURES, "dev_matched"
    )
    assert read_glue_split("mnli", FIXTURES, "validation_mismatched") == read_glue_split(
        "mnli", FIXTURES, "dev_mismatched"
    )


def test_split_names_are_checked() -> None:
    with pytest.raises(ValueError, match="'dev_mismatched'.*'sst2'.*'train', 'dev'"):
        read_glue_split("sst2", FIXTURES, "dev_mismatched")
    with pytest.raises(ValueError, match="'test'"):
        read_glue_split("rte", FIXTURES, "test")


def test_root_accepts_str() -> None:
    assert len(read_glue_split("rte", str(FIXTURES), "train")) == 7


def test_mrpc_bom_is_dropped() -> None:
    path = FIXTURES / "MRPC" / "train.tsv"
    assert path.read_bytes().startswith(b"\xef\xbb\xbfQuality\t")
    _, header = next(glue._tsv_lines(path))
    assert header[0] == "Quality"
    assert [r["label"] for r in read_glue_split("mrpc", FIXTURES, "train")] == [1, 0, 1, 0, 1, 1]


def test_quotes_survive_unchanged() -> None:
    mrpc = read_glue_split("mrpc", FIXTURES, "train")
    assert mrpc[0]["text_a"] == 'The mayor called the new bridge "a gift to the next generation."'
    assert mrpc[3]["text_a"] == '"We are not selling," the founder told reporters.'
    assert mrpc[5]["text_a"] == 'He said the plan "was never about money.'  # unbalanced quote
    assert mrpc[5]["text_b"] == "He said the plan had never been about money."
    mnli = read_glue_split("mnli", FIXTURES, "train")
    assert mnli[0]["text_a"] == 'She whispered, "Keep the lantern low."'
    mismatched = read_glue_split("mnli", FIXTURES, "dev_mismatched")
    assert mismatched[1]["text_a"] == 'The sign read "No ""parking"" here".'
    assert mismatched[1]["label"] == 2


def test_cola_reads_positional_columns() -> None:
    rows = read_glue_split("cola", FIXTURES, "train")
    assert rows[0]["text_a"] == "The gardener watered the tomatoes before breakfast."
    assert rows[1] == {
        "idx": 1,
        "text_a": "The gardener watered before the tomatoes breakfast.",
        "text_b": None,
        "label": 0,
    }


# ----------------------------------------------------------------------------- errors


def _write(root: Path, folder: str, stem: str, text: str) -> Path:
    path = root / folder / f"{stem}.tsv"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _one_paragraph(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_root(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        read_glue_split("sst2", root, "train")
    message = _one_paragraph(err)
    assert str(root / "SST-2" / "train.tsv") in message
    assert "data.path" in message and "<TASK>/" in message and "does not exist" in message


def test_missing_task_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        read_glue_split("rte", tmp_path, "dev")
    message = _one_paragraph(err)
    assert str(tmp_path / "RTE" / "dev.tsv") in message and "no RTE/ folder" in message


def test_missing_file_lists_folder(tmp_path: Path) -> None:
    _write(tmp_path, "MNLI", "train", "x")
    with pytest.raises(FileNotFoundError) as err:
        read_glue_split("mnli", tmp_path, "dev_mismatched")
    message = _one_paragraph(err)
    assert str(tmp_path / "MNLI" / "dev_mismatched.tsv") in message and "train.tsv" in message


def test_root_pointing_at_task_folder_gets_a_hint() -> None:
    with pytest.raises(FileNotFoundError) as err:
        read_glue_split("rte", FIXTURES / "RTE", "train")
    message = _one_paragraph(err)
    assert "task folder itself" in message and str(FIXTURES) in message


def test_wrong_folder_case_gets_a_hint(tmp_path: Path) -> None:
    _write(tmp_path, "sst-2", "train", "sentence\tlabel\nok \t1\n")
    if (tmp_path / "SST-2").exists():  # case-insensitive file system
        pytest.skip("file system ignores case")
    with pytest.raises(FileNotFoundError, match="must be exactly 'SST-2'"):
        read_glue_split("sst2", tmp_path, "train")


@pytest.mark.parametrize("text", ["", "\n\n", "sentence\tlabel\n"])
def test_empty_file(tmp_path: Path, text: str) -> None:
    path = _write(tmp_path, "SST-2", "train", text)
    with pytest.raises(ValueError) as err:
        read_glue_split("sst2", tmp_path, "train")
    message = _one_paragraph(err)
    assert str(path) in message and "empty" in message


def test_empty_cola_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "CoLA", "dev", "")
    with pytest.raises(ValueError, match="empty") as err:
        read_glue_split("cola", tmp_path, "dev")
    assert str(path) in str(err.value)


def test_missing_header_column(tmp_path: Path) -> None:
    text = "index\tpremise\tsentence2\tlabel\n0\ta\tb\tentailment\n"
    path = _write(tmp_path, "RTE", "train", text)
    with pytest.raises(ValueError) as err:
        read_glue_split("rte", tmp_path, "train")
    message = _one_paragraph(err)
    assert str(path) in message and "'sentence1'" in message
    assert "['index', 'premise', 'sentence2', 'label']" in message


def test_bom_not_stripped_would_be_caught(tmp_path: Path) -> None:
    # A doubled BOM leaves one in the first column name: reported as a missing column.
    text = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t1\t2\ta\tb\n"
    path = tmp_path / "MRPC" / "dev.tsv"
    path.parent.mkdir()
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    with pytest.raises(ValueError, match="no column 'Quality'"):
        read_glue_split("mrpc", tmp_path, "dev")


def test_short_row(tmp_path: Path) -> None:
    text = "index\tquestion\tsentence\tlabel\n0\tq?\ts.\tentailment\n1\tq?\ts.\n"
    path = _write(tmp_path, "QNLI", "dev", text)
    with pytest.raises(ValueError) as err:
        read_glue_split("qnli", tmp_path, "dev")
    message = _one_paragraph(err)
    assert str(path) in message and "line 3" in message and "3 tab-separated fields" in message


def test_short_cola_row(tmp_path: Path) -> None:
    path = _write(tmp_path, "CoLA", "train", "s1\t1\t\tFine.\ns1\t0\n")
    with pytest.raises(ValueError, match="line 2") as err:
        read_glue_split("cola", tmp_path, "train")
    assert str(path) in str(err.value)


def test_blank_lines_are_skipped_and_line_numbers_stay_physical(tmp_path: Path) -> None:
    text = "index\tsentence1\tsentence2\tlabel\n\n0\ta\tb\t1\n\n1\tc\td\t2\n"
    path = _write(tmp_path, "WNLI", "dev", text)
    with pytest.raises(ValueError) as err:
        read_glue_split("wnli", tmp_path, "dev")
    assert f"{path}, line 5" in str(err.value)


def test_unknown_label(tmp_path: Path) -> None:
    header = "index\tpromptID\tpairID\tgenre\tsentence1\tsentence2\tlabel1\tgold_label\n"
    body = "0\t1\t1n\tfiction\ta\tb\tneutral\tneutral\n1\t2\t2n\tfiction\tc\td\t-\t-\n"
    path = _write(tmp_path, "MNLI", "train", header + body)
    with pytest.raises(ValueError) as err:
        read_glue_split("mnli", tmp_path, "train")
    message = _one_paragraph(err)
    assert str(path) in message and "line 3" in message and "'-'" in message
    assert "['entailment', 'neutral', 'contradiction']" in message


def test_unknown_binary_label(tmp_path: Path) -> None:
    _write(tmp_path, "SST-2", "dev", "sentence\tlabel\ngood \tpositive\n")
    with pytest.raises(ValueError, match=r"line 2: unknown label 'positive'.*\['0', '1'\]"):
        read_glue_split("sst2", tmp_path, "dev")


def _stsb(score: str) -> str:
    columns = "index genre filename year old_index source1 source2 sentence1 sentence2 score"
    header = columns.replace(" ", "\t") + "\n"
    return header + f"0\tg\tf\ty\t0\tnone\tnone\ta\tb\t{score}\n"


@pytest.mark.parametrize("score", ["high", "", "nan"])
def test_non_numeric_stsb_score(tmp_path: Path, score: str) -> None:
    path = _write(tmp_path, "STS-B", "train", _stsb(score))
    with pytest.raises(ValueError) as err:
        read_glue_split("stsb", tmp_path, "train")
    message = _one_paragraph(err)
    assert str(path) in message and "line 2" in message and repr(score) in message
    assert "not a number" in message


def test_out_of_range_stsb_score(tmp_path: Path) -> None:
    _write(tmp_path, "STS-B", "train", _stsb("7.5"))
    with pytest.raises(ValueError, match="'7.5' is outside the range 0..5"):
        read_glue_split("stsb", tmp_path, "train")


def test_crlf_files_read_cleanly(tmp_path: Path) -> None:
    _write(tmp_path, "RTE", "dev", "index\tsentence1\tsentence2\tlabel\r\n0\ta\tb\tentailment\r\n")
    assert read_glue_split("rte", tmp_path, "dev") == [
        {"idx": 0, "text_a": "a", "text_b": "b", "label": 0}
    ]


def test_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "SST-2" / "train.tsv"
    path.parent.mkdir()
    path.write_bytes(b"sentence\tlabel\ncaf\xe9 \t1\n")
    with pytest.raises(ValueError, match="not valid UTF-8") as err:
        read_glue_split("sst2", tmp_path, "train")
    assert str(path) in str(err.value)


# ----------------------------------------------------------------------------- hub (no network)


def _fake_datasets(monkeypatch: pytest.MonkeyPatch, load_dataset) -> list:
    calls: list = []

    def recorder(*args, **kwargs):
        calls.append((args, kwargs))
        return load_dataset(*args, **kwargs)

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=recorder))
    return calls


def test_load_glue_hub_is_importable() -> None:
    assert callable(load_glue_hub)


def test_load_glue_hub_maps_splits_and_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    examples = [
        {"premise": "p0", "hypothesis": "h0", "label": 2, "idx": 0},
        {"premise": "p1", "hypothesis": "h1", "label": 0, "idx": 1},
    ]
    sst2 = [{"sentence": "s ", "label": 0, "idx": 0}]
    calls = _fake_datasets(
        monkeypatch, lambda path, name, split: examples if name == "mnli" else sst2
    )
    rows = load_glue_hub("mnli", "dev_mismatched")
    assert calls == [(("nyu-mll/glue", "mnli"), {"split": "validation_mismatched"})]
    assert rows == [
        {"idx": 0, "text_a": "p0", "text_b": "h0", "label": 2},
        {"idx": 1, "text_a": "p1", "text_b": "h1", "label": 0},
    ]
    load_glue_hub("mnli", "dev")
    load_glue_hub("sst2", "dev")
    load_glue_hub("sst2", "train")
    assert [c[1]["split"] for c in calls[1:]] == ["validation_matched", "validation", "train"]


def test_load_glue_hub_single_sentence_and_regression(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_datasets(monkeypatch, lambda *a, **k: [{"sentence": "fine ", "label": 1, "idx": 0}])
    assert load_glue_hub("sst2", "train") == [
        {"idx": 0, "text_a": "fine ", "text_b": None, "label": 1}
    ]
    _fake_datasets(
        monkeypatch, lambda *a, **k: [{"sentence1": "a", "sentence2": "b", "label": 3.8, "idx": 0}]
    )
    assert load_glue_hub("stsb", "dev")[0]["label"] == 3.8


def test_load_glue_hub_wraps_network_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("Couldn't reach 'nyu-mll/glue' on the Hub (LocalEntryNotFoundError)")

    _fake_datasets(monkeypatch, offline)
    with pytest.raises(ConnectionError) as err:
        load_glue_hub("rte", "dev")
    message = _one_paragraph(err)
    assert "'rte'" in message and "data.path" in message and "Couldn't reach" in message


# ----------------------------------------------------------------------------- metrics

# Ten binary predictions with TP=3, FP=2, FN=1, TN=4 (counted by hand below).
BIN_PREDS = [1, 1, 1, 0, 0, 1, 0, 0, 1, 0]
BIN_GOLD = [1, 0, 1, 1, 0, 1, 0, 0, 0, 0]


def test_confusion_counts_of_the_example() -> None:
    pairs = list(zip(BIN_PREDS, BIN_GOLD))
    assert (pairs.count((1, 1)), pairs.count((1, 0)), pairs.count((0, 1)), pairs.count((0, 0))) == (
        3,
        2,
        1,
        4,
    )


def test_accuracy_and_f1_by_hand() -> None:
    tp, fp, fn, tn = 3, 2, 1, 4
    expected_accuracy = (tp + tn) / (tp + fp + fn + tn)  # 7 / 10
    precision, recall = tp / (tp + fp), tp / (tp + fn)  # 3/5, 3/4
    expected_f1 = 2 * precision * recall / (precision + recall)  # 2/3
    result = glue_metrics("mrpc", BIN_PREDS, BIN_GOLD)
    assert list(result) == ["accuracy", "f1"]
    assert result["accuracy"] == pytest.approx(0.7) == pytest.approx(expected_accuracy)
    assert result["f1"] == pytest.approx(2 / 3) == pytest.approx(expected_f1)
    assert glue_metrics("qqp", BIN_PREDS, BIN_GOLD) == result
    assert accuracy(BIN_PREDS, BIN_GOLD) == pytest.approx(0.7)


def test_mcc_by_hand() -> None:
    tp, fp, fn, tn = 3, 2, 1, 4
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert expected == pytest.approx(10 / math.sqrt(600))
    assert glue_metrics("cola", BIN_PREDS, BIN_GOLD) == {"mcc": pytest.approx(expected)}


def test_multiclass_accuracy() -> None:
    # 4 of 6 predictions equal their labels.
    assert glue_metrics("mnli", [0, 1, 2, 2, 1, 0], [0, 1, 1, 2, 0, 0]) == {
        "accuracy": pytest.approx(4 / 6)
    }


def test_pearson_by_hand() -> None:
    preds = [1.0, 2.0, 3.0, 4.0]
    gold = [1.5, 1.0, 3.5, 4.0]
    mp, mg = sum(preds) / 4, sum(gold) / 4  # 2.5, 2.5
    cov = sum((p - mp) * (g - mg) for p, g in zip(preds, gold))  # 1.5 + 0.75 + 0.5 + 2.25 = 5
    var_p = sum((p - mp) ** 2 for p in preds)  # 5.0
    var_g = sum((g - mg) ** 2 for g in gold)  # 1 + 2.25 + 1 + 2.25 = 6.5
    assert cov == pytest.approx(5.0) and var_p == 5.0 and var_g == 6.5
    result = glue_metrics("stsb", preds, gold)
    assert result["pearson"] == pytest.approx(5.0 / math.sqrt(5.0 * 6.5))
    # A case with an exact value: cov 1, variances 2 and 2 -> r = 1/2.
    assert glue_metrics("stsb", [1, 2, 3], [1, 3, 2])["pearson"] == pytest.approx(0.5)


def test_spearman_by_hand() -> None:
    preds = [0.1, 0.4, 0.2, 0.9]  # ranks 1 3 2 4
    gold = [1.0, 3.0, 4.0, 2.0]  # ranks 1 3 4 2
    d_squared = (1 - 1) ** 2 + (3 - 3) ** 2 + (2 - 4) ** 2 + (4 - 2) ** 2  # 8
    n = 4
    expected = 1 - 6 * d_squared / (n * (n * n - 1))  # 1 - 48/60 = 0.2
    result = glue_metrics("stsb", preds, gold)
    assert list(result) == ["pearson", "spearman"]
    assert result["spearman"] == pytest.approx(expected) == pytest.approx(0.2)


def test_metrics_return_plain_floats() -> None:
    import numpy as np

    for task, preds, gold in [
        ("mrpc", np.array(BIN_PREDS), np.array(BIN_GOLD)),
        ("cola", BIN_PREDS, BIN_GOLD),
        ("stsb", np.array([0.5, 2.0, 4.5]), [1.0, 2.0, 5.0]),
    ]:
        for value in glue_metrics(task, preds, gold).values():
            assert type(value) is float


def test_degenerate_inputs_give_zero_without_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert glue_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]) == {
            "pearson": 0.0,
            "spearman": 0.0,
        }
        assert glue_metrics("stsb", [1.0, 2.0, 3.0], [4.0, 4.0, 4.0]) == {
            "pearson": 0.0,
            "spearman": 0.0,
        }
        assert glue_metrics("stsb", [3.0], [1.0]) == {"pearson": 0.0, "spearman": 0.0}
        assert glue_metrics("cola", [1, 1, 1, 1], [0, 1, 0, 1]) == {"mcc": 0.0}
        assert glue_metrics("cola", [0, 0, 0], [0, 0, 0]) == {"mcc": 0.0}
        assert glue_metrics("mrpc", [0, 0, 0], [1, 0, 1]) == {
            "accuracy": pytest.approx(1 / 3),
            "f1": 0.0,
        }
        assert glue_metrics("mrpc", [1, 1], [1, 1]) == {"accuracy": 1.0, "f1": 1.0}


def test_integral_float_class_ids_are_accepted() -> None:
    assert glue_metrics("sst2", [1.0, 0.0], [1, 1]) == {"accuracy": 0.5}


@pytest.mark.parametrize(
    ("task", "preds", "gold", "pattern"),
    [
        ("sst2", [1, 0], [1], "2 predictions and 1 labels"),
        ("sst2", [], [], "at least one"),
        ("sst2", [[0.2, 0.8]], [1], "1-D"),
        ("sst2", [0.7, 0.2], [1, 0], "integer class ids"),
        ("stsb", [float("nan"), 1.0], [1.0, 2.0], "finite"),
        ("boolq", [1], [1], "Unknown GLUE task 'boolq'"),
    ],
)
def test_metric_input_errors(task: str, preds, gold, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        glue_metrics(task, preds, gold)


# ----------------------------------------------------------------------------- real files


@pytest.mark.skipif(
    not REAL_GLUE.is_dir(), reason=f"real GLUE files not found at {REAL_GLUE} (optional check)"
)
@pytest.mark.parametrize(("task", "count"), [("sst2", 872), ("rte", 277), ("mrpc", 408)])
def test_real_dev_files(task: str, count: int) -> None:
    folder = REAL_GLUE / get_task(task).folder
    if not (folder / "dev.tsv").is_file():
        pytest.skip(f"{folder / 'dev.tsv'} not found")
    rows = read_glue_split(task, REAL_GLUE, "dev")
    assert len(rows) == count
    assert {r["label"] for r in rows} == {0, 1}
    assert all(r["text_a"] for r in rows)


def test_pairs_longer_than_max_length_are_cut_and_counted(minilm_dir: str, capsys) -> None:
    """``tokenize`` on RTE pairs: each is exactly what the tokenizer gives at ``max_length`` (longest
    first), the run says how many were cut — counted here from the untruncated lengths — and no
    ``truncated`` column reaches the batches (it would be fed to the model). Kills a count of pairs
    that merely reach max_length, and a pair encoded at ``max_length + 1``."""
    from transformers import AutoTokenizer

    from lorafit.data.batches import tokenize
    from lorafit.data.options import GlueData

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    rows = read_glue_split("rte", FIXTURES, "train")
    lengths = [len(tokenizer(r["text_a"], r["text_b"])["input_ids"]) for r in rows]
    max_length = sorted(lengths)[len(lengths) // 2]            # about half are longer
    longer = sum(n > max_length for n in lengths)
    assert 0 < longer < len(rows) and max_length in lengths    # one pair is exactly max_length long
    ds = tokenize(GlueData(task="rte", path=str(FIXTURES), max_length=max_length), "train", tokenizer, None)
    assert "truncated" not in ds.column_names
    for row, got in zip(rows, ds):
        want = tokenizer(row["text_a"], row["text_b"], truncation=True, max_length=max_length)["input_ids"]
        assert got["input_ids"] == want
    said = " ".join(capsys.readouterr().err.split())
    assert f"{longer} of {len(rows)} train examples" in said and f"data.max_length={max_length}" in said
