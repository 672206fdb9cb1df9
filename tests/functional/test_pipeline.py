"""The papermill runner: a stage runs, is skipped when up to date, reruns with --force, and a failure names the notebook."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prodtune.pipeline import run_pipeline

pytestmark = pytest.mark.notebooks


def _profile(tmp_path: Path, extra: str = "") -> Path:
    p = tmp_path / "t.yaml"
    p.write_text(
        "inherit: smoke\npaths:\n"
        f"  data_dir: {tmp_path}/data\n  models_dir: {tmp_path}/models\n  outputs_dir: {tmp_path}/outputs\n" + extra
    )
    return p


def test_notebook_01_runs_then_is_up_to_date(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prof = _profile(tmp_path)
    first = run_pipeline(str(prof), only=["01"])
    assert first["stages"]["01"]["status"] == "ran"
    assert "prodtune at" in capsys.readouterr().err  # the cells' text reaches the terminal as they run
    out = tmp_path / "outputs" / "01_prepare_data.ipynb"
    assert out.is_file()
    stats = json.loads((tmp_path / "data" / "prepared" / "stats.json").read_text())
    assert stats["kept"] == 160 and stats["splits"] == {"train": 128, "validation": 16, "test": 16}
    records = json.loads((tmp_path / "outputs" / "records" / "01.json").read_text())
    assert records["kept"] == 160 and records["input_lines"] == stats["input_lines"]
    again = run_pipeline(str(prof), only=["01"])
    assert again["stages"]["01"]["status"] == "up to date"
    forced = run_pipeline(str(prof), only=["01"], force=True)
    assert forced["stages"]["01"]["status"] == "ran"


def test_a_failing_notebook_is_named(tmp_path: Path) -> None:
    prof = _profile(tmp_path, f"data:\n  input: {tmp_path}/missing.json\n")
    with pytest.raises(SystemExit, match="FAILED at stage 01 \\(notebooks/01_prepare_data.ipynb\\)"):
        run_pipeline(str(prof), only=["01"])


def test_set_reaches_the_notebooks_and_the_fingerprint(tmp_path: Path) -> None:
    prof = _profile(tmp_path)
    first = run_pipeline(str(prof), only=["01"], overrides=["data.sample=40"])
    assert first["stages"]["01"]["status"] == "ran"
    assert json.loads((tmp_path / "data" / "prepared" / "stats.json").read_text())["kept"] == 40
    other = run_pipeline(str(prof), only=["01"], overrides=["data.sample=50"])  # another override: not up to date
    assert other["stages"]["01"]["status"] == "ran"
    assert json.loads((tmp_path / "data" / "prepared" / "stats.json").read_text())["kept"] == 50
