"""benchmarks/tune_decoding.py's choice of a decoding setting on validation."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _tune():
    spec = importlib.util.spec_from_file_location("tune_decoding", ROOT / "benchmarks" / "tune_decoding.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(ngram: int, rouge: float, rep: float, unsupported: float) -> dict:
    return {"no_repeat_ngram_size": ngram, "min_new_tokens": 64, "ground_claims": True, "rouge_l": rouge,
            "repetition": rep, "unsupported_rate": unsupported, "endless": 0.05, "copied_rate": 0.0}


def test_choose_leaves_out_settings_that_loop_more_than_the_base() -> None:
    t = _tune()
    # validation, 68 products: no-repeat 3 repeats one 3-gram more than the base (0.01 point), no-repeat 4 a point more
    rows = [_row(3, 0.143, 0.0095, 0.087), _row(4, 0.144, 0.0521, 0.074)]
    base = {t.decoding_key(_row(3, 0, 0, 0)): 0.0094, t.decoding_key(_row(4, 0, 0, 0)): 0.0409}
    assert t.choose(rows, 0.005, base_repetition=base)["no_repeat_ngram_size"] == 3
    # strictly (no tolerance) both loop more, and the fallback takes every setting: the fewer claims of no-repeat 4
    assert t.choose(rows, 0.005, base_repetition=base, rep_tol=0.0)["no_repeat_ngram_size"] == 4
    assert t.choose(rows, 0.005)["no_repeat_ngram_size"] == 4  # without --base: ties broken by unsupported claims
