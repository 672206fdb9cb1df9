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


@pytest.mark.parametrize("name, capability, gib, expected", [
    (None, None, None, "cpu"),                                    # no CUDA device
    ("Tesla T4", (7, 5), 14.7, "colab-t4"),                       # Colab's T4 (torch reports 14.7 GiB)
    ("NVIDIA GeForce RTX 4060 Laptop GPU", (8, 9), 7.6, "rtx4060-8gb"),
    ("NVIDIA GeForce RTX 3060", (8, 6), 11.7, "rtx4060-8gb"),     # under 14 GiB: the T4 profile would not fit
    ("NVIDIA L4", (8, 9), 22.0, "colab-t4"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), 39.4, "colab-t4"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), 79.2, "h100"),
    ("NVIDIA H100 80GB HBM3", (9, 0), 79.1, "h100"),
    ("Quadro RTX 8000", (7, 5), 47.5, "colab-t4"),                # large but no bf16: fp16 profile
])
def test_pick_profile_from_the_gpu(name, capability, gib, expected) -> None:
    from prodtune.config import known_profiles
    from prodtune.notebook import pick_profile

    profile, why = pick_profile(name, capability, gib)
    assert profile == expected and profile in known_profiles()
    assert why and (name is None or name in why)


def test_pick_profile_says_how_to_train_a_small_card_without_bf16() -> None:
    from prodtune.notebook import pick_profile

    profile, why = pick_profile("NVIDIA GeForce RTX 2070", (7, 5), 7.8)
    assert profile == "rtx4060-8gb" and "train.fp16=true" in why and "train.bf16=false" in why
    assert "fp16" not in pick_profile("NVIDIA GeForce RTX 4060", (8, 9), 7.6)[1]


def test_setup_without_a_profile_picks_one_and_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    from prodtune import notebook

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    stage = notebook.setup("01", None)
    assert stage.profile == "cpu"
    assert "PROFILE = None: using profile 'cpu' (no CUDA GPU is visible)" in capsys.readouterr().out

    class Props:  # what torch.cuda.get_device_properties(0) gives on Colab
        name, major, minor, total_memory = "Tesla T4", 7, 5, 15_828_320_256

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props)
    assert notebook.detect_profile()[0] == "colab-t4"
