"""Stage 06: compare base, fine-tuned, RAG and reasoning models on the held-out test split, with CIs.

    prodtune evaluate --profile cpu          # reads models/cpu/{llama,deepseek,chroma}, writes outputs/cpu/

Systems (each generated greedily on the same test products, generations cached and resumable):

| system | model | prompt | task |
| --- | --- | --- | --- |
| base | base model | Alpaca(title) | description |
| base+rag | base model | Alpaca(title + retrieved descriptions) | description |
| llama-ft | Llama-track adapter | Alpaca(title) | description |
| llama-ft+rag | Llama-track adapter | Alpaca(title + retrieved descriptions) | description |
| study-recipe | adapter trained as the study did (regex-stripped text, loss on the whole text), same budget | Alpaca(title) | description |
| deepseek-ft | DeepSeek-track adapter | R1(question asking for the description) | description |
| base-r1 / deepseek-ft-cot | base / DeepSeek-track adapter | R1(CoT test question) | sales answer |

Metrics per row: ROUGE-L, chrF, MiniLM cosine to the reference, a hallucination proxy (numbers and brand-like
words absent from title + context), repetition, empty and endless answers, `<think>` adherence (R1 prompts),
latency and tokens/s. Paired bootstrap 95% CIs for the differences that answer the study's questions.
Retrieval for RAG never returns the product being described (its uid is excluded), so RAG cannot copy the answer.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from prodtune import metrics as M
from prodtune import models as MD
from prodtune import prompts as P
from prodtune.io import log, read_json, write_json, write_text

DESCRIPTION_METRICS = ("rouge_l", "chrf", "embed_cos", "unsupported_rate", "repetition", "empty", "endless", "tokens_per_s")
HEADLINE = ("rouge_l", "chrf", "embed_cos")
DEEPSEEK_DESCRIBE_QUESTION = 'Can you describe the product "{title}" for me?'


@dataclass
class EvalConfig:
    """Settings of stage 06. Greedy decoding for every metric (the study sampled at 0.7 / 0.2)."""

    out_dir: str = field(default="{outputs_dir}", metadata={"help": "report, metrics and generations"})
    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "stage 01 output"})
    cot_dir: str = field(default="{data_dir}/cot", metadata={"help": "stage 02 output"})
    llama_dir: str = field(default="{models_dir}/llama", metadata={"help": "stage 03 run folder"})
    deepseek_dir: str = field(default="{models_dir}/deepseek", metadata={"help": "stage 04 run folder"})
    study_dir: str = field(default="{models_dir}/study_recipe", metadata={"help": "where the study's recipe is trained"})
    chroma_dir: str = field(default="{models_dir}/chroma", metadata={"help": "stage 05 store"})
    n_test: int | None = field(default=None, metadata={"help": "evaluate on the first N test products (None: all)"})
    max_new_tokens: int = field(default=160, metadata={"help": "longest description generated"})
    max_new_tokens_cot: int = field(default=256, metadata={"help": "longest R1 completion (thinking + answer)"})
    batch_size: int = field(default=48, metadata={"help": "prompts per generate call and per cache flush (CPU decoding is "
                                                           "memory-bound: 32 rows cost about what 8 do per step)"})
    max_batch_tokens: int | None = field(default=MD.DEFAULT_MAX_BATCH_TOKENS, metadata={
        "help": "cap rows x (prompt + new tokens) per generate call: long RAG prompts go fewer at a time"})
    rag_k: int = field(default=3, metadata={"help": "retrieved descriptions put into the RAG prompt"})
    embedder: str = field(default="embedded:all-minilm-l6-v2", metadata={"help": "sentence-transformers model for cosine"})
    n_boot: int = field(default=2000, metadata={"help": "bootstrap resamples"})
    seed: int = field(default=3407, metadata={"help": "bootstrap and sampling seed"})
    study_recipe: bool = field(default=True, metadata={"help": "train and compare the study's recipe"})
    systems: list[str] = field(
        default_factory=lambda: ["base", "base+rag", "llama-ft", "llama-ft+rag", "study-recipe", "deepseek-ft", "base-r1", "deepseek-ft-cot"],
        metadata={"help": "systems to evaluate"},
    )
    n_examples: int = field(default=4, metadata={"help": "example answers shown side by side"})
    write_latest: bool = field(default=True, metadata={"help": "also copy report/metrics to outputs/ (latest run)"})

    def __post_init__(self) -> None:
        known = {"base", "base+rag", "llama-ft", "llama-ft+rag", "study-recipe", "deepseek-ft", "base-r1", "deepseek-ft-cot"}
        bad = set(self.systems) - known
        if bad:
            raise ValueError(f"unknown systems {sorted(bad)}; known: {sorted(known)}")
        if self.max_new_tokens < 1 or self.batch_size < 1 or self.n_boot < 100:
            raise ValueError("max_new_tokens and batch_size must be >= 1 and n_boot >= 100")


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


def score_rows(preds: list[dict], refs: list[str], sources: list[str], embedder: M.Embedder, r1: bool = False) -> pd.DataFrame:
    """Per-row metrics of generations against references; `sources` is what the model was shown (title + context)."""
    answers = [_answer(p["text"], r1) for p in preds]
    rows = []
    cos = embedder.cosine(answers, refs)
    for p, a, ref, src, c in zip(preds, answers, refs, sources, cos):
        uns = M.unsupported(a, src)
        rows.append({
            "rouge_l": M.rouge_l(a, ref),
            "chrf": M.chrf(a, ref),
            "embed_cos": float(c),
            "unsupported_rate": uns["rate"],
            "unsupported": ", ".join(uns["numbers"] + uns["names"])[:200],
            "repetition": M.repetition_rate(a),
            "empty": float(not a.strip()),
            "endless": float(not p.get("finished", True)),
            "new_tokens": p["new_tokens"],
            "seconds": p["seconds"],
            "tokens_per_s": p["new_tokens"] / p["seconds"] if p["seconds"] > 0 else float("nan"),
            **({"think_ok": float(M.think_adherence(p["text"]))} if r1 else {}),
            "answer": a,
        })
    return pd.DataFrame(rows)


def _answer(text: str, r1: bool) -> str:
    """The answer part of a completion: after `</think>` for R1 prompts (empty if it never closes)."""
    if not r1:
        return P.parse_alpaca_response(text)
    return text.split("</think>", 1)[1].strip() if "</think>" in text else ""


def summarize(per_system: dict[str, pd.DataFrame], n_boot: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """system -> metric -> {mean, lo, hi, n} (bootstrap 95% CI of the mean over rows)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, df in per_system.items():
        cols = [c for c in (*DESCRIPTION_METRICS, "think_ok") if c in df]
        out[name] = {c: M.bootstrap_mean_ci(df[c].replace([np.inf, -np.inf], np.nan).dropna(), n_boot, seed) for c in cols}
    return out


