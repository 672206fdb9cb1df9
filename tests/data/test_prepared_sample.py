"""Data checks on stage 01's output for the committed sample: schema, no empty text, no leaks between splits."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def test_schema_and_no_empty_text(prepared_dir: Path) -> None:
    for split in ("train", "validation", "test"):
        df = pd.read_parquet(prepared_dir / f"{split}.parquet")
        assert list(df.columns) == ["uid", "title", "content"]
        assert len(df) > 0
        assert (df.title.str.strip().str.len() > 0).all()
        assert (df.content.str.len() >= 100).all()
        assert not df.content.str.contains("&#|&amp;|<br|<p>", regex=True).any()


def test_no_product_in_two_splits(prepared_dir: Path) -> None:
    seen: dict[str, str] = {}
    for split in ("train", "validation", "test"):
        for uid in pd.read_parquet(prepared_dir / f"{split}.parquet").uid:
            assert uid not in seen, f"{uid} in {seen[uid]} and {split}"
            seen[uid] = split


def test_sample_has_every_kind_of_bad_line(prepared_dir: Path) -> None:
    stats = json.loads((prepared_dir / "stats.json").read_text())
    reasons = set(stats["rejected_by_reason"])
    assert {"bad_json", "bad_utf8", "not_an_object", "blank_line"} <= reasons
    assert any(r.startswith("missing_field:") for r in reasons) and any(r.startswith("bad_type:") for r in reasons)
    assert all(stats["filtered"][k] > 0 for k in ("empty_title", "empty_content", "short_content", "duplicate_uid", "duplicate_title_content"))
