"""Stage 02 end to end: `run(cfg)` generates, gates and stores a CoT row per selected product, resuming where a run stopped.

    prodtune cot --backend template --data_dir data/cpu/prepared --out_dir data/cpu/cot
    python -c "from prodtune.cot import CoTConfig, run; print(run(CoTConfig(data_dir='data/cpu/prepared', out_dir='/tmp/cot'))['rows'])"
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any

from prodtune import prompts
from prodtune.config import ConfigError
from prodtune.cot.backends import Backend, GenResult, make_backend
from prodtune.cot.config import GATE_LABELS, GATES, RUN_CONTROL, SPLITS, CoTConfig
from prodtune.cot.gates import Gates, QuestionIndex
from prodtune.cot.products import Item, load_products
from prodtune.cot.store import CoTStore, push_to_hub, read_jsonl, write_outputs
from prodtune.io import log, read_json, write_json

OUTPUT_FILES = ("cot.jsonl", "rejects.jsonl", "cot.parquet", "stats.json", "README.md", "run.json",
                *(f"{s}.parquet" for s in SPLITS))


def _manifest(cfg: CoTConfig) -> dict[str, Any]:
    """What the rows in `out_dir` were made with (`run.json`): a rerun may only add rows made the same way."""
    m = {"backend": cfg.backend, "model": cfg.model_name, "prompt_version": prompts.COT_PROMPT_VERSION, "seed": cfg.seed,
         "styles": list(cfg.styles), "data_dir": str(cfg.data_dir)}
    if cfg.backend == "openai":
        m["base_url"] = cfg.base_url
    if cfg.backend == "local":
        m["local_mode"] = cfg.local_mode
    return m


def _prepare_out(cfg: CoTConfig) -> None:
    """Create `out_dir`; refuse to mix rows of another backend/model/prompt version unless `overwrite`."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    new = _manifest(cfg)
    old = read_json(run_json) if run_json.is_file() else {}
    if not old and (out / "cot.jsonl").is_file():  # rows without a manifest: judge them by their own backend
        first = read_jsonl(out / "cot.jsonl")[:1]
        old = {"backend": first[0].get("backend")} if first else {}
    # Template rows take a second and follow the code, so they are rebuilt rather than resumed: a changed
    # template can then never leave stale rows behind. Rows of a model are never discarded that way.
    if cfg.overwrite or (cfg.backend == "template" and old.get("backend", "template") == "template"):
        for name in OUTPUT_FILES:
            (out / name).unlink(missing_ok=True)
    elif old and (out / "cot.jsonl").is_file():
        keys = ("backend", "model", "prompt_version", "seed", "styles")
        diff = {k: (old.get(k), new[k]) for k in keys if old.get(k) != new[k]}
        if diff:
            raise ConfigError(
                f"CoTConfig.out_dir: {out} holds rows made with {', '.join(f'{k}={a!r}' for k, (a, _) in diff.items())}; "
                f"this run asks for {', '.join(f'{k}={b!r}' for k, (_, b) in diff.items())}. "
                "Use another out_dir, or overwrite=true to discard them."
            )
    write_json(run_json, new)


