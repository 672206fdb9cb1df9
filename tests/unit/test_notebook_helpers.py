"""Notebook helpers: records go to one place per stage; every interactive figure gets a static PNG beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_records_of_a_stage_and_of_its_recipe_run_go_to_one_place(tmp_path: Path) -> None:
    from prodtune import notebook

    prof = tmp_path / "p.yaml"
    prof.write_text(f"inherit: cpu\npaths:\n  outputs_dir: {tmp_path}/out\n")
    notebook.setup("01", str(prof))
    notebook.record("kept", 5)
    notebook.setup("01", str(prof), "study")
    notebook.record("kept", 7)
    assert notebook.read_records(tmp_path / "out", "01") == {"kept": 5}
    assert json.loads((tmp_path / "out" / "records" / "01s.json").read_text()) == {"kept": 7}
    with pytest.raises(ValueError, match="not finite"):
        notebook.record("loss", float("nan"))


def test_static_png_draws_the_figure() -> None:
    import io

    import pandas as pd
    import plotly.express as px
    from PIL import Image

    from prodtune.notebook import static_png

    df = pd.DataFrame({"variant": ["exact", "typo"] * 2, "metric": ["r1", "r1", "r5", "r5"], "value": [0.5, 0.7, 0.9, 1.0]})
    png = static_png(px.bar(df, x="variant", y="value", color="metric", barmode="group", title="retrieval"))
    img = Image.open(io.BytesIO(png)).convert("RGB")
    assert img.size == (800, 450)
    colours = {c for _, c in img.getcolors(maxcolors=1 << 16)}
    assert len(colours) > 20  # bars, axes and text were drawn, not a blank canvas
    empty = Image.open(io.BytesIO(static_png(px.bar(df.iloc[:0], x="variant", y="value")))).convert("RGB")
    assert len({c for _, c in empty.getcolors(maxcolors=1 << 16)}) < len(colours)
