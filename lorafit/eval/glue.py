"""``lorafit eval MODEL suite=glue``: where GLUE (and every classification or regression data option)
is scored — the dev split(s) through the model's own head, with the official metrics
(:func:`lorafit.data.glue.glue_metrics`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from rich.progress import Progress

from lorafit.config import ConfigError, EvalConfig
from lorafit.console import console
from lorafit.data.batches import tokenize
from lorafit.data.commonsense import CommonsenseData
from lorafit.data.glue import get_task
from lorafit.data.options import GlueData
from lorafit.eval.load import load_for_scoring
from lorafit.eval.report import print_results, save_eval
from lorafit.task import predict, score


def evaluate_glue(path: str, cfg: EvalConfig) -> dict[str, dict]:
    """``lorafit eval PATH suite=glue``: score ``path`` on the data's dev splits; print them and, with
    ``output_dir``, write results.json, results.md (+ predictions). ``tasks=[...]`` scores several
    GLUE tasks."""
    data = cfg.data
    if isinstance(data, CommonsenseData):
        raise ConfigError("data=commonsense is scored with suite=commonsense (and a protocol); add suite=commonsense.")
    if cfg.tasks and not isinstance(data, GlueData):
        raise ConfigError(f"tasks=[...] with suite=glue names GLUE tasks, but data={type(data).__name__} was chosen. "
                          f"Drop tasks= or use data=glue.")
    for name in cfg.tasks or []:
        try:
            get_task(name)
        except ValueError as exc:
            raise ConfigError(f"tasks=[...]: {exc}") from None
    if cfg.limit is not None:
        data.max_eval_examples = cfg.limit
    tasks = [dataclasses.replace(data, task=t) for t in cfg.tasks] if cfg.tasks else [data]
    accelerator = cfg.hardware.accelerator()
    results, predictions, kinds = {}, {}, set()
    with Progress(console=console, disable=not accelerator.is_main_process) as progress:
        for task_data in tasks:
            scored = load_for_scoring(path, task_data.head, task_data.num_labels, f"data={type(task_data).__name__}")
            model, tokenizer = scored.model.to(accelerator.device), scored.tokenizer
            kinds.add(scored.kind)
            for split in task_data.eval_splits:
                dataset = tokenize(task_data, split, tokenizer, None)
                name = task_data.split_name(split)
                bar = progress.add_task(f"eval {name}", total=len(dataset))
                result = predict(model, dataset, task_data.head, cfg.batch_size, tokenizer.pad_token_id,
                                 accelerator.device, accelerator, progress=lambda n, b=bar: progress.advance(b, n))
                results[name] = score(task_data, result)
                predictions[name] = result
    if accelerator.is_main_process:
        kind = ", ".join(sorted(kinds))
        print_results(results, title=f"{path} [{kind}]")
        save_eval(path, cfg, results, f"lorafit eval {path} ({kind}), suite={cfg.suite}",
                  lambda folder: write_predictions(folder / "predictions.jsonl", predictions))
    return results


def write_predictions(file: Path, predictions: dict[str, dict]) -> None:
    with open(file, "w") as f:
        for split, result in predictions.items():
            for idx, (label, pred) in enumerate(zip(result.get("labels", []), result.get("predictions", []))):
                record = {"idx": idx, "label": label, "prediction": pred}
                if len(predictions) > 1:
                    record["split"] = split
                f.write(json.dumps(record) + "\n")
