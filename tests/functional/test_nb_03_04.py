"""Notebooks 03 (Llama track) and 04 (DeepSeek track) under papermill, offline, with the embedded SmolLM2.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/functional/test_nb_03_04.py -q      # ~1.5-3 min on 2 CPU cores

Each run trains 2 steps on the cpu profile (batch 2, validation loss on 4 rows) into a temporary profile's
folders, then generates before/after for 3 validation rows. The numbers are too small to show a gain; the
tests check that everything runs end to end and records finite metrics, and that 04 names notebook 02 when
its input is missing.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, run_notebook
from prodtune.notebook import read_records

pytestmark = pytest.mark.notebooks
NB03 = ROOT / "notebooks" / "03_finetune_llama.ipynb"
NB04 = ROOT / "notebooks" / "04_finetune_deepseek.ipynb"
# One torch thread: on shared CPU runners OpenMP waits made 2 threads several times slower than 1 (measured).
TRAIN = """train:
  per_device_train_batch_size: 2
  max_eval_rows: 4
  eval_on_start: false
  num_threads: 1
  llama: {max_seq_length: 128}
  deepseek: {max_seq_length: 192}
"""
PARAMS = {"MAX_STEPS": 2, "N_EVAL": 3, "MAX_NEW_TOKENS": 16}


def _profile(tmp_path: Path) -> Path:
    """A profile like cpu whose folders are all under tmp_path."""
    prof = tmp_path / "t.yaml"
    prof.write_text(f"inherit: cpu\npaths:\n  data_dir: {tmp_path}/data\n  models_dir: {tmp_path}/models\n"
                    f"  outputs_dir: {tmp_path}/outputs\n{TRAIN}")
    return prof


def _check_run(run_dir: Path, track: str, records: dict) -> dict:
    rec = records
    assert rec["steps"] == 2
    for k in ("train_loss_first", "train_loss_last", "eval_loss_last", "rouge_l_before", "rouge_l_after"):
        assert math.isfinite(rec[k]), k
    assert 0 <= rec["rouge_l_before"] <= 1 and 0 <= rec["rouge_l_after"] <= 1
    card = json.loads((run_dir / "run_card.json").read_text())
    assert card["track"] == track and card["steps"] == 2 and card["base_model"] == "embedded:smollm2-135m-instruct"
    for f in ("adapter_model.safetensors", "loss.html", "loss.png", "loss_history.csv", "before_after_validation.json"):
        assert (run_dir / f).is_file(), f
    return rec


def test_notebook_03_trains_and_compares(prepared_dir: Path, tmp_path: Path) -> None:
    prof = _profile(tmp_path)
    shutil.copytree(prepared_dir, tmp_path / "data" / "prepared")
    run_notebook(NB03, tmp_path / "03.ipynb", PROFILE=str(prof), **PARAMS)
    _check_run(tmp_path / "models" / "llama", "llama", read_records(tmp_path / "outputs", "03"))


def test_notebook_04_trains_on_cot_and_compares(tmp_path: Path) -> None:
    prof = _profile(tmp_path)
    cot = tmp_path / "data" / "cot"
    cot.mkdir(parents=True)
    rows = [{"uid": f"u{i}", "title": f"Birchmont Mat {i} mm", "Question": f"Is the Birchmont Mat {i} mm good for yoga?",
             "Complex_CoT": f"The shopper asks about yoga. The description says the mat is {i} mm thick and non-slip.",
             "Response": f"Yes: it is {i} mm thick and non-slip, so it suits yoga."} for i in range(3, 11)]
    pd.DataFrame(rows[:5]).to_parquet(cot / "train.parquet")
    pd.DataFrame(rows[5:]).to_parquet(cot / "validation.parquet")
    run_notebook(NB04, tmp_path / "04.ipynb", PROFILE=str(prof), **PARAMS)
    _check_run(tmp_path / "models" / "deepseek", "deepseek", read_records(tmp_path / "outputs", "04"))


def test_notebook_04_without_cot_data_says_run_notebook_02(tmp_path: Path) -> None:
    prof = _profile(tmp_path)
    cmd = [sys.executable, "-m", "papermill", str(NB04), str(tmp_path / "04.ipynb"), "--cwd", str(ROOT), "-k", "python3",
           "--no-progress-bar", "-p", "PROFILE", str(prof), "-p", "MAX_STEPS", "1"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode != 0
    assert "run notebook 02 first" in res.stderr + res.stdout
    assert not (tmp_path / "models" / "deepseek" / "run_card.json").exists()
