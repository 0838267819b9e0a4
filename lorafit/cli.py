"""``lorafit train | estimate | merge | export | eval | chat | report``: the command line.

``lorafit train [--recipe FILE] [overrides]`` composes ``configs/train.yaml`` with Hydra, applies a
recipe (a diff-only Hydra file, see ``recipes/``) and the overrides, validates everything against
the schema, then assembles the model and runs the trainer. Overrides accept ``+adapter=dora`` as
well as ``adapter=dora``, and ``optim`` as the short name of ``optimizer``. ``lorafit train -m``
runs a sweep (``init=kaiming,pissa optimizer.lr=1e-4,1e-3``: one run per combination,
:mod:`lorafit.sweep`); ``lorafit report SWEEP_DIR`` shows each method at its best learning rate.

Every command runs inside one error boundary (:func:`run_command`): an expected failure — a bad
config value, a missing or malformed file, a folder lorafit may not write, out of memory, a
diverged run — ends in one paragraph naming the value at fault and the fix (exit code 2); Ctrl-C
stops training at a checkpoint and prints the command that resumes it (exit code 130); anything
else is a bug: a short paragraph says where the full traceback was written (exit code 1).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any, Optional, Sequence

from lorafit.config import CONFIG_DIR, GROUP_ALIASES, GROUPS, KEY_ALIASES, ConfigError


def rewrite_overrides(overrides: Sequence[str], groups: Sequence[str] = GROUPS) -> list[str]:
    """``+adapter=dora`` → ``adapter=dora``; ``optim=ctr`` / ``optim.lr=1`` → ``optimizer=...``;
    ``reward.run=R`` → ``task.reward.run=R``; ``model.dropout=0`` → ``++model.dropout=0`` (group keys
    are checked by the schema, not the YAML).

    The groups already have a default in ``train.yaml``, so Hydra's "append" form (``+group=x``)
    would fail; both spellings mean "choose option x" here.
    """
    out = []
    for item in overrides:
        key, eq, value = item.partition("=")
        plus = key.startswith("+") and not key.startswith("++")
        bare = key[1:] if plus else key
        head, dot, rest = bare.partition(".")
        if dot and head in KEY_ALIASES:     # reward.run=X → task.reward.run=X
            head, _, more = KEY_ALIASES[head].partition(".")
            rest = more + "." + rest
        head = GROUP_ALIASES.get(head, head)
        bare = head + dot + rest
        if plus and head in groups and not dot:
            key = bare  # choose a group option
        elif not plus and head in groups and dot and not key.startswith(("+", "~")):
            # A schema key absent from the option's YAML (model.dropout, data.max_train_examples)
            # is still valid: let Hydra add it; `validate` rejects keys the schema lacks.
            key = "++" + bare
        else:
            key = ("+" if plus else "") + bare
        out.append(key + eq + value)
    return out


def _hydra_error(exc: Exception, config_name: str) -> ConfigError:
    """Turn a Hydra composition error into one readable paragraph."""
    import dataclasses
    from lorafit.config import EvalConfig, TrainConfig

    schema = EvalConfig if config_name == "eval" else TrainConfig
    groups = [g for g in GROUPS if g in {f.name for f in dataclasses.fields(schema)}]
    top_keys = [f.name for f in dataclasses.fields(schema) if f.name not in GROUPS]
    text = " ".join(str(exc).split())
    missing = re.search(r"Could not find '([\w-]+)/([^']+)'.*?Available options in '[\w-]+': (.*?) Config search", text)
    if missing:
        group, option, options = missing.groups()
        return ConfigError(f"Unknown {group} option '{option}'. Available options for {group}: "
                           f"{', '.join(options.split())}. Choose one, e.g. {group}={options.split()[0]}.")
    if "is not in struct" in text or "Could not override" in text or "Could not append" in text:
        key = text.split("'")[1] if "'" in text else text
        group = key.split(".")[0]
        hint = (f" Its allowed keys are listed by `lorafit train --help-config {group}`." if group in groups
                else f" Top-level keys of `lorafit {config_name}`: {', '.join(top_keys)}; config groups: "
                     + ", ".join(groups) + ".")
        return ConfigError(f"Unknown config key '{key}' in the overrides.{hint} Check its spelling.")
    return ConfigError(f"Could not compose the config: {text}")


def compose(config_name: str, overrides: Sequence[str], recipe: Optional[str] = None) -> Any:
    """Compose ``configs/<config_name>.yaml`` + recipe + overrides into a DictConfig."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = rewrite_overrides(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        if recipe is not None:
            text = read_recipe(Path(recipe))
            (Path(tmp) / "recipe").mkdir()
            (Path(tmp) / "recipe" / "selected.yaml").write_text(text, encoding="utf-8")
            overrides = [f"hydra.searchpath=[file://{tmp}]", "+recipe=selected", *overrides]
        GlobalHydra.instance().clear()
        try:
            with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
                return hydra_compose(config_name=config_name, overrides=list(overrides))
        except ConfigError:
            raise
        except Exception as exc:  # Hydra's own exceptions carry no common base class worth naming
            error = _hydra_error(exc, config_name)
            if recipe is not None:  # name the user's file, not the temporary copy Hydra read
                text = str(error).replace(str(Path(tmp) / "recipe" / "selected.yaml"), str(recipe))
                text = text.replace(f"file://{tmp}", str(Path(recipe).parent)).replace("recipe/selected", str(recipe))
                error = ConfigError(f"{text} (in the recipe {recipe})" if str(recipe) not in text else text)
            raise error from None
        finally:
            GlobalHydra.instance().clear()


