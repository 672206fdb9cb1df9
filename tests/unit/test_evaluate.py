"""Stage 06 plumbing: resumable generation cache, scoring, comparisons and the report files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from prodtune import evaluate as E


def test_cached_generate_resumes_without_regenerating(tmp_path: Path) -> None:
    calls: list[list[str]] = []

    def gen(prompts: list[str]) -> list[dict]:
        calls.append(list(prompts))
        return [{"text": p.upper(), "new_tokens": 1, "seconds": 0.1, "finished": True} for p in prompts]

    cache = tmp_path / "g.jsonl"
    uids, prompts = [f"u{i}" for i in range(5)], [f"p{i}" for i in range(5)]
    first = E.cached_generate(cache, uids[:3], prompts[:3], gen, "fp", chunk=2)
    with open(cache, "a") as fh:
        fh.write('{"key": "cut by a kil')  # a line cut by an interrupted run
    again = E.cached_generate(cache, uids, prompts, gen, "fp", chunk=2)
    assert [r["text"] for r in again] == ["P0", "P1", "P2", "P3", "P4"]
    assert calls == [["p0", "p1"], ["p2"], ["p3", "p4"]]  # only the two new prompts were generated again
    assert [r["text"] for r in first] == ["P0", "P1", "P2"]
    E.cached_generate(cache, uids, prompts, gen, "other-model", chunk=5)
    assert calls[-1] == prompts  # a new model fingerprint regenerates everything


def test_score_compare_and_report(tmp_path: Path) -> None:
    from prodtune.metrics import Embedder

    refs = [f"Insulated bottle number {i} keeps drinks cold for {i} hours." for i in range(12)]
    good = [{"text": r, "new_tokens": 10, "seconds": 0.5, "finished": True} for r in refs]
    bad = [{"text": "A book.", "new_tokens": 3, "seconds": 0.5, "finished": False} for _ in refs]
    emb = Embedder()
    per = {
        "llama-ft": E.score_rows(good, refs, refs, emb).assign(prompt=["### Input:\nBottle"] * 12, reference=refs),
        "base": E.score_rows(bad, refs, refs, emb).assign(prompt=["### Input:\nBottle"] * 12, reference=refs),
    }
    assert per["base"].endless.mean() == 1.0 and per["llama-ft"].rouge_l.mean() > 0.99
    summary = E.summarize(per, 500, 0)
    comps = E.compare(per, 500, 0)
    assert {c["metric"] for c in comps} == {"rouge_l", "chrf", "embed_cos"}
    assert all(c["a"] == "llama-ft" and c["excludes_zero"] and c["diff"] > 0 for c in comps)
    result = {**summary, "comparisons": comps, "meta": {"profile": "t", "base_model": "m", "n_test": 12, "prompt_version": "v",
              "study_temperatures": {"llama": 0.7, "deepseek": 0.2}, "rag_k": 3, "seconds": 1.0}}
    assert E.is_finite_metrics(result)
    run = tmp_path / "llama"
    run.mkdir()
    (run / "run_card.json").write_text(json.dumps({"train_loss": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
                                                    "eval_loss": [{"step": 2, "loss": 1.5}]}))
    E.write_report(result, per, tmp_path, {"llama": run})
    md = (tmp_path / "report.md").read_text()
    assert "llama-ft - base" in md and "| system" in md and "Insulated bottle number 0" in md
    html = (tmp_path / "report.html").read_text()
    assert "<table>" in html and "plotly" in html.lower()
    table = E.metrics_table(result)
    assert list(table.system) == ["llama-ft", "base"]