def run(cfg: CoTConfig) -> dict[str, Any]:
    """Run stage 02: generate, gate and store CoT rows for the selected products; resume where a run stopped.

    Reads stage 01's splits from `cfg.data_dir`; writes `cot.jsonl`, `rejects.jsonl`, `cot.parquet`, the split
    files, `stats.json`, `run.json` and the dataset card under `cfg.out_dir`; then uploads to the Hub when
    `cfg.push_to_hub` names a repo.

    Args:
        cfg: stage settings, paths filled (`prodtune.config.load_config(CoTConfig, ...)` or the constructor).

    Returns:
        The stats dict (also in `out_dir/stats.json`): funnel, rejects by reason, retries, splits, this run's
        rows/s; `complete` is False while products wait for a rerun (transient failures); `hub_url` after an upload.

    Raises:
        ConfigError: a path still holds a template, `push_to_hub` is set without `$HF_TOKEN`, or `out_dir` holds
            rows of another backend/model/prompt version.
        FileNotFoundError: stage 01 output is missing.
        prodtune.cot.openai_backend.EndpointError: the endpoint refused the key or does not exist (rows done so
            far are kept).
    """
    from tqdm.auto import tqdm

    for what in ("data_dir", "out_dir"):
        if "{" in str(getattr(cfg, what)):
            raise ConfigError(f"CoTConfig.{what}: {getattr(cfg, what)!r} still holds a template; build the config with "
                              "prodtune.config.load_config(CoTConfig, ...) or give a real path")
    if cfg.push_to_hub and not os.environ.get("HF_TOKEN"):  # say so before the generation, not after it
        raise ConfigError(f"CoTConfig.push_to_hub: uploading to {cfg.push_to_hub!r} needs a Hugging Face write token "
                          "in $HF_TOKEN; set it, or push_to_hub=null")
    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    products = load_products(cfg.data_dir, cfg.seed, cfg.styles)
    selected = products[: cfg.n] if cfg.n else products
    _prepare_out(cfg)
    store = CoTStore(out)
    done = store.done()
    todo = [it for it in selected if it.uid not in done]
    index = QuestionIndex(cfg.dedup_threshold)
    for uid, r in store.rows.items():
        index.add(r["Question"], uid)
    gates = Gates(cfg)
    run_counts: Counter = Counter()
    log.info("cot %s: %d products selected, %d already done, %d to generate -> %s", cfg.backend, len(selected),
             len(selected) - len(todo), len(todo), out)

    bar = tqdm(total=len(selected), initial=len(selected) - len(todo), desc=f"cot {cfg.backend}", unit="product",
               disable=not cfg.progress, mininterval=0.5)
    # Loading a model (local backend) only when something is left to generate keeps a finished rerun instant.
    backend: Backend | None = make_backend(cfg) if todo else None
    model = backend.model if backend is not None else ("template" if cfg.backend == "template" else cfg.model_name)

    def on_result(res: GenResult) -> None:
        it, ans = res.item, res.answer
        base = {"uid": it.uid, "title": it.title, "split": it.split, "style": it.style}
        reason, detail = res.reason, res.detail
        if ans is not None:
            reason, detail = gates.check(it, ans)
            if reason is None:
                sim, other = index.nearest(ans.Question)
                if sim >= cfg.dedup_threshold:
                    reason, detail = "near_duplicate", f"Jaccard {sim:.2f} with the question of {other}"
        if ans is not None and reason is None:
            index.add(ans.Question, it.uid)
            store.add_row({**base, **ans.model_dump(), "backend": backend.name, "model": backend.model,
                           "prompt_version": prompts.COT_PROMPT_VERSION, "meta": res.meta})
            run_counts["accepted"] += 1
        else:
            rec = {**base, "reason": reason or "unknown", "detail": detail, "retryable": res.retryable,
                   "answer": ans.model_dump() if ans is not None else None, "raw": res.raw[:2000], "meta": res.meta}
            store.add_reject(rec)
            run_counts["rejected" if not res.retryable else "failed_retryable"] += 1
        bar.update(1)

    try:
        if backend is not None:
            backend.run(todo, on_result)
    finally:
        bar.close()
        store.close()
    gen_s = time.perf_counter() - t0
    stats = summarize(store, cfg, selected, len(products), model)
    stats["this_run"] = {
        "generated": len(todo), **dict(run_counts), "seconds": round(gen_s, 3),
        "rows_per_s": round(len(todo) / gen_s, 3) if todo and gen_s > 0 else None,
        "resumed_done": len(selected) - len(todo),
        **(backend.run_info() if backend is not None else {}),
    }
    write_outputs(out, store, products, stats)
    log.info("cot %s: %d rows (%s), %d rejected, %d to retry; wrote %s in %.1fs", cfg.backend, stats["rows"],
             stats["splits"], stats["rejected"], stats["pending_retryable"], out, time.perf_counter() - t0)
    if cfg.push_to_hub:
        stats["hub_url"] = push_to_hub(out, cfg.push_to_hub, private=cfg.hub_private)
    return stats


def summarize(store: CoTStore, cfg: CoTConfig, selected: list[Item], n_products: int, model: str) -> dict[str, Any]:
    """Stats over everything in the store (all runs so far): funnel, rejects by reason, retries, tokens."""
    sel = {it.uid for it in selected}
    latest: dict[str, dict] = {}
    for r in store.rejects:
        if r["uid"] not in store.rows:
            latest[r["uid"]] = r  # the last decision about a product counts
    final = {u: r for u, r in latest.items() if not r.get("retryable")}
    pending = {u: r for u, r in latest.items() if r.get("retryable")}
    by_reason = Counter(r["reason"] for r in final.values())
    http: Counter = Counter()
    invalid: Counter = Counter()
    tokens: Counter = Counter()
    truncated = 0
    for rec in [*store.rows.values(), *store.rejects]:  # every attempt costs, superseded ones included
        m = rec.get("meta") or {}
        http.update(m.get("retries") or {})
        invalid.update(m.get("invalid_answers") or {})
        tokens["prompt"] += m.get("prompt_tokens", 0)
        tokens["completion"] += m.get("completion_tokens", 0)
        truncated += bool(m.get("truncated"))
    n_sel_done = len(sel & set(store.rows)) + len(sel & set(final))
    answered = len(store.rows) + sum(v for k, v in by_reason.items() if k in GATES)
    left = answered
    steps = [["products attempted", len(store.rows) + len(latest)], ["valid answer", answered]]
    for g in GATES:
        left -= by_reason.get(g, 0)
        steps.append([GATE_LABELS[g], left])
    splits = Counter(r["split"] for r in store.rows.values())
    return {
        "backend": cfg.backend,
        "model": model,
        "prompt_version": prompts.COT_PROMPT_VERSION,
        "seed": cfg.seed,
        "products_available": n_products,
        "products_selected": len(selected),
        "complete": n_sel_done == len(selected),
        "rows": len(store.rows),
        "rejected": len(final),
        "pending_retryable": len(pending),
        "splits": {s: splits.get(s, 0) for s in SPLITS},
        "styles": dict(Counter(r["style"] for r in store.rows.values())),
        "funnel": steps,
        "gates": {g: by_reason.get(g, 0) for g in GATES},
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "pending_by_reason": dict(Counter(r["reason"] for r in pending.values())),
        "retries": {"http": dict(sorted(http.items())), "http_total": sum(http.values()),
                    "invalid_answers": dict(sorted(invalid.items())), "invalid_total": sum(invalid.values())},
        "truncated_answers": truncated,
        "tokens": dict(tokens),
        "pass_rate": round(len(store.rows) / max(1, len(store.rows) + len(final)), 4),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_CONTROL},
    }


def funnel(stats: dict[str, Any]) -> list[tuple[str, int]]:
    """The gate funnel as (step, products remaining) pairs, for tables and plots."""
    return [(s, n) for s, n in stats["funnel"]]
