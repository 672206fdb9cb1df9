"""Notebook 05 under papermill on the committed sample: builds the store, evaluates retrieval, records the figures.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/functional/test_nb_05.py -q
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prodtune import rag
from prodtune.config import load_config
from prodtune.notebook import read_records

from conftest import ROOT, run_notebook

pytestmark = pytest.mark.notebooks


def test_notebook_05_builds_and_retrieves_held_out_titles(prepared_dir: Path, tmp_path: Path) -> None:
    # A profile like cpu whose folders are all under tmp_path; stage 01's output is copied in.
    prof = tmp_path / "t.yaml"
    prof.write_text(f"inherit: cpu\npaths:\n  data_dir: {tmp_path}/data\n  models_dir: {tmp_path}/models\n"
                    f"  outputs_dir: {tmp_path}/outputs\n")
    shutil.copytree(prepared_dir, tmp_path / "data" / "prepared")
    n_docs = sum(pq.ParquetFile(prepared_dir / f"{s}.parquet").metadata.num_rows for s in ("train", "validation", "test"))
    held = sum(pq.ParquetFile(prepared_dir / f"{s}.parquet").metadata.num_rows for s in ("validation", "test"))

    run_notebook(ROOT / "notebooks" / "05_build_rag.ipynb", tmp_path / "05.ipynb", PROFILE=str(prof))

    rec = read_records(tmp_path / "outputs", "05")
    assert rec["n_docs"] == n_docs and rec["eval_products"] == held
    # The bar on the sample's held-out split.
    assert rec["exact_recall@1"] >= 0.95
    assert rec["typo_recall@1"] >= 0.8
    for v in rag.VARIANTS:
        assert 0 < rec[f"{v}_recall@1"] <= rec[f"{v}_recall@5"] <= 1
        assert rec[f"{v}_recall@1"] <= rec[f"{v}_mrr"] <= rec[f"{v}_recall@5"]
    assert (tmp_path / "models" / "chroma" / "chroma.sqlite3").is_file()

    # A rerun finds the work done: nothing embedded again, the same figures.
    again = rag.run(load_config(rag.Config, str(prof)))
    assert (again["added"], again["updated"], again["unchanged"]) == (0, 0, n_docs)
    assert again["exact_recall@1"] == rec["exact_recall@1"] and again["typo_mrr"] == rec["typo_mrr"]
