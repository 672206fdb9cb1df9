"""Stage 06: prompts per track, generate-and-score on a tiny real model, before/after, the stage, the report files.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -x -q tests/unit/test_evaluate.py      # ~1 min on 2 CPU cores

The model is a tiny random Llama with SmolLM2's tokenizer; its LoRA adapters are random too (not zero), so the
fine-tuned systems answer differently from the base model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from prodtune import evaluate as E
from prodtune import models as MD
from prodtune.config import ConfigError
from prodtune.metrics import Embedder

TEST_ROWS = [{"uid": f"u{i}", "title": f"Nordvik Insulated Bottle {i} &amp; Lid",
              "content": f"Keeps drinks cold for {i} hours; 750 ml steel."} for i in range(5)]
COT_ROWS = [{"uid": f"c{i}", "title": f"Birchmont Mat {i} mm", "Question": f"Is the Birchmont Mat {i} mm good for yoga?",
             "Complex_CoT": "The shopper asks about yoga.", "Response": f"Yes: it is {i} mm thick and non-slip."}
            for i in range(3)]


def _run_dir(base: Path, out: Path, track: str, seed: int) -> Path:
    """A finished run folder as training leaves it: a (random, non-zero) LoRA adapter, tokenizer and run card."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(
        r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False))
    model.save_pretrained(out)
    MD.load_tokenizer(base).save_pretrained(out)
    (out / "run_card.json").write_text(json.dumps({
        "track": track, "base_model": str(base), "fingerprint": f"fp-{track}-{seed}", "utc": "2026-01-01", "steps": 2,
        "train_loss": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}], "eval_loss": [{"step": 2, "loss": 2.8}]}))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval")
    base = MD.make_tiny_llama(root / "base")
    dirs = {"base": base, **{name: _run_dir(base, root / "models" / name, track, seed)
                             for name, track, seed in (("llama", "llama", 1), ("deepseek", "deepseek", 2))}}
    for name, rows in (("prepared", TEST_ROWS), ("cot", COT_ROWS)):
        (root / "data" / name).mkdir(parents=True)
        pd.DataFrame(rows).to_parquet(root / "data" / name / "test.parquet")
    return {**dirs, "root": root, "data": root / "data" / "prepared", "cot": root / "data" / "cot"}


@pytest.fixture(scope="module")
def tiny(world):
    return MD.load_for_inference(str(world["base"]))


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


ROW = {"uid": "u1", "title": "Nordvik Bottle", "content": "Keeps drinks cold.", "Question": "Is it for hiking?",
       "Response": "Yes, it is light.", "source": "A light steel bottle."}


@pytest.mark.parametrize(
    "kw, prompt_has, reference, source",
    [
        ({"track": "llama"}, ["### Input:\nNordvik Bottle", "### Response:\n"], "Keeps drinks cold.", "Nordvik Bottle"),
        ({"track": "llama", "contexts": [["Other bottle, 500 ml."]]}, ["Other bottle, 500 ml."], "Keeps drinks cold.",
         "Nordvik Bottle"),  # the neighbour goes to `context`, not to the product's own text
        ({"track": "llama", "prompt_title": str.upper}, ["NORDVIK BOTTLE"], "Keeps drinks cold.", "Nordvik Bottle"),
        ({"track": "deepseek", "task": "description"}, ['describe the product "Nordvik Bottle"', "<think>\n"],
         "Keeps drinks cold.", "Nordvik Bottle"),
        ({"track": "deepseek"}, ["### Question:\nIs it for hiking?", "<think>\n"], "Yes, it is light.",
         "Nordvik Bottle\nA light steel bottle."),
    ],
)
def test_build_inputs_per_track_and_task(kw: dict, prompt_has: list[str], reference: str, source: str) -> None:
    got = E.build_inputs([ROW], **kw).iloc[0]
    assert all(p in got.prompt for p in prompt_has), got.prompt
    assert got.reference == reference and got.source == source and got.uid == "u1"
    assert got.context == ("Other bottle, 500 ml." if kw.get("contexts") else "")


