"""Generate and score: one function for stage 06's systems and the before/after cells of notebooks 03/04.

    python -c "from prodtune.evaluate import build_inputs; print(build_inputs([{'title': 'Mug', 'content': 'A mug.'}], track='llama'))"

`generate_and_score` builds a track's prompts (`prodtune.prompts`), completes them with `models.generate` (greedy),
optionally through a resumable JSONL cache, and scores every row (`score.score_rows`). `before_after` runs it twice
on one loaded run, with the LoRA adapter switched off (the base model) and on.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd

from prodtune import metrics as M
from prodtune import models as MD
from prodtune import prompts as P
from prodtune.evaluate.score import TRACKS, score_rows, summarize_frame
from prodtune.gpu import free_memory
from prodtune.io import log, read_json, write_json

DEEPSEEK_DESCRIBE_QUESTION = 'Can you describe the product "{title}" for me?'
TASKS = ("description", "cot")


def cache_key(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (generation cache keys, model fingerprints)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_cache(cache: Path) -> dict[str, dict]:
    """The generations a JSONL cache holds, by key (a line cut by a kill is skipped: generated again)."""
    done: dict[str, dict] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[row["key"]] = row
    return done


def cached_generate(
    cache: Path, uids: Sequence[str], prompts: Sequence[str], gen: Callable[[list[str]], list[dict]], fingerprint: str,
    chunk: int = 16,
) -> list[dict]:
    """Generate for prompts not in `cache` (JSONL keyed by uid + prompt + model fingerprint), appending as it goes.

    A killed run resumes where it stopped; a changed model, prompt or setting regenerates only what changed.

    Args:
        cache: the JSONL file (created if missing).
        uids: one id per prompt.
        prompts: the prompts.
        gen: completes a list of prompts (one dict per prompt, as `models.generate`).
        fingerprint: what identifies the model and the generation settings.
        chunk: prompts per `gen` call, each call's results written before the next.

    Returns:
        One dict per prompt, in order: `gen`'s dict plus `key` and `uid`.
    """
    job = Job(name=str(cache), track="", inputs=pd.DataFrame({"uid": list(uids), "prompt": list(prompts)}),
              max_new_tokens=0, decoding={}, keys=[cache_key(u, p, fingerprint) for u, p in zip(uids, prompts)],
              cache=cache, done=read_cache(cache))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.touch()
    todo = job.pending()
    for s in range(0, len(todo), chunk):
        idx = todo[s : s + chunk]
        job.record(list(zip(idx, gen([prompts[i] for i in idx]))))
    return job.predictions()


def build_inputs(
    rows: Any, *, track: str, task: str | None = None, contexts: Sequence[Sequence[str]] | None = None,
    prompt_title: Callable[[str], str] | None = None, tokenizer: Any = None, max_context_chars: int = 600,
) -> pd.DataFrame:
    """Prompts, references and sources of data rows for a track and task.

    Args:
        rows: a DataFrame or a list of dicts: `title` and `content` for the description task; `Question`,
            `Response` (and `title`, `source` or `content` for the hallucination proxy) for the CoT task.
        track: `llama` (Alpaca prompts) or `deepseek` (R1 prompts).
        task: `description` (title -> description; on R1 prompts the title is asked about with
            `DEEPSEEK_DESCRIBE_QUESTION`) or `cot` (shopper question -> answer; R1 prompts only). None: the track's own
            task (description for llama, cot for deepseek).
        contexts: retrieved descriptions per row, put into the Alpaca prompt (RAG; llama track, description task).
        prompt_title: how a title is written into the prompt (the study's model saw regex-cleaned titles); the
            hallucination proxy still compares with the original title.
        max_context_chars: longest retrieved description shown (the run card's `rag.max_chars`).

    Returns:
        Columns uid, prompt, reference, source (the product's own text shown: its title, and for a CoT question its
        description), context (retrieved descriptions of other products in the prompt, "" without RAG), input.

    Raises:
        ValueError: unknown track or task, a combination that does not exist, or a missing column.
    """
    df = rows.reset_index(drop=True) if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    if track not in TRACKS:
        raise ValueError(f"track {track!r}: expected one of {TRACKS}")
    task = task or ("description" if track == "llama" else "cot")
    if task not in TASKS or (task == "cot" and track != "deepseek"):
        raise ValueError(f"task {task!r} on track {track!r}: expected 'description', or 'cot' on the deepseek track")
    if contexts is not None and (track != "llama" or len(contexts) != len(df)):
        raise ValueError("contexts: one list per row, on the llama track (Alpaca RAG prompts) only")
    need = ("title", "content") if task == "description" else ("Question", "Response")
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"rows lack the column(s) {missing} the {task} task needs (have {list(df.columns)})")
    uids = df["uid"].tolist() if "uid" in df else [str(i) for i in range(len(df))]
    titles = df["title"].tolist() if "title" in df else [""] * len(df)
    shown = [prompt_title(t) for t in titles] if prompt_title else titles
    if task == "cot":
        extra = df["source"] if "source" in df else (df["content"] if "content" in df else pd.Series([""] * len(df)))
        return pd.DataFrame({"uid": uids, "prompt": [P.r1_chat_prompt(tokenizer, q) for q in df["Question"]],
                             "reference": df["Response"].tolist(), "source": [f"{t}\n{c}" for t, c in zip(titles, extra)],
                             "context": [""] * len(df), "input": df["Question"].tolist()})
    shown_context = [""] * len(df)
    if track == "deepseek":
        prompts = [P.r1_chat_prompt(tokenizer, DEEPSEEK_DESCRIBE_QUESTION.format(title=t)) for t in shown]
    elif contexts is not None:
        prompts = [P.alpaca_rag_prompt(t, list(c), max_context_chars=max_context_chars) for t, c in zip(shown, contexts)]
        shown_context = ["\n".join(c) for c in contexts]
    else:
        prompts = [P.alpaca_prompt(t) for t in shown]
    return pd.DataFrame({"uid": uids, "prompt": prompts, "reference": df["content"].tolist(), "source": titles,
                         "context": shown_context, "input": titles})


@dataclass
class Job:
    """One system's generations on one model: its prompts (`build_inputs`), the decoding, and the cache they go
    through. `plan_job` makes one, `run_jobs` generates what the cache lacks (pooling jobs that share a model and
    a decoding), `score_job` scores it."""

    name: str
    track: str
    inputs: pd.DataFrame
    max_new_tokens: int
    decoding: dict[str, Any]
    keys: list[str]
    cache: Path | None
    done: dict[str, dict] = field(default_factory=dict)

    def pending(self) -> list[int]:
        """Rows without a generation yet."""
        return [i for i, k in enumerate(self.keys) if k not in self.done]

    def record(self, rows: Sequence[tuple[int, dict]]) -> None:
        """Keep the generations of rows `(i, result)`, appended to the cache file (flushed) when there is one."""
        out = []
        for i, r in rows:
            row = {"key": self.keys[i], "uid": self.inputs.uid[i], **r}
            self.done[self.keys[i]] = row
            out.append(json.dumps(row, ensure_ascii=False) + "\n")
        if self.cache is not None and out:
            self.cache.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache, "a", encoding="utf-8") as fh:
                fh.writelines(out)

    def predictions(self) -> list[dict]:
        return [self.done[k] for k in self.keys]


def plan_job(
    rows: Any, *, name: str = "generate", track: str, task: str | None = None,
    contexts: Sequence[Sequence[str]] | None = None, prompt_title: Callable[[str], str] | None = None,
    tokenizer: Any = None, max_context_chars: int = 600, max_new_tokens: int = 160,
    cache: str | os.PathLike | None = None, fingerprint: str = "", decoding: dict[str, Any] | None = None,
) -> Job:
    """A system's prompts and cache keys (see `generate_and_score` for the arguments); what the cache holds is read."""
    inputs = build_inputs(rows, track=track, task=task, contexts=contexts, prompt_title=prompt_title, tokenizer=tokenizer,
                          max_context_chars=max_context_chars)
    decoding = decoding_of({"generation": decoding or {}})
    extra = [decoding, MD.ANTI_LOOP_SCOPE] if decoding != decoding_of({}) else []  # plain greedy keeps older keys
    fp = cache_key(fingerprint, max_new_tokens, P.PROMPT_VERSION, *extra)
    keys = [cache_key(u, p, fp) for u, p in zip(inputs.uid, inputs.prompt)]
    path = Path(cache) if cache is not None else None
    return Job(name=name, track=track, inputs=inputs, max_new_tokens=max_new_tokens, decoding=decoding, keys=keys,
               cache=path, done=read_cache(path) if path is not None else {})


def run_jobs(model: Any, tokenizer: Any, jobs: Sequence[Job], *, batch_size: int = 8,
             max_batch_tokens: int | None = MD.DEFAULT_MAX_BATCH_TOKENS, progress: bool = True,
             engine: str = "auto") -> dict[str, float]:
    """Generate every job's missing rows on one model; jobs with the same decoding are pooled.

    Pooled rows go through one `models.generate` call, each row with its own job's `max_new_tokens`, and each is
    written to its job's cache as it ends (a stopped run resumes from there). The pruned loop keeps up to
    `batch_size` rows generating, refilled in length order as rows end, so the rows of several systems (the base
    model's plain and RAG prompts, or the DeepSeek run's descriptions and CoT questions) share each step's read of
    the weights. A row's tokens do not depend on the rows beside it (`benchmarks/bench_evaluate.py` compares).

    Returns:
        Seconds spent per job: each row's share of the wall time (`models.generate`'s `seconds`).
    """
    seconds = {j.name: 0.0 for j in jobs}
    groups: dict[str, list[Job]] = {}
    for j in jobs:
        groups.setdefault(json.dumps(j.decoding, sort_keys=True), []).append(j)
    for group in groups.values():
        todo = [(j, i) for j in group for i in j.pending()]
        if not todo:
            continue
        if model is None or tokenizer is None:
            raise ValueError(f"{'+'.join(j.name for j in group)}: {len(todo)} rows are not in the cache "
                             f"({', '.join(str(j.cache) for j in group)}); generating them needs the model")

        def record(k: int, result: dict, todo: list = todo) -> None:
            job, i = todo[k]
            job.record([(i, result)])
            seconds[job.name] += result["seconds"]

        MD.generate(model, tokenizer, [j.inputs.prompt[i] for j, i in todo],
                    max_new_tokens=[j.max_new_tokens for j, _ in todo], batch_size=batch_size,
                    max_batch_tokens=max_batch_tokens, progress=progress, desc="+".join(j.name for j in group),
                    engine=engine, on_result=record, **group[0].decoding)
    return seconds


def score_job(job: Job, embedder: M.Embedder | None = None, n_boot: int = 2000,
              seed: int = 3407) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Score a job whose rows are all generated: the per-row frame and metric -> {mean, lo, hi, n}."""
    preds, inputs = job.predictions(), job.inputs
    prompts = inputs.prompt.tolist()
    frame = score_rows(preds, inputs.reference.tolist(), inputs.source.tolist(), embedder, r1=job.track == "deepseek",
                       prompts=prompts, contexts=inputs.context.tolist())
    frame = frame.assign(uid=inputs.uid.tolist(), prompt=prompts, reference=inputs.reference.tolist(),
                         text=[p["text"] for p in preds])
    return frame, summarize_frame(frame, n_boot, seed)


def generate_and_score(
    model: Any, tokenizer: Any, rows: Any, *, track: str, task: str | None = None,
    contexts: Sequence[Sequence[str]] | None = None, prompt_title: Callable[[str], str] | None = None,
    max_context_chars: int = 600, max_new_tokens: int = 160, batch_size: int = 8, max_batch_tokens: int | None = MD.DEFAULT_MAX_BATCH_TOKENS,
    embedder: M.Embedder | None = None, cache: str | os.PathLike | None = None, fingerprint: str = "",
    n_boot: int = 2000, seed: int = 3407, progress: bool = True, desc: str = "generate",
    decoding: dict[str, Any] | None = None, engine: str = "auto",
) -> tuple[pd.DataFrame, dict[str, dict[str, float]]]:
    """Build a track's prompts for `rows`, generate greedily, score every row; summarise with bootstrap CIs
    (`plan_job`, `run_jobs`, `score_job` for one system).

    Args:
        model: a causal LM in eval mode (a peft model inside `disable_adapter()` gives the base model). Not used
            when the cache holds every row.
        tokenizer: its tokenizer.
        rows: data rows (see `build_inputs`).
        track, task, contexts, prompt_title, max_context_chars: which prompts (see `build_inputs`).
        max_new_tokens: longest completion.
        batch_size: prompts per generate call (and per cache flush).
        max_batch_tokens: cap rows x (prompt + new tokens) per generate call (long prompts go fewer at a time).
        embedder: sentence embeddings for `embed_cos`; None: no cosine column.
        cache: a JSONL file of generations (resumable; keyed by uid, prompt, `fingerprint`, `max_new_tokens` and
            the prompt version); None: generate everything now.
        fingerprint: what identifies the model (a run's fingerprint); only used with `cache`.
        n_boot: bootstrap resamples of the summary.
        seed: bootstrap seed.
        progress: tqdm bars.
        desc: the progress bar's label.
        decoding: anti-loop settings for `models.generate` (`repetition_penalty`, `no_repeat_ngram_size`: a run
            card's `generation`, `decoding_of`); None: plain greedy.
        engine: `models.generate`'s greedy loop (auto, pruned, transformers: the same tokens).

    Returns:
        `(frame, summary)`: the per-row frame (`score_rows`' columns plus uid, prompt, reference, text) and
        metric -> {mean, lo, hi, n}.
    """
    job = plan_job(rows, name=desc, track=track, task=task, contexts=contexts, prompt_title=prompt_title,
                   tokenizer=tokenizer, max_context_chars=max_context_chars, max_new_tokens=max_new_tokens, cache=cache,
                   fingerprint=fingerprint, decoding=decoding)
    run_jobs(model, tokenizer, [job], batch_size=batch_size, max_batch_tokens=max_batch_tokens, progress=progress,
             engine=engine)
    return score_job(job, embedder, n_boot, seed)


def decoding_of(card: dict[str, Any]) -> dict[str, Any]:
    """The decoding a run card records (`generation`; the names of `decoding.DECODING`: the anti-loop settings, a
    shortest answer, grounded claims, and for the DeepSeek track think_before_eos and think_budget), normalised as
    the caches key it; off when the card has none (runs trained before it was recorded). Sampling settings the
    card may also hold (temperature, top_p, max_new_tokens) are not decoding settings here."""
    g = card.get("generation") or {}
    return MD.decoding_settings({k: v for k, v in g.items() if k in MD.DECODING})


def rag_settings(card: dict[str, Any], k: int = 3) -> dict[str, Any]:
    """How a Llama-track run is prompted with retrieval: the card's `rag` (k, min_score, max_chars) when it was
    trained with retrieved context, else `k` neighbours, all shown, 600 characters each (the study's RAG)."""
    r = card.get("rag") or {}
    if int(r.get("k") or 0) > 0:
        return {"k": int(r["k"]), "min_score": float(r.get("min_score") or 0.0), "max_chars": int(r.get("max_chars") or 600)}
    return {"k": k, "min_score": 0.0, "max_chars": 600}


def read_run_card(run_dir: str | Path, what: str) -> dict[str, Any]:
    """A finished training run's card; `what` says which stage writes it when it is missing.

    Raises:
        FileNotFoundError: naming the folder and what to run.
    """
    path = Path(run_dir) / "run_card.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; {what}")
    return read_json(path)


def before_after(
    base_model: str, run_dir: str | os.PathLike, rows: Any, *, track: str | None = None, split: str = "validation",
    max_new_tokens: int = 128, batch_size: int | None = None, max_batch_tokens: int | None = MD.DEFAULT_MAX_BATCH_TOKENS,
    embedder: M.Embedder | None = None, n_boot: int = 2000, seed: int = 3407, progress: bool = True,
) -> dict[str, Any]:
    """Generate for `rows` with the base model and with a run's LoRA adapter; score both against the references.

    Both come from one loaded model (`disable_adapter()` gives the base). Greedy decoding, stop at EOS. The result
    is cached in `<run_dir>/before_after_<split>.json`, keyed by the run's fingerprint, the rows and the settings.

    Args:
        base_model: the model the adapter was trained on (the run card's `base_model`).
        run_dir: a finished training run (adapter + run_card.json).
        rows: the rows to generate for (e.g. the track's validation split, first N rows).
        track: `llama` or `deepseek`; None: the run card's.
        split: the rows' split (names the cache file).
        max_new_tokens: longest generation.
        batch_size: prompts per generate call; None: 64 on CPU (a decode step's cost grows slowly with its rows
            there: 36 ms for 1 SmolLM2 row, 110 ms for 32, on 2 cores), 8 on CUDA (the KV cache of an 8B model must
            fit 8 GB cards).
        max_batch_tokens: also cap rows x (prompt + max_new_tokens) per batch: long R1 completions go fewer at a time.
        embedder: adds `embed_cos` to the scores; None: no cosine.
        n_boot: bootstrap resamples of the summaries.
        seed: bootstrap seed.
        progress: tqdm bars.

    Returns:
        `{"rouge_l_before", "rouge_l_after", "stopped_at_eos_before", "stopped_at_eos_after", "n", "track", "split",
        "metrics_before", "metrics_after" (metric -> {mean, lo, hi, n}), "rows": [{input, reference, before, after,
        after_full, rouge_l_before, rouge_l_after, ...}], ...}`.

    Raises:
        FileNotFoundError: the run folder has no run_card.json (train first).
    """
    run = Path(run_dir)
    card = read_run_card(run, "train this run first (notebook 03 or 04, `prodtune train`)")
    track = track or card["track"]
    inputs = build_inputs(rows, track=track)
    key = {"fingerprint": card.get("fingerprint"), "steps": card.get("steps"), "base_model": base_model, "split": split,
           "n": len(inputs), "max_new_tokens": max_new_tokens, "prompt_version": P.PROMPT_VERSION,
           "rows": cache_key(inputs.prompt.tolist(), inputs.reference.tolist()), "cosine": embedder is not None,
           "decoding": decoding_of(card)}
    cache = run / f"before_after_{split}.json"
    if cache.is_file():
        old = read_json(cache)
        if old.get("key") == key:
            return old
    model, tok = MD.load_for_inference(base_model, run) if len(inputs) else (None, None)  # no rows: no model
    if batch_size is None:
        batch_size = 8 if model is not None and next(model.parameters()).is_cuda else 64
    kw = dict(track=track, max_new_tokens=max_new_tokens, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
              embedder=embedder, n_boot=n_boot, seed=seed, progress=progress, decoding=decoding_of(card))
    with model.disable_adapter() if model is not None else contextlib.nullcontext():
        before, m_before = generate_and_score(model, tok, rows, desc="base model", **kw)
    after, m_after = generate_and_score(model, tok, rows, desc="fine-tuned", **kw)
    del model, tok
    free_memory()  # notebooks 03/04 and stage 06 load the next model next: one 8B model on a small card at a time
    out_rows = [{
        "uid": u, "input": i, "reference": ref, "before": b.answer, "after": a.answer, "after_full": a.text,
        "rouge_l_before": b.rouge_l, "rouge_l_after": a.rouge_l, "finished_before": not b.endless,
        "finished_after": not a.endless, "tokens_before": int(b.new_tokens), "tokens_after": int(a.new_tokens),
    } for u, i, ref, b, a in zip(inputs.uid, inputs.input, inputs.reference, before.itertuples(), after.itertuples())]
    n = len(out_rows)
    res = {
        "key": key, "track": track, "split": split, "n": n,
        "rouge_l_before": m_before["rouge_l"]["mean"] if n else 0.0,
        "rouge_l_after": m_after["rouge_l"]["mean"] if n else 0.0,
        "stopped_at_eos_before": 1 - m_before["endless"]["mean"] if n else 0.0,
        "stopped_at_eos_after": 1 - m_after["endless"]["mean"] if n else 0.0,
        "seconds_before": float(before.seconds.sum()) if n else 0.0, "seconds_after": float(after.seconds.sum()) if n else 0.0,
        "metrics_before": m_before, "metrics_after": m_after, "rows": out_rows,
    }
    write_json(cache, res)
    log.info("before/after on %s (%d rows): ROUGE-L %.3f -> %.3f; wrote %s", split, n, res["rouge_l_before"],
             res["rouge_l_after"], cache)
    return res


def before_after_table(res: dict[str, Any], n: int = 5, width: int = 160) -> pd.DataFrame:
    """The first `n` rows of a `before_after` result as a DataFrame with texts cut to `width` characters."""
    cols = ["input", "reference", "before", "after", "rouge_l_before", "rouge_l_after"]
    df = pd.DataFrame(res["rows"][:n], columns=cols)
    for c in ("input", "reference", "before", "after"):
        df[c] = df[c].str.slice(0, width)
    return df.round(3)