COMPARISONS = (
    ("llama-ft", "base", "does fine-tuning help?"),
    ("llama-ft+rag", "llama-ft", "does RAG help the fine-tuned model?"),
    ("base+rag", "base", "does RAG help the base model?"),
    ("llama-ft", "study-recipe", "what are our cleaning and masking worth (same budget)?"),
    ("deepseek-ft", "llama-ft", "reasoning track vs description track on descriptions"),
    ("deepseek-ft-cot", "base-r1", "does the DeepSeek track help on its own CoT questions?"),
)


def compare(per_system: dict[str, pd.DataFrame], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Paired bootstrap differences (a - b) on the headline metrics for each comparison whose systems ran."""
    out = []
    for a, b, question in COMPARISONS:
        if a in per_system and b in per_system and len(per_system[a]) == len(per_system[b]):
            for m in HEADLINE:
                d = M.paired_bootstrap_diff(per_system[a][m], per_system[b][m], n_boot, seed)
                out.append({"a": a, "b": b, "question": question, "metric": m, **d})
    return out


# ----------------------------------------------------------------------------------------------
# Generation with a resumable cache
# ----------------------------------------------------------------------------------------------


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_generate(
    cache: Path, uids: list[str], prompts: list[str], gen: Callable[[list[str]], list[dict]], fingerprint: str, chunk: int = 16
) -> list[dict]:
    """Generate for prompts not in `cache` (JSONL keyed by uid + prompt + model fingerprint), appending as it goes.

    A killed run resumes where it stopped; a changed model, prompt or setting regenerates only what changed.
    """
    done: dict[str, dict] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: generated again
            done[row["key"]] = row
    keys = [_key(u, p, fingerprint) for u, p in zip(uids, prompts)]
    todo = [i for i, k in enumerate(keys) if k not in done]
    cache.parent.mkdir(parents=True, exist_ok=True)
    with open(cache, "a", encoding="utf-8") as fh:
        for s in range(0, len(todo), chunk):
            idx = todo[s : s + chunk]
            for i, r in zip(idx, gen([prompts[i] for i in idx])):
                row = {"key": keys[i], "uid": uids[i], **r}
                done[keys[i]] = row
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            fh.flush()
    return [done[k] for k in keys]


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def _run_card(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run_card.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run the training notebook (03/04) for this profile first")
    return read_json(path)


def train_study_recipe(profile: str, cfg: EvalConfig, overrides: list[str] | None = None) -> Path:
    """Train the study's recipe with the Llama track's budget: data cleaned by the study's regex, loss on all tokens.

    Stage 01 is rerun with `cleaner="study"` (same seed, so the same products fall in the same splits), then
    `prodtune.train` trains on it with `loss_on="all"` and every other setting of the Llama track.
    """
    from prodtune import data as D
    from prodtune import train as T
    from prodtune.config import stage_config

    dcfg = stage_config(D.DataConfig, profile, "data", overrides)
    study_data = Path(cfg.study_dir) / "data"
    if not (study_data / "stats.json").is_file():
        D.prepare(dataclasses.replace(dcfg, out_dir=str(study_data), cleaner="study"), progress=False)
    return T.train_reference_recipe(profile, study_data, Path(cfg.study_dir), overrides)


def run_evaluate(cfg: EvalConfig, profile: str = "cpu", overrides: list[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Run stage 06: generate for every system on the test split, score, compare, write the report.

    Returns:
        The metrics dict written to `<out_dir>/metrics.json` (system -> metric -> {mean, lo, hi, n},
        plus `comparisons` and `meta`).
    """
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    gen_dir = out / "generations"
    test = pd.read_parquet(Path(cfg.data_dir) / "test.parquet")
    if cfg.n_test:
        test = test.iloc[: cfg.n_test]
    uids, titles, refs = test.uid.tolist(), test.title.tolist(), test.content.tolist()
    systems = list(cfg.systems)

    llama_card = _run_card(Path(cfg.llama_dir))
    base_model = llama_card["base_model"]
    embedder = M.Embedder(cfg.embedder)
    per_system: dict[str, pd.DataFrame] = {}
    shown: dict[str, list[str]] = {}
    timings: dict[str, float] = {}

    def run_system(name: str, model: Any, tok: Any, prompts: list[str], refs_: list[str], sources: list[str], fp: str, r1: bool, keys: list[str]) -> None:
        t = time.perf_counter()
        max_new = cfg.max_new_tokens_cot if r1 else cfg.max_new_tokens
        gen = lambda ps: MD.generate(model, tok, ps, max_new_tokens=max_new, batch_size=cfg.batch_size,
                                       max_batch_tokens=cfg.max_batch_tokens, progress=progress, desc=name)  # noqa: E731
        preds = cached_generate(gen_dir / f"{name}.jsonl", keys, prompts, gen, _key(fp, max_new, P.PROMPT_VERSION),
                                chunk=cfg.batch_size)
        per_system[name] = score_rows(preds, refs_, sources, embedder, r1=r1).assign(uid=keys, prompt=prompts, reference=refs_)
        shown[name] = prompts
        timings[name] = round(time.perf_counter() - t, 1)
        log.info("evaluate: %s done in %.0fs", name, timings[name])

    # RAG contexts: retrieved once, the product itself excluded.
    contexts: list[list[dict]] = [[] for _ in uids]
    if any(s.endswith("+rag") for s in systems):
        from prodtune import rag as R

        store = R.open_store(cfg.chroma_dir)
        contexts = [R.retrieve_context(store, t, k=cfg.rag_k, exclude_uids=[u]) for t, u in zip(titles, uids)]
    rag_prompts = [P.alpaca_rag_prompt(t, [h["content"] for h in hits]) for t, hits in zip(titles, contexts)]
    rag_sources = [t + "\n" + "\n".join(h["content"] for h in hits) for t, hits in zip(titles, contexts)]
    plain_prompts = [P.alpaca_prompt(t) for t in titles]

    # Base and Llama-track: one peft model, the adapter switched off for the base systems.
    llama_model, llama_tok = MD.load_for_inference(base_model, cfg.llama_dir)
    llama_fp = _key(llama_card.get("fingerprint"), llama_card.get("utc"))
    with llama_model.disable_adapter():
        if "base" in systems:
            run_system("base", llama_model, llama_tok, plain_prompts, refs, titles, _key("base", base_model), False, uids)
        if "base+rag" in systems:
            run_system("base+rag", llama_model, llama_tok, rag_prompts, refs, rag_sources, _key("base", base_model), False, uids)
    if "llama-ft" in systems:
        run_system("llama-ft", llama_model, llama_tok, plain_prompts, refs, titles, llama_fp, False, uids)
    if "llama-ft+rag" in systems:
        run_system("llama-ft+rag", llama_model, llama_tok, rag_prompts, refs, rag_sources, llama_fp, False, uids)

    # The CoT task: base model vs DeepSeek-track adapter on the CoT test questions.
    cot_test = _cot_test(Path(cfg.cot_dir), cfg.n_test)
    if "base-r1" in systems and cot_test is not None:
        with llama_model.disable_adapter():
            run_system("base-r1", llama_model, llama_tok, [P.r1_prompt(q) for q in cot_test.Question], cot_test.Response.tolist(),
                       [f"{t}\n{c}" for t, c in zip(cot_test.title, cot_test.source)], _key("base", base_model), True, cot_test.uid.tolist())
    del llama_model

    if any(s.startswith("deepseek") for s in systems):
        ds_card = _run_card(Path(cfg.deepseek_dir))
        ds_model, ds_tok = MD.load_for_inference(ds_card["base_model"], cfg.deepseek_dir)
        ds_fp = _key(ds_card.get("fingerprint"), ds_card.get("utc"))
        if "deepseek-ft" in systems:
            qs = [P.r1_prompt(DEEPSEEK_DESCRIBE_QUESTION.format(title=t)) for t in titles]
            run_system("deepseek-ft", ds_model, ds_tok, qs, refs, titles, ds_fp, True, uids)
        if "deepseek-ft-cot" in systems and cot_test is not None:
            run_system("deepseek-ft-cot", ds_model, ds_tok, [P.r1_prompt(q) for q in cot_test.Question], cot_test.Response.tolist(),
                       [f"{t}\n{c}" for t, c in zip(cot_test.title, cot_test.source)], ds_fp, True, cot_test.uid.tolist())
        del ds_model

    if "study-recipe" in systems and cfg.study_recipe:
        study_dir = train_study_recipe(profile, cfg, overrides)
        card = _run_card(study_dir)
        st_model, st_tok = MD.load_for_inference(card["base_model"], study_dir)
        from prodtune.data import reference_clean

        # The study fed its model regex-cleaned titles; its answers are scored against our readable references.
        run_system("study-recipe", st_model, st_tok, [P.alpaca_prompt(reference_clean(t)) for t in titles], refs, titles,
                   _key(card.get("fingerprint"), card.get("utc")), False, uids)
        del st_model

    summary = summarize(per_system, cfg.n_boot, cfg.seed)
    comparisons = compare(per_system, cfg.n_boot, cfg.seed)
    meta = {
        "profile": profile, "base_model": base_model, "n_test": len(uids), "decoding": "greedy",
        "study_temperatures": {"llama": 0.7, "deepseek": 0.2}, "rag_k": cfg.rag_k, "prompt_version": P.PROMPT_VERSION,
        "seconds": round(time.perf_counter() - t0, 1), "system_seconds": timings,
        "rag_excludes_own_product": True,
    }
    result = {**summary, "comparisons": comparisons, "meta": meta}
    write_json(out / "metrics.json", result)
    for name, df in per_system.items():
        df.to_csv(gen_dir / f"{name}.scores.csv", index=False)
    write_report(result, per_system, out, run_dirs={"llama": Path(cfg.llama_dir), "deepseek": Path(cfg.deepseek_dir),
                                                     "study-recipe": Path(cfg.study_dir)}, n_examples=cfg.n_examples)
    if cfg.write_latest:
        latest = out.parent if out.name == profile else out
        if latest != out:
            for name in ("metrics.json", "report.md", "report.html"):
                write_text(latest / name, (out / name).read_text(encoding="utf-8"))
    log.info("evaluate: wrote %s/{metrics.json,report.md,report.html} in %.0fs", out, meta["seconds"])
    return result


def _cot_test(cot_dir: Path, n: int | None) -> pd.DataFrame | None:
    path = cot_dir / "test.parquet"
    if not path.is_file():
        log.warning("evaluate: %s missing; the CoT systems are skipped", path)
        return None
    df = pd.read_parquet(path)
    if "source" not in df:
        df["source"] = df.get("content", "")
    return df.iloc[:n] if n else df


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def metrics_table(result: dict[str, Any]) -> pd.DataFrame:
    """One row per system: mean [95% CI] of each metric, as text, for the report and the notebook."""
    rows = []
    for name, ms in result.items():
        if name in ("comparisons", "meta"):
            continue
        row = {"system": name, "n": next(iter(ms.values()))["n"] if ms else 0}
        for m, v in ms.items():
            scale = 100 if m in ("rouge_l", "embed_cos", "unsupported_rate", "repetition", "empty", "endless", "think_ok") else 1
            row[m] = f"{v['mean'] * scale:.1f} [{v['lo'] * scale:.1f}, {v['hi'] * scale:.1f}]"
        rows.append(row)
    return pd.DataFrame(rows).fillna("–")  # think_ok exists only for R1-prompted systems


def comparisons_table(result: dict[str, Any]) -> pd.DataFrame:
    """Paired differences with CIs (ROUGE-L and cosine in points x100, chrF in points)."""
    rows = []
    for c in result.get("comparisons", []):
        s = 1 if c["metric"] == "chrf" else 100
        rows.append({"a - b": f"{c['a']} - {c['b']}", "metric": c["metric"], "diff": round(c["diff"] * s, 2),
                     "95% CI": f"[{c['lo'] * s:.2f}, {c['hi'] * s:.2f}]", "CI excludes 0": c["excludes_zero"],
                     "p": round(c["p"], 4), "question": c["question"]})
    return pd.DataFrame(rows)


def loss_histories(run_dirs: dict[str, Path]) -> pd.DataFrame:
    """Training and validation loss of every run card found: columns run, split, step, loss."""
    rows = []
    for run, d in run_dirs.items():
        card_path = Path(d) / "run_card.json"
        if not card_path.is_file():
            continue
        card = read_json(card_path)
        for split, key in (("train", "train_loss"), ("validation", "eval_loss")):
            for point in card.get(key) or []:
                if isinstance(point, dict):
                    rows.append({"run": run, "split": split, "step": point.get("step"), "loss": point.get("loss")})
                elif isinstance(point, (list, tuple)) and len(point) == 2:
                    rows.append({"run": run, "split": split, "step": point[0], "loss": point[1]})
    return pd.DataFrame(rows, columns=["run", "split", "step", "loss"])


def loss_figure(run_dirs: dict[str, Path]) -> Any:
    """Interactive plotly figure: train (solid) and validation (dashed) loss of each run, side by side."""
    import plotly.express as px

    df = loss_histories(run_dirs)
    if df.empty:
        return None
    fig = px.line(df, x="step", y="loss", color="run", line_dash="split", markers=True, facet_col="run",
                  title="Training and validation loss", labels={"step": "optimizer step"})
    fig.update_xaxes(matches=None)
    return fig


def examples_table(per_system: dict[str, pd.DataFrame], n: int) -> pd.DataFrame:
    """The first `n` description-task products with the reference and each system's answer."""
    desc = [s for s in ("base", "base+rag", "llama-ft", "llama-ft+rag", "study-recipe", "deepseek-ft") if s in per_system]
    if not desc:
        return pd.DataFrame()
    first = per_system[desc[0]]
    rows = []
    for i in range(min(n, len(first))):
        row = {"title": _title_of(first.prompt.iloc[i]), "reference": first.reference.iloc[i]}
        for s in desc:
            row[s] = per_system[s].answer.iloc[i]
        rows.append(row)
    return pd.DataFrame(rows)


def _title_of(prompt: str) -> str:
    body = prompt.split("### Input:\n", 1)[-1]
    return body.split("\n", 1)[0].strip()


def write_report(result: dict[str, Any], per_system: dict[str, pd.DataFrame], out: Path, run_dirs: dict[str, Path], n_examples: int = 4) -> None:
    """Write `report.md` and a standalone `report.html` (tables, interactive loss curves, examples)."""
    import markdown

    meta = result["meta"]
    mt, ct = metrics_table(result), comparisons_table(result)
    ex = examples_table(per_system, n_examples)
    lines = [
        f"# prodtune report · profile `{meta['profile']}`",
        "",
        f"Base model `{meta['base_model']}`; {meta['n_test']} held-out test products; greedy decoding for every metric "
        f"(the study sampled at temperature {meta['study_temperatures']['llama']} for the Llama track and "
        f"{meta['study_temperatures']['deepseek']} for the DeepSeek track); RAG puts the top {meta['rag_k']} retrieved "
        "descriptions into the prompt and never retrieves the product being described. Prompt version "
        f"{meta['prompt_version']}; evaluation took {meta['seconds']} s.",
        "",
        "## Metrics (mean [bootstrap 95% CI])",
        "",
        "ROUGE-L, cosine, rates and think adherence in %, chrF in points, tokens/s on this machine. "
        "`unsupported_rate`: share of numbers and brand-like words in the answer that the title (and context) lack — a "
        "hallucination proxy. `endless`: hit the token limit without ending. `think_ok`: R1 completions that close "
        "`</think>` and then answer.",
        "",
        mt.to_markdown(index=False),
        "",
        "## Differences between systems (paired bootstrap, a - b)",
        "",
        ct.to_markdown(index=False) if not ct.empty else "_no pair of systems ran on the same rows_",
        "",
        "## Training and validation loss",
        "",
        "See the interactive figure in `report.html` (and `loss_curves.html`).",
        "",
        "## Example answers",
        "",
    ]
    for _, r in ex.iterrows():
        lines += [f"### {r['title']}", "", f"**reference:** {r['reference']}", ""]
        for s in [c for c in ex.columns if c not in ("title", "reference")]:
            lines += [f"**{s}:** {r[s] or '_(empty)_'}", ""]
    md = "\n".join(lines) + "\n"
    write_text(out / "report.md", md)
    fig = loss_figure(run_dirs)
    fig_html = fig.to_html(full_html=False, include_plotlyjs="inline") if fig is not None else "<p>no run cards found</p>"
    if fig is not None:
        write_text(out / "loss_curves.html", fig.to_html(include_plotlyjs="inline"))
    body = markdown.markdown(md.replace("See the interactive figure in `report.html` (and `loss_curves.html`).", "@@FIG@@"),
                             extensions=["tables"])
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>prodtune report</title>"
        "<style>body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px 6px}</style></head><body>"
        + body.replace("<p>@@FIG@@</p>", fig_html) + "</body></html>"
    )
    write_text(out / "report.html", page)


def add_parser(sub: Any) -> None:
    """Register `prodtune evaluate`."""
    p = sub.add_parser("evaluate", help="stage 06: compare base / fine-tuned / RAG / DeepSeek track, write the report")
    p.add_argument("--n-test", type=int, help="evaluate on the first N test products")
    p.add_argument("--systems", help="comma-separated subset of systems")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    from prodtune.config import stage_config

    cfg = stage_config(EvalConfig, args.profile, "evaluate", args.set, n_test=args.n_test,
                       systems=args.systems.split(",") if args.systems else None)
    result = run_evaluate(cfg, args.profile, args.set)
    print(metrics_table(result).to_string(index=False))
    print(comparisons_table(result).to_string(index=False))
    return 0


def is_finite_metrics(result: dict[str, Any]) -> bool:
    """True when every mean in the metrics dict is a finite number (what CI's smoke run asserts)."""
    return all(math.isfinite(v["mean"]) for k, ms in result.items() if k not in ("comparisons", "meta") for v in ms.values())
