"""The whole pipeline (notebooks 01..06) on the smoke profile: every stage runs and the report's metrics are finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from prodtune.pipeline import run_pipeline

pytestmark = [pytest.mark.notebooks, pytest.mark.slow]


def test_smoke_pipeline_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    prof = tmp_path / "smoke-ci.yaml"
    prof.write_text(
        "inherit: smoke\npaths:\n"
        f"  data_dir: {tmp_path}/data\n  models_dir: {tmp_path}/models\n  outputs_dir: {tmp_path}/outputs\n"
        "evaluate:\n  write_latest: false\n"
    )
    summary = run_pipeline(str(prof))
    assert [k for k, s in summary["stages"].items() if s["status"] == "ran"] == ["01", "01s", "02", "03", "03s", "04", "05", "06"]
    err = capsys.readouterr().err
    assert "'loss':" in err  # training steps and losses reach the terminal as text (not notebook widgets)
    assert "evaluate: base done" in err
    out = tmp_path / "outputs"
    metrics = json.loads((out / "metrics.json").read_text())
    systems = [k for k in metrics if k not in ("comparisons", "meta")]
    assert {"base", "llama-ft", "llama-ft+rag", "base+rag", "deepseek-ft", "study-recipe"} <= set(systems)
    for system in systems:
        for name, v in metrics[system].items():
            assert math.isfinite(v["mean"]) and v["lo"] - 1e-9 <= v["mean"] <= v["hi"] + 1e-9, (system, name, v)
    assert metrics["comparisons"] and all(math.isfinite(c["diff"]) for c in metrics["comparisons"])
    assert metrics["meta"]["rag_excludes_own_product"] is True
    assert (out / "report.md").read_text().startswith("# prodtune report")
    assert "plotly" in (out / "report.html").read_text().lower()
    again = run_pipeline(str(prof))  # rerun: everything up to date, nothing recomputed
    assert all(s["status"] == "up to date" for s in again["stages"].values())
