"""Shared fixtures: the repo root, the committed sample, offline mode, and a prepared sample folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "data" / "sample" / "trn_sample.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def sample_path() -> Path:
    return SAMPLE


R1_TEMPLATE = ROOT / "tests" / "data" / "r1_distill_chat_template.jinja"  # DeepSeek-R1-Distill-Llama-8B's own


def make_r1_tokenizer():
    """The embedded SmolLM2 tokenizer dressed as DeepSeek-R1-Distill-Llama-8B's: its chat template (a copy of the
    hub file, in tests/data), its BOS / EOS / turn tokens, BOS added on encoding, `<think>` tags as added tokens."""
    from prodtune.models import embedded_llm_dir, load_tokenizer

    tok = load_tokenizer(embedded_llm_dir())
    bos, eos = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
    tok.add_tokens([bos, eos, "<｜User｜>", "<｜Assistant｜>"], special_tokens=True)
    tok.add_tokens(["<think>", "</think>"])
    tok.bos_token, tok.eos_token = bos, eos
    tok.add_bos_token = True
    tok.chat_template = R1_TEMPLATE.read_text(encoding="utf-8")
    return tok


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory) -> Path:
    """Stage 01 run once on the committed sample (all products, default split)."""
    from prodtune.data import Config, run

    out = tmp_path_factory.mktemp("prepared")
    run(Config(input=str(SAMPLE), out_dir=str(out), write_jsonl=True, progress=False))
    return out


def run_notebook(path: Path, out: Path, timeout_s: int = 900, **params) -> Path:
    """Run a notebook with papermill from the repo root (as run_all.sh does) and return the executed copy."""
    cmd = [sys.executable, "-m", "papermill", str(path), str(out), "--cwd", str(ROOT), "-k", "python3", "--no-progress-bar"]
    if params:
        import yaml

        cmd += ["-y", yaml.safe_dump(params)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    assert res.returncode == 0, f"{path.name} failed:\n{res.stderr[-4000:]}"
    return out