def read_recipe(path: Path) -> str:
    """A recipe's text, checked to be a YAML mapping (a syntax error names the file and line)."""
    import yaml

    from lorafit.files import read_text

    if not path.is_file():
        raise ConfigError(f"Recipe file '{path}' does not exist. Recipes live in recipes/ "
                          f"(e.g. --recipe recipes/sst2_lora.yaml).")
    text = read_text(path, "Recipe file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"Recipe file {path} is not valid YAML{where}: {problem}. Fix that line; recipes/ "
                          f"holds working examples.") from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"Recipe file {path} must hold a YAML mapping of config keys (e.g. `max_steps: 100`), "
                          f"not a {type(data).__name__}.")
    return text


def help_config(group: str) -> str:
    """The keys (with defaults) of every option of a group, for ``--help-config GROUP``."""
    from lorafit.config import schema_of, to_object

    group = GROUP_ALIASES.get(group, group)
    if group not in GROUPS:
        return f"No config group named '{group}'. Groups: {', '.join(GROUPS)} (optim = optimizer)."
    lines = []
    for file in sorted((CONFIG_DIR / group).glob("*.yaml")):
        node = compose("train", [f"{group}={file.stem}"])[group]
        schema = schema_of(node, group)
        try:
            values = vars(to_object(node, schema, group))
        except ConfigError:  # options with a required key (data=instruct needs data.path)
            values = {k: v for k, v in node.items() if k != "_target_"}
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        lines.append(f"{group}={file.stem}  [{schema.__module__}.{schema.__name__}]\n    {shown}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- processes
def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE`` of torchrun / ``accelerate launch``), 1 if none.

    Raises:
        ConfigError: ``accelerate launch --cpu --num_processes N`` (N > 1), which starts one process
            (its CPU launcher fans out only through mpirun): it sets ``MASTER_PORT`` and no world size.
    """
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1") and "MASTER_PORT" in env:
        raise ConfigError("`accelerate launch --cpu --num_processes N` starts a single process (accelerate's CPU "
                          "launcher fans out only through mpirun), so this run would silently train on one. Start N CPU "
                          "processes with `lorafit train hardware.num_processes=N ...` or `torchrun --nproc_per_node N "
                          "-m lorafit train ...`.")
    return 1


def start_processes(count: int, argv: Sequence[str]) -> int:
    """``hardware.num_processes=N``: run ``lorafit train`` in N processes on this machine (torch's elastic
    launcher, what ``torchrun`` runs: gloo on CPU, nccl on GPUs); returns their exit code. A process's
    failure is its own one-paragraph message; the launcher adds no traceback of its own."""
    import logging
    import socket
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    print(f"lorafit: starting {count} processes (torch.distributed.run --nproc_per_node {count})", file=sys.stderr)
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=count, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
                          rdzv_endpoint=f"127.0.0.1:{port}", max_restarts=0)
    try:
        elastic_launch(config, sys.executable)("-m", "lorafit", *argv)
    except ChildFailedError as exc:           # the process that failed said why
        return max((f.exitcode for f in exc.failures.values() if f.exitcode > 0), default=1)
    return 0


# ---------------------------------------------------------------------------------- commands
def cmd_train(args: argparse.Namespace) -> int:
    from lorafit.config import validate
    from lorafit.run import train
    from lorafit.sweep import is_sweep

    if args.multirun:
        return train_sweep(args)
    swept = is_sweep(args.overrides)
    if swept is not None:
        raise ConfigError(f"'{swept}' gives several values: that is a sweep. Add -m to train once per value "
                          f"(lorafit train -m {' '.join(shlex.quote(o) for o in args.overrides)}), or give one value.")
    composed = compose("train", args.overrides, args.recipe)
    try:
        cfg = validate(composed)
    except ConfigError as exc:
        if args.recipe is None:
            raise
        raise ConfigError(f"{exc} (The config came from the recipe {args.recipe} and the command line.)") from None
    args.log_dir = cfg.output_dir
    wanted, launched = cfg.hardware.num_processes, launched_processes()
    if wanted > 1 and launched == 1:
        return start_processes(wanted, args.argv)
    if wanted > 1 and launched != wanted:
        raise ConfigError(f"hardware.num_processes={wanted}, but the launcher started {launched} processes. Leave "
                          f"hardware.num_processes at 1 under torchrun / accelerate launch (they choose the count).")
    train(cfg)
    return 0


def train_sweep(args: argparse.Namespace) -> int:
    """``lorafit train -m``: expand the sweep, compose and validate every run, claim the sweep folder,
    then train the runs one after another (:mod:`lorafit.sweep`)."""
    from lorafit.config import validate
    from lorafit.console import console
    from lorafit.run import train
    from lorafit.sweep import claim_sweep, expand, run_sweep, write_manifest

    common, runs = expand(args.overrides)
    configs = []
    for number, run in enumerate(runs, start=1):
        try:
            configs.append(validate(compose("train", run.overrides, args.recipe)))
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v}" for k, v in run.swept.items())
            source = f" (with the recipe {args.recipe})" if args.recipe else ""
            raise ConfigError(f"Sweep run {number} of {len(runs)} ({shown}){source} is invalid: {exc} Nothing has "
                              f"run. Sweep a key only together with options that have it (split the sweep into one "
                              f"`lorafit train -m` per option), or fix the value.") from None
    if launched_processes() > 1 or any(c.hardware.num_processes > 1 for c in configs):
        raise ConfigError("lorafit train -m runs its runs in this one process; it cannot run them across several "
                          "processes yet. Drop hardware.num_processes (and torchrun / accelerate launch), or start "
                          "each run yourself with `lorafit train hardware.num_processes=N output_dir=...`.")
    root = Path(configs[0].output_dir)
    manifest = claim_sweep(root, common, args.recipe, runs)
    write_manifest(root, manifest)
    console.print(f"lorafit train -m: {len(runs)} runs → {root}")

    def describe(exc: BaseException, folder: Path) -> tuple[int, str, str]:
        return failure(exc, str(folder), args.argv)

    return run_sweep(root, runs, configs, train, describe)


def cmd_estimate(args: argparse.Namespace) -> int:
    from rich.table import Table

    from lorafit.config import validate
    from lorafit.console import results_console
    from lorafit.estimate import estimate

    cfg = validate(compose("train", args.overrides, args.recipe))
    cfg.data.resolve(cfg.model)
    found = estimate(cfg, processes=args.processes)
    table = Table(title=f"lorafit estimate: {cfg.model.name_or_path}, {type(cfg.adapter).__name__}, "
                        f"{args.processes} process(es), per process")
    for column in ("part", "MiB", "what"):
        table.add_column(column, justify="right" if column == "MiB" else "left")
    for part, mib, what in found.rows():
        table.add_row(part, f"{mib:,.1f}", what)
    results_console.print(table)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorafit.merge import merge

    merge(args.run_dir, args.out_dir, base_model=args.base_model, overwrite=args.overwrite, dtype=args.dtype,
          max_shard_size=args.max_shard_size)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from lorafit.export import export

    export(args.run_dir, args.out_dir, args.format, approx=args.approx, max_rank=args.max_rank,
           base_model=args.base_model, overwrite=args.overwrite)
    return 0


def eval_overrides(overrides: Sequence[str]) -> list[str]:
    """``suite=commonsense`` without a ``data=`` choice also chooses ``data=commonsense``."""
    overrides = list(overrides)
    choose_data = not any(re.match(r"^\+?data=", o) for o in overrides)
    if choose_data and "suite=commonsense" in (o.replace(" ", "") for o in overrides):
        overrides.insert(0, "data=commonsense")
    return overrides


def cmd_eval(args: argparse.Namespace) -> int:
    from lorafit.config import EvalConfig, validate
    from lorafit.eval import evaluate

    cfg = validate(compose("eval", eval_overrides(args.overrides)), EvalConfig, groups=("data", "hardware"))
    evaluate(args.model, cfg)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lorafit.eval.chat import chat

    chat(args.model, prompt=args.prompt, system=args.system, max_new_tokens=args.max_new_tokens,
         temperature=args.temperature)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from lorafit.eval.report import is_sweep_folder, report, sweep_report

    if len(args.run_dirs) == 1 and is_sweep_folder(Path(args.run_dirs[0])):
        sweep_report(Path(args.run_dirs[0]), metric=args.metric, markdown=args.markdown, output_dir=args.output_dir,
                     overwrite=args.overwrite)
        return 0
    if args.metric or args.markdown:
        raise ConfigError("--metric and --markdown apply to a sweep folder (one folder written by `lorafit train -m`, "
                          f"holding lorafit_sweep.json); {' '.join(args.run_dirs)} is not one. Drop them to compare "
                          f"these runs side by side.")
    report(args.run_dirs, args.output_dir or "report", overwrite=args.overwrite)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune with an adapter (Hydra overrides: key=value ...)")
    p.add_argument("--recipe", help="a recipe YAML from recipes/ (diff-only over configs/train.yaml)")
    p.add_argument("--help-config", metavar="GROUP", help="list the options and keys of a config group")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="a sweep: one run per combination of the swept values (init=kaiming,pissa "
                        "optimizer.lr=1e-4,1e-3), each in a folder under output_dir; re-running skips finished runs")
    p.add_argument("overrides", nargs="*", help="e.g. model=minilm +adapter=lora adapter.r=8 max_steps=100")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("estimate", help="predict a training run's peak memory per process (same overrides as train)")
    p.add_argument("--recipe", help="a recipe YAML, as for train")
    p.add_argument("--processes", type=int, default=1, help="processes the global batch is split across (default 1)")
    p.add_argument("overrides", nargs="*", help="the overrides you would give `lorafit train`")
    p.set_defaults(func=cmd_estimate)
    p = sub.add_parser("merge", help="fold RUN's adapter into the base model; write a plain HF folder")
    p.add_argument("run_dir", help="a training run folder (or its adapter/ or a checkpoint)")
    p.add_argument("out_dir", help="where to write the merged Hugging Face model folder")
    p.add_argument("--base-model", help="the base model (default: the one recorded at training)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `lorafit merge` output in OUT")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="dtype of the merged model (default: the run's model.dtype, e.g. bf16 for a bf16 base)")
    p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB or 500MB (default 2GB)")
    p.set_defaults(func=cmd_merge)
    p = sub.add_parser("export", help="write RUN's adapter as a PEFT adapter folder (for PEFT, vLLM, SGLang, TGI)")
    p.add_argument("run_dir", help="a training run folder (or its adapter/ or a checkpoint)")
    p.add_argument("out_dir", help="where to write the PEFT adapter folder")
    p.add_argument("--format", choices=["peft", "servable"], default="peft",
                   help="peft: exact, what PeftModel.from_pretrained loads (default); servable: a plain LoRA of one "
                        "rank that vLLM/SGLang/TGI load (causal LMs)")
    p.add_argument("--approx", action="store_true",
                   help="where a layer has no exact form, write the truncated SVD of its ΔW (errors are recorded)")
    p.add_argument("--max-rank", type=int, help="cap every layer's rank (needs --approx where the exact rank is higher)")
    p.add_argument("--base-model", help="the base model (default: the one recorded at training)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `lorafit export` output in OUT")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("eval", help="score a base model folder, a run folder or a merged folder")
    p.add_argument("model", help="a Hugging Face model folder, a run folder or a merged folder")
    p.add_argument("overrides", nargs="*",
                   help="e.g. suite=glue data.task=sst2 data.path=DIR output_dir=EVAL; "
                        "suite=commonsense protocol=loglik \"tasks=[boolq,piqa]\" data.path=DIR")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("chat", help="talk to a trained model with its chat template (a run, merged or HF folder)")
    p.add_argument("model", help="a run folder, a merged folder or a causal-LM folder with a chat template")
    p.add_argument("--prompt", help="answer this one message on stdout and exit (for scripts)")
    p.add_argument("--system", help="a system message to start the conversation with")
    p.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("report", help="compare runs side by side: metrics table and loss curves (report.md, loss.png); "
                                      "or a sweep folder: each method at its best learning rate")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="training run folders or `lorafit eval` output folders, or one sweep folder (`train -m`)")
    p.add_argument("--output-dir", help="where report.md (and loss.png) go (default: report/; for a sweep folder "
                                        "the table is only printed unless this is given)")
    p.add_argument("--metric", help="sweep folder: the dev metric that picks the best lr, NAME or SPLIT/NAME "
                                    "(default: the first metric of the first split in results.json, e.g. accuracy)")
    p.add_argument("--markdown", action="store_true", help="sweep folder: print the table as markdown")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier `lorafit report` output there")
    p.set_defaults(func=cmd_report)
    return parser


def quiet_libraries() -> None:
    """Keep the terminal for lorafit's own progress: no load reports or per-map progress bars."""
    import logging
    import os
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # bitsandbytes warns at import on CPUs with AVX512-BF16 when the optional `kernels` package is absent;
    # lorafit does not use that kernel (lorafit.models keeps one weight format), so the warning is noise.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import datasets
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()


