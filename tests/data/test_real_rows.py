"""Stage 01 on real AmazonTitles rows (../shared/data, never committed; skipped where absent): most real copies have
`uid: null`, which prepare must say plainly, and `--uid-from-text` must keep them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "amazontitles_sample.jsonl"
pytestmark = pytest.mark.skipif(not REAL.is_file(), reason=f"{REAL} absent (real rows exist on our machines and in CI)")


def _prepare(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prodtune", "prepare", "--input", str(REAL), "--out_dir",
                           str(tmp_path / "out"), *flags], capture_output=True, text=True, timeout=300, cwd=tmp_path)


def test_null_uids_are_named_with_the_flag_that_fixes_them(tmp_path: Path) -> None:
    res = _prepare(tmp_path)
    assert "uid_from_text" in res.stderr, res.stderr[-2000:]
    hint = [line for line in res.stderr.splitlines() if "uid_from_text" in line]
    assert len(hint) == 1, hint


def test_uid_from_text_keeps_the_real_rows(tmp_path: Path) -> None:
    res = _prepare(tmp_path, "--uid-from-text", "true")
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    lines = sum(1 for _ in REAL.open("rb"))
    assert stats["input_lines"] == lines and stats["rejected"] == 0
    assert stats["kept"] >= 0.6 * lines and sum(stats["splits"].values()) == stats["kept"]
    assert stats["kept"] + sum(stats["filtered"].values()) == lines


def test_the_real_profile_reads_the_real_rows_in_place_and_the_report_says_so(tmp_path: Path) -> None:
    """`--profile real` needs no flag: its input is these rows (relative to the project, never copied) with uids from
    the text, and stage 06's data line calls them real (the committed sample is called invented)."""
    res = subprocess.run([sys.executable, "-m", "prodtune", "prepare", "--profile", "real", "--out_dir",
                          str(tmp_path / "out"), "--no_progress"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert Path(stats["input"]).resolve() == REAL.resolve() and stats["rejected"] == 0
    assert stats["splits"]["test"] >= 50 and stats["config"]["uid_from_text"] is True
    from prodtune.evaluate.stage import data_provenance

    assert data_provenance(tmp_path / "out")["real"] is True
    assert not list((Path(__file__).resolve().parents[2] / "data").rglob("amazontitles_sample*"))  # nothing copied in