@pytest.mark.parametrize(
    "kw, match",
    [({"track": "llama", "task": "cot"}, "task 'cot' on track 'llama'"), ({"track": "gpt"}, "track 'gpt'"),
     ({"track": "deepseek", "contexts": [["x"]]}, "contexts"), ({"track": "deepseek", "rows": [{"title": "t"}]}, "Question")],
)
def test_build_inputs_refuses_what_does_not_exist(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        E.build_inputs(kw.pop("rows", [ROW]), **kw)


@pytest.mark.parametrize(
    "track, text, answer",
    [
        ("llama", "A steel bottle.\n### Instruction:\nmore", "A steel bottle."),
        ("llama", "### Response:\nA mug.", "A mug."),
        ("deepseek", "The shopper hikes.\n</think>\nYes, it is light.", "Yes, it is light."),
        ("deepseek", "thinking that never ends", ""),  # no answer without closing the reasoning
    ],
)
def test_answer_of(track: str, text: str, answer: str) -> None:
    assert E.answer_of(track, text) == answer


def test_jobs_of_one_decoding_are_pooled_and_give_their_own_tokens(tiny, tmp_path: Path, monkeypatch) -> None:
    """Stage 06 pools the systems of one model: plain and RAG prompts and R1 questions with another token limit in
    the same batches; each row gets the tokens it gets alone, and a system that decodes otherwise is not pooled."""
    model, tok = tiny
    contexts = [["Keeps tea hot for 12 hours."]] * len(TEST_ROWS)

    def jobs(tag: str) -> list:
        kw = dict(tokenizer=tok, fingerprint="tiny")
        return [E.plan_job(pd.DataFrame(TEST_ROWS), name="plain", track="llama", max_new_tokens=6,
                           cache=tmp_path / tag / "plain.jsonl", **kw),
                E.plan_job(pd.DataFrame(TEST_ROWS), name="rag", track="llama", contexts=contexts, max_new_tokens=6,
                           cache=tmp_path / tag / "rag.jsonl", **kw),
                E.plan_job(COT_ROWS, name="cot", track="deepseek", max_new_tokens=9, cache=tmp_path / tag / "cot.jsonl",
                           **kw),
                E.plan_job(pd.DataFrame(TEST_ROWS), name="norepeat", track="llama", max_new_tokens=6,
                           decoding={"no_repeat_ngram_size": 2}, cache=tmp_path / tag / "nr.jsonl", **kw)]

    calls: list[int] = []
    real = MD.generate
    monkeypatch.setattr(MD, "generate", lambda *a, **kw: calls.append(len(a[2])) or real(*a, **kw))
    pooled = jobs("pooled")
    secs = E.run_jobs(model, tok, pooled, batch_size=32, progress=False)
    assert calls == [2 * len(TEST_ROWS) + len(COT_ROWS), len(TEST_ROWS)]  # one pooled call, the other decoding apart
    assert set(secs) == {"plain", "rag", "cot", "norepeat"} and all(v > 0 for v in secs.values())
    alone = jobs("alone")
    for j in alone:
        E.run_jobs(model, tok, [j], batch_size=32, progress=False)
    for p, a in zip(pooled, alone):
        assert [r["text"] for r in p.predictions()] == [r["text"] for r in a.predictions()]
        assert [r["new_tokens"] for r in p.predictions()] == [r["new_tokens"] for r in a.predictions()]
        assert max(r["new_tokens"] for r in p.predictions()) <= p.max_new_tokens
    assert len((tmp_path / "pooled" / "cot.jsonl").read_text().splitlines()) == len(COT_ROWS)
    again = jobs("pooled")  # all cached: nothing generated, no model needed
    calls.clear()
    E.run_jobs(None, None, again, progress=False)
    assert calls == [] and [r["text"] for r in again[1].predictions()] == [r["text"] for r in pooled[1].predictions()]


def test_a_stopped_run_keeps_the_rows_that_ended(tiny, tmp_path: Path, monkeypatch) -> None:
    """Rows are written to the cache as each ends, not at the end of a batch: a run stopped after 3 rows keeps them,
    and the next run generates only the others, with the tokens of an uninterrupted run."""
    model, tok = tiny
    job = lambda tag: E.plan_job(pd.DataFrame(TEST_ROWS), name="plain", track="llama", max_new_tokens=8,  # noqa: E731
                                 tokenizer=tok, fingerprint="tiny", cache=tmp_path / tag / "plain.jsonl")
    whole = job("whole")
    E.run_jobs(model, tok, [whole], batch_size=32, progress=False)
    real, kept = E.Job.record, []

    def stop_after_3(self, rows):
        if len(kept) == 3:
            raise KeyboardInterrupt
        kept.extend(rows)
        real(self, rows)

    monkeypatch.setattr(E.Job, "record", stop_after_3)
    with pytest.raises(KeyboardInterrupt):
        E.run_jobs(model, tok, [job("stopped")], batch_size=32, progress=False)
    monkeypatch.setattr(E.Job, "record", real)
    assert len((tmp_path / "stopped" / "plain.jsonl").read_text().splitlines()) == 3
    resumed = job("stopped")
    assert len(resumed.pending()) == len(TEST_ROWS) - 3
    calls: list[int] = []
    gen = MD.generate
    monkeypatch.setattr(MD, "generate", lambda *a, **kw: calls.append(len(a[2])) or gen(*a, **kw))
    E.run_jobs(model, tok, [resumed], batch_size=32, progress=False)
    assert calls == [len(TEST_ROWS) - 3]
    assert [r["text"] for r in resumed.predictions()] == [r["text"] for r in whole.predictions()]


def test_generate_and_score_scores_every_row_and_resumes_from_its_cache(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    cache = tmp_path / "gen.jsonl"
    kw = dict(track="llama", max_new_tokens=8, batch_size=2, cache=cache, fingerprint="tiny", n_boot=200, progress=False)
    df, summary = E.generate_and_score(model, tok, pd.DataFrame(TEST_ROWS), **kw)
    assert len(df) == len(TEST_ROWS) and list(df.uid) == [r["uid"] for r in TEST_ROWS]
    assert {"rouge_l", "chrf", "unsupported_rate", "repetition", "endless", "answer", "text", "prompt"} <= set(df.columns)
    assert "embed_cos" not in df and "think_ok" not in df  # no embedder given; not an R1 prompt
    assert (df.new_tokens <= 8).all() and df.text.str.len().gt(0).all()
    assert set(summary) == {"rouge_l", "chrf", "unsupported_rate", "copied_rate", "repetition", "empty", "endless",
                            "tokens_per_s"}
    assert summary["rouge_l"]["lo"] <= summary["rouge_l"]["mean"] <= summary["rouge_l"]["hi"]
    assert len(cache.read_text().splitlines()) == len(TEST_ROWS)
    again, _ = E.generate_and_score(None, None, pd.DataFrame(TEST_ROWS), **kw)  # every row cached: no model needed
    pd.testing.assert_frame_equal(again, df)
    with pytest.raises(ValueError, match="not in the cache"):  # a new setting is generated again: it needs the model
        E.generate_and_score(None, None, pd.DataFrame(TEST_ROWS), **{**kw, "max_new_tokens": 9})


def test_generate_and_score_on_r1_prompts_checks_think_adherence(tiny) -> None:
    model, tok = tiny
    df, summary = E.generate_and_score(model, tok, COT_ROWS, track="deepseek", max_new_tokens=6, n_boot=200,
                                       progress=False, embedder=Embedder())
    assert "think_ok" in summary and "embed_cos" in summary
    assert (df.think_ok == 0).all() and (df.answer == "").all()  # 6 random tokens never close </think>
    assert df.rouge_l.eq(0).all() and df.embed_cos.eq(0).all()  # an empty answer scores 0


def test_before_after_switches_the_adapter_and_caches_its_result(world) -> None:
    run = world["llama"]
    rows = pd.DataFrame(TEST_ROWS)
    res = E.before_after(str(world["base"]), run, rows, max_new_tokens=8, n_boot=200, progress=False)
    assert res["track"] == "llama" and res["n"] == len(TEST_ROWS) and len(res["rows"]) == len(TEST_ROWS)
    assert [r["before"] for r in res["rows"]] != [r["after"] for r in res["rows"]]  # the adapter changes the answers
    assert res["rouge_l_before"] == pytest.approx(sum(r["rouge_l_before"] for r in res["rows"]) / len(TEST_ROWS))
    assert 0 <= res["stopped_at_eos_after"] <= 1 and res["metrics_after"]["rouge_l"]["n"] == len(TEST_ROWS)
    cache = run / "before_after_validation.json"
    stamp = cache.stat().st_mtime_ns
    assert E.before_after(str(world["base"]), run, rows, max_new_tokens=8, n_boot=200, progress=False) == res
    assert cache.stat().st_mtime_ns == stamp  # read back, not generated again
    table = E.before_after_table(res, n=2, width=10)
    assert list(table.columns) == ["input", "reference", "before", "after", "rouge_l_before", "rouge_l_after"]
    assert len(table) == 2 and table.input.str.len().max() <= 10


def _cfg(world, out: Path, systems: list[str], **kw) -> E.EvalConfig:
    return E.EvalConfig(out_dir=str(out), data_dir=str(world["data"]), cot_dir=str(world["cot"]),
                        llama_dir=str(world["llama"]), deepseek_dir=str(world["deepseek"]),
                        study_dir=str(world["root"] / "models" / "study"), chroma_dir=str(world["root"] / "chroma"),
                        profile_name="t", max_new_tokens=8, max_new_tokens_cot=8, batch_size=4, n_boot=200,
                        systems=systems, progress=False, **kw)


def test_stage_runs_scores_compares_and_writes_the_report(world) -> None:
    out = world["root"] / "outputs" / "t"
    result = E.run(_cfg(world, out, ["llama-ft", "base", "deepseek-ft-cot", "base-r1"]))
    assert [k for k in result if k not in ("comparisons", "meta")] == ["base", "llama-ft", "base-r1", "deepseek-ft-cot"]
    assert result["base"]["rouge_l"]["n"] == len(TEST_ROWS) and result["base-r1"]["think_ok"]["n"] == len(COT_ROWS)
    assert {(c["a"], c["b"]) for c in result["comparisons"]} == {("llama-ft", "base"), ("deepseek-ft-cot", "base-r1")}
    assert result["meta"]["study_temperatures"] == {"llama": 0.2, "deepseek": 0.7} and result["meta"]["profile"] == "t"
    assert E.is_finite_metrics(result)
    assert json.loads((out / "metrics.json").read_text())["base"] == result["base"]
    scores = pd.read_csv(out / "generations" / "llama-ft.scores.csv")
    assert len(scores) == len(TEST_ROWS) and {"uid", "prompt", "reference", "answer", "embed_cos"} <= set(scores.columns)
    md = (out / "report.md").read_text()
    assert md.startswith("# prodtune report · profile `t`")
    assert "temperature 0.2 for the Llama track and 0.7 for the DeepSeek track" in md
    assert "| llama-ft - base" in md and "### Nordvik Insulated Bottle 0 &amp; Lid" in md  # markdown is not escaped
    html = (out / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "<table>" in html and "plotly" in html.lower()
    assert "<h3>Nordvik Insulated Bottle 0 &amp; Lid</h3>" in html  # the rendered markdown is not escaped twice
    assert (out / "loss_curves.html").is_file()
    assert json.loads((out.parent / "metrics.json").read_text())["meta"]["profile"] == "t"  # the latest-run copy


def test_stage_needs_the_study_run_and_says_what_to_run(world, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"models/study/run_card.json: missing.*--recipe study"):
        E.run(_cfg(world, tmp_path / "out", ["llama-ft", "study-recipe"]))
    assert not (tmp_path / "out" / "generations").exists()  # failed before generating anything


def test_stage_rates_the_study_run_with_regex_cleaned_titles(world, tmp_path: Path) -> None:
    study = _run_dir(world["base"], tmp_path / "study", "llama", 3)
    cfg = _cfg(world, tmp_path / "out", ["study-recipe"], write_latest=False)
    cfg.study_dir = str(study)
    result = E.run(cfg)
    scores = pd.read_csv(tmp_path / "out" / "generations" / "study-recipe.scores.csv")
    assert result["study-recipe"]["rouge_l"]["n"] == len(TEST_ROWS)
    assert "&amp;" not in scores.prompt[0] and "Nordvik Insulated Bottle 0" in scores.prompt[0]  # the study's cleaner
    assert not (tmp_path / "metrics.json").exists()  # write_latest off


@pytest.mark.parametrize(
    "kw, field",
    [({"systems": ["base", "gpt-5"]}, "evaluate.systems"), ({"systems": []}, "evaluate.systems"),
     ({"n_boot": 10}, "evaluate.n_boot"), ({"batch_size": 0}, "evaluate.batch_size"), ({"n_test": 0}, "evaluate.n_test"),
     ({"max_batch_tokens": 0}, "evaluate.max_batch_tokens"), ({"rag_k": 0}, "evaluate.rag_k")],
)
def test_config_errors_name_the_field(kw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        E.EvalConfig(**kw)


def test_config_makes_a_command_line() -> None:
    import dataclasses

    from transformers import HfArgumentParser

    assert E.Config is E.EvalConfig and E.EvalConfig.SECTION == "evaluate"
    fields = dataclasses.fields(E.EvalConfig)
    assert all(f.metadata.get("help") for f in fields)
    assert not {f.name for f in fields} & {"profile", "set", "recipe", "debug", "track"}  # the CLI's own flags
    (cfg,) = HfArgumentParser(E.EvalConfig).parse_args_into_dataclasses(["--systems", "base", "llama-ft", "--n_test", "3"])
    assert cfg.systems == ["base", "llama-ft"] and cfg.n_test == 3


def test_report_from_scored_rows(tmp_path: Path) -> None:
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
              "study_temperatures": {"llama": 0.2, "deepseek": 0.7}, "rag_k": 3, "seconds": 1.0}}
    run = tmp_path / "llama"
    run.mkdir()
    (run / "run_card.json").write_text(json.dumps({"train_loss": [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}],
                                                    "eval_loss": [{"step": 2, "loss": 1.5}]}))
    E.write_report(result, per, tmp_path, {"llama": run, "absent": tmp_path / "none"})
    md = (tmp_path / "report.md").read_text()
    assert "llama-ft - base" in md and "| system" in md and "### Bottle" in md and "Insulated bottle number 0" in md
    assert md.count("**llama-ft:**") == 4  # n_examples products, each with every system's answer
    assert list(E.metrics_table(result).system) == ["llama-ft", "base"]
    assert E.loss_histories({"llama": run}).shape == (3, 4)
    no_runs, _ = E.render_report({**result, "comparisons": []}, {}, figure_html=None)
    assert "_no pair of systems ran on the same rows_" in no_runs and no_runs.endswith("## Example answers\n\n")
    assert "The DeepSeek run decodes" not in no_runs  # plain greedy: nothing to say
    ds = {"repetition_penalty": 1.1, "no_repeat_ngram_size": 0, "think_before_eos": True}
    with_ds, _ = E.render_report({**result, "comparisons": [], "meta": {**result["meta"], "decoding_deepseek": ds}}, {})
    assert "(repetition penalty 1.1, no EOS before `</think>` and an answer): a reply" in with_ds and "0-gram" not in with_ds


def test_stage_rag_systems_put_other_products_into_the_prompt(world, tmp_path: Path) -> None:
    from prodtune import rag

    rag.run(rag.Config(data_dir=str(world["data"]), persist_dir=str(tmp_path / "chroma"), out_dir=str(tmp_path / "rag"),
                       splits=["test"], eval_splits=["test"], progress=False))  # a real Chroma store of the 5 test products
    cfg = _cfg(world, tmp_path / "out", ["base", "base+rag"], write_latest=False, rag_k=2)
    cfg.chroma_dir = str(tmp_path / "chroma")
    result = E.run(cfg)
    scores = pd.read_csv(tmp_path / "out" / "generations" / "base+rag.scores.csv")
    for row, prompt in zip(TEST_ROWS, scores.prompt):
        others = [r["content"] for r in TEST_ROWS if r["uid"] != row["uid"] and r["content"] in prompt]
        assert row["content"] not in prompt and len(others) == 2  # k other products, never the one described
    assert {(c["a"], c["b"]) for c in result["comparisons"]} == {("base+rag", "base")}


def test_before_after_of_no_rows_loads_no_model(world, tmp_path: Path) -> None:
    run = _run_dir(world["base"], tmp_path / "run", "llama", 4)
    res = E.before_after("no/such/model", run, pd.DataFrame(TEST_ROWS).head(0), split="none", progress=False)
    assert res["n"] == 0 and res["rows"] == [] and res["rouge_l_after"] == 0.0 and (run / "before_after_none.json").is_file()


def test_stage_prompts_and_decodes_as_the_llama_run_card_says(world, tmp_path: Path) -> None:
    """A run trained with retrieved context (card `rag`) is tested with the same k, threshold and length cap, and every
    Llama-track system decodes with the card's anti-loop settings (`generation`); both are in the report's meta."""
    from prodtune import rag

    rag.run(rag.Config(data_dir=str(world["data"]), persist_dir=str(tmp_path / "chroma"), out_dir=str(tmp_path / "rag"),
                       splits=["test"], eval_splits=["test"], progress=False))
    run = _run_dir(world["base"], tmp_path / "llama", "llama", 1)
    card = json.loads((run / "run_card.json").read_text())
    card.update(rag={"k": 1, "min_score": 0.5, "max_chars": 30}, generation={"repetition_penalty": 1.0, "no_repeat_ngram_size": 2})
    (run / "run_card.json").write_text(json.dumps(card))

    def stage(out: str) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
        cfg = _cfg(world, tmp_path / out, ["base", "base+rag"], write_latest=False, rag_k=3)
        cfg.chroma_dir, cfg.llama_dir = str(tmp_path / "chroma"), str(run)
        res = E.run(cfg)
        read = lambda s: pd.read_csv(tmp_path / out / "generations" / f"{s}.scores.csv")  # noqa: E731
        return res, read("base"), read("base+rag")

    res, base, ragged = stage("near")
    assert res["meta"]["rag"] == {"k": 1, "min_score": 0.5, "max_chars": 30} and res["meta"]["rag_shown"] == len(TEST_ROWS)
    assert res["meta"]["decoding_llama"] == {"repetition_penalty": 1.0, "no_repeat_ngram_size": 2}
    for row, prompt in zip(TEST_ROWS, ragged.prompt):
        shown = [r["content"][:30] for r in TEST_ROWS if r["uid"] != row["uid"] and r["content"][:30] in prompt]
        assert len(shown) == 1 and row["content"][:30] not in prompt and row["content"][:31] not in prompt
    card["rag"]["min_score"] = 0.99999  # no neighbour is that close: every prompt stays plain
    (run / "run_card.json").write_text(json.dumps(card))
    res, base, ragged = stage("far")
    assert res["meta"]["rag_shown"] == 0 and ragged.prompt.tolist() == base.prompt.tolist()
    assert ragged.answer.fillna("").tolist() == base.answer.fillna("").tolist()


def test_decoding_and_retrieval_settings_of_a_run_card() -> None:
    assert E.decoding_of({}) == {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}  # older runs: plain greedy
    assert E.decoding_of({"generation": {"repetition_penalty": 1.2, "temperature": 0.2}})["repetition_penalty"] == 1.2
    assert E.rag_settings({}, 3) == {"k": 3, "min_score": 0.0, "max_chars": 600}  # the study's RAG: k, all shown
    assert E.rag_settings({"rag": {"k": 0, "min_score": 0.9}}, 2)["k"] == 2  # trained without context
    assert E.rag_settings({"rag": {"k": 2, "min_score": 0.6, "max_chars": 350}}) == {"k": 2, "min_score": 0.6, "max_chars": 350}


@pytest.mark.parametrize("src,invented", [("/x/prodtune/data/sample/trn_sample.jsonl", True),
                                          ("/work/shared/data/amazontitles_sample.jsonl", False),
                                          ("/content/drive/MyDrive/prodtune/data/raw/trn.json.gz", False)])
def test_report_says_which_data_it_ran_on(tmp_path: Path, src: str, invented: bool) -> None:
    from prodtune.evaluate.stage import data_provenance

    (tmp_path / "stats.json").write_text(json.dumps({"input": src}))
    assert data_provenance(tmp_path) == {"input": src, "invented": invented, "real": not invented}
    assert data_provenance(tmp_path / "none") == {"input": "", "invented": False, "real": False}