# ---------------------------------------------------------------------------- error boundary
OUT_OF_MEMORY_FIX = ("Lower data.batch_size (or keep it and raise hardware.grad_accum_steps, which splits each "
                     "step into smaller micro-batches), lower data.max_length, or, for evaluation, eval "
                     "batch_size / data.eval_batch_size.")


def say(command: str, label: str, text: str) -> None:
    """One paragraph on stderr: ``lorafit COMMAND: LABEL: text``."""
    from rich.markup import escape  # a value like `[bold]x` in the message is text, not markup

    from lorafit.console import console

    console.print(f"[bold red]lorafit {command}: {label}:[/] {escape(text)}", highlight=False)


def crash_log(log_dir: Optional[str]) -> Path:
    """Where the traceback of an unexpected error goes: ``RUN/error.log`` (``error-rank<N>.log`` on other
    processes) when the run folder exists, else a new file in the temp folder."""
    rank = int(os.environ.get("RANK", "0") or 0)
    if log_dir and Path(log_dir).is_dir():
        return Path(log_dir) / ("error.log" if rank == 0 else f"error-rank{rank}.log")
    handle, name = tempfile.mkstemp(prefix="lorafit-error-", suffix=".log")
    os.close(handle)
    return Path(name)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted ``lorafit train`` run (a sweep: the same command)."""
    words = [w for w in argv if not re.match(r"^\+*resume=", w)]
    again = [] if {"-m", "--multirun"} & set(words) else ["resume=true"]
    return "lorafit " + " ".join(shlex.quote(w) for w in [*words, *again])


def failure(exc: BaseException, log_dir: Optional[str], argv: Sequence[str]) -> tuple[int, str, str]:
    """(exit code, label, one paragraph) for an exception that ended a command (or one run of a sweep)."""
    import torch

    from lorafit.train.trainer import Interrupted

    if isinstance(exc, ConfigError):
        return 2, "error", str(exc)
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        device = "GPU" if isinstance(exc, torch.OutOfMemoryError) else "CPU"
        return 2, "out of memory", (f"The {device} ran out of memory ({str(exc).splitlines()[0][:200]}). "
                                    f"{OUT_OF_MEMORY_FIX}")
    if isinstance(exc, Interrupted):
        return 130, "interrupted", f"{exc} Resume with: {resume_command(argv)}"
    if isinstance(exc, KeyboardInterrupt):
        return 130, "interrupted", "Stopped by Ctrl-C."
    if _in_process_group() and _peer_failed(exc):
        return 2, "stopped", "Another process of this run failed (its message is above), so this one stopped too."
    # a bug: keep the traceback for the report, show a short paragraph
    log = crash_log(log_dir)
    log.write_text(f"lorafit {' '.join(shlex.quote(w) for w in argv)}\n\n"
                   f"{''.join(traceback.format_exception(type(exc), exc, exc.__traceback__))}")
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return 1, "internal error", (f"This is a bug in lorafit, not a mistake of yours: {type(exc).__name__}: {text}. "
                                 f"The full traceback is in {log}. Please report it with that file and the command "
                                 f"you ran.")


def run_command(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run one command inside the error boundary; the exit code."""
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        code, label, text = failure(exc, getattr(args, "log_dir", None), argv)
        say(args.command, label, text)
        return code


def flags_first(argv: list[str]) -> list[str]:
    """``lorafit train k=v -m k2=a,b`` → ``lorafit train -m k=v k2=a,b`` (argparse takes no flag
    between two runs of positional overrides)."""
    if not argv or argv[0] != "train":
        return argv
    flags = [w for w in argv[1:] if w in ("-m", "--multirun")]
    return [argv[0], *flags, *(w for w in argv[1:] if w not in flags)]


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(flags_first(argv))
    args.argv = argv
    quiet_libraries()
    if getattr(args, "help_config", None):
        args.func = lambda a: print(help_config(a.help_config)) or 0
    code = run_command(args, argv)
    if code not in (0, 130) and _in_process_group():
        # One rank failed: exit at once so that the launcher ends the others, instead of leaving
        # them waiting forever in a collective this rank will never join.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _peer_failed(exc: BaseException) -> bool:
    """Did a collective fail because another process died (rather than through a fault of this one)?"""
    import torch.distributed as dist

    text = str(exc)
    return isinstance(exc, getattr(dist, "DistError", ())) or "closed by peer" in text or "remote worker" in text


def _in_process_group() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:  # pragma: no cover
        return False
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


if __name__ == "__main__":
    main()
