"""Retrieval evaluation: held-out products asked for by variants of their title; recall@1/@5 and MRR@k.

    python -c "from prodtune.rag import RagConfig, run_eval; print(run_eval(RagConfig(persist_dir='models/cpu/chroma', data_dir='data/cpu/prepared')))"

Every held-out product (validation + test; they are in the store, since retrieval is over the whole catalogue) is
asked for by its exact title, a title with typos (1-2 swapped, dropped, doubled or neighbouring keys, seeded per
product), its first half, and a paraphrase (comma parts reversed, lower case, brand moved to the end, words swapped
from a fixed table of catalogue synonyms: a mild rewording). A hit is the asked product or one sold under exactly
the same title. Recall@1, recall@5 and MRR@k go to `<out_dir>/retrieval.{json,csv}`, each query with its rank and
top hit to `retrieval_queries.csv`. Figures on the committed sample: benchmarks/README.md, section RAG.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from prodtune.io import log, read_json, write_json, write_text
from prodtune.rag.config import VARIANTS, RagConfig, StoreError
from prodtune.rag.retrieve import search_many
from prodtune.rag.store import Store, iter_catalogue, open_store, store_order

# ----------------------------------------------------------------------------------------------
# Query variants (deterministic, seeded)
# ----------------------------------------------------------------------------------------------

_KEY_NEIGHBOURS = {
    "a": "qwsz", "b": "vghn", "c": "xdfv", "d": "serfcx", "e": "wsdr", "f": "drtgvc", "g": "ftyhbv", "h": "gyujnb",
    "i": "ujko", "j": "huikmn", "k": "jiolm", "l": "kop", "m": "njk", "n": "bhjm", "o": "iklp", "p": "ol",
    "q": "wa", "r": "edft", "s": "awedxz", "t": "rfgy", "u": "yhji", "v": "cfgb", "w": "qase", "x": "zsdc",
    "y": "tghu", "z": "asx",
}
# Paraphrase rules: common rewordings of catalogue words (applied on lower-cased whole words).
_SYNONYMS = {
    "bottle": "flask", "insulated": "thermal", "stainless steel": "steel", "leak-proof": "leakproof", "lid": "cap",
    "girls": "kids", "tutu": "tutu skirt", "skirt": "dress", "layered": "multi-layer", "tulle": "net",
    "wireless": "cordless", "headphones": "headset", "earbuds": "in-ear headphones", "noise-cancelling": "anc",
    "over-ear": "around-ear", "mat": "pad", "exercise": "workout", "extra thick": "thick", "non-slip": "anti-slip",
    "yoga": "pilates", "lamp": "light", "bedside": "nightstand", "dimmable": "adjustable", "frying pan": "skillet",
    "non-stick": "nonstick", "tea bags": "teabags", "loose leaf": "loose", "organic": "bio", "tin": "can",
    "building blocks": "bricks", "set": "kit", "pieces": "pcs", "pcs": "pieces", "magnetic tiles": "magnet tiles",
    "wooden": "wood", "daypack": "backpack", "hiking": "trekking", "paperback": "softcover", "novel": "book",
    "a field guide to": "guide to", "ml": "millilitre", "cm": "centimetre", "mm": "millimetre", "&": "and",
    "ages": "age", "for": "", "the": "", "with": "",
}
_SYN_RE = re.compile(r"(?<![\w-])(" + "|".join(re.escape(k) for k in sorted(_SYNONYMS, key=len, reverse=True)) + r")(?![\w-])")


def _rng(seed: int, uid: str, variant: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: the same on every run and platform.
    return random.Random(f"{seed}:{variant}:{uid}")


def typo_title(title: str, rng: random.Random) -> str:
    """Misspell a title: 1 typo (2 in titles of more than 4 long words), each a swap, drop, doubled or neighbour key.

    Only alphabetic words of 4+ letters are touched, never their first letter (people rarely get it wrong).
    """
    words = title.split(" ")
    cands = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    if not cands:
        cands = [i for i, w in enumerate(words) if len(w) >= 2]
    if not cands:
        return title
    n = 1 if len(cands) <= 4 else 2
    for i in rng.sample(cands, min(n, len(cands))):
        w = list(words[i])
        j = rng.randrange(1, len(w))
        op = rng.choice(("swap", "drop", "double", "neighbour"))
        if op == "swap" and j < len(w) - 1:
            w[j], w[j + 1] = w[j + 1], w[j]
        elif op == "drop":
            del w[j]
        elif op == "double":
            w.insert(j, w[j])
        else:
            c = w[j].lower()
            sub = rng.choice(_KEY_NEIGHBOURS.get(c, c) or c)
            w[j] = sub.upper() if w[j].isupper() else sub
        words[i] = "".join(w)
    return " ".join(words)


def truncate_title(title: str, rng: random.Random | None = None, keep: float = 0.5) -> str:
    """A partial title: its first half of words (at least 2), trailing punctuation dropped."""
    words = title.split()
    n = max(2, math.ceil(len(words) * keep))
    return " ".join(words[:n]).rstrip(",;:-(")


def paraphrase_title(title: str, rng: random.Random | None = None) -> str:
    """Reword a title: comma parts in reverse order, lower case, catalogue synonyms, brand moved to the end."""
    parts = [p.strip() for p in title.split(",") if p.strip()]
    head, rest = parts[0], parts[1:]
    words = head.split()
    brand = ""
    if len(words) > 2 and words[0][:1].isupper() and not words[0].lower() in ("the", "a"):
        brand, head = words[0], " ".join(words[1:])
    text = " ".join([*reversed(rest), head]).lower()
    text = _SYN_RE.sub(lambda m: _SYNONYMS[m.group(1)], text)
    text = re.sub(r"[():,]", " ", text)
    if brand:
        text += f" by {brand.lower()}"
    return " ".join(text.split())


_RULES: dict[str, Callable[[str, random.Random], str]] = {
    "exact": lambda t, r: t,
    "typo": typo_title,
    "truncated": truncate_title,
    "paraphrase": paraphrase_title,
}


def make_queries(rows: Iterable[dict[str, str]], variants: Sequence[str] = VARIANTS, seed: int = 3407) -> list[dict[str, str]]:
    """Queries for held-out products: one `{variant, uid, title, query}` per product and variant."""
    bad = [v for v in variants if v not in _RULES]
    if bad:
        raise ValueError(f"unknown query variant(s) {bad}; known: {list(_RULES)}")
    out = []
    for v in variants:
        for r in rows:
            out.append({"variant": v, "uid": r["uid"], "title": r["title"], "query": _RULES[v](r["title"], _rng(seed, r["uid"], v))})
    return out


# ----------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------


def _title_key(title: str) -> str:
    return " ".join(title.casefold().split())


def evaluate_retrieval(store: Store, rows: Sequence[dict[str, str]], variants: Sequence[str] = VARIANTS, k: int = 10,
                       seed: int = 3407, progress: bool = False) -> tuple[Any, Any]:
    """Recall@1, recall@5 and MRR@k of asking for each product by a variant of its title.

    A hit is the asked product or a product with exactly the same title (case and spacing aside): the catalogue
    holds different products under one title, and a title cannot tell them apart. `uid_recall@1` counts the asked
    product alone; its ceiling (`uid_ceiling@1`, mean of 1/products-sharing-the-title) is reported beside it.

    Args:
        store: from `open_store`; the asked products must be in it.
        rows: products with uid, title and optionally `twins` (products in the store with this title, default 1).
        variants: query rules (exact, typo, truncated, paraphrase).
        k: hits fetched (MRR counts a product found below k as 0).
        seed: seed of the rules.

    Returns:
        (summary DataFrame: one row per variant with n, recall@1, recall@5, mrr, uid_recall@1, uid_ceiling@1;
        per-query DataFrame with rank, uid_rank and the top hit).
    """
    import pandas as pd

    twins = {r["uid"]: int(r.get("twins", 1)) for r in rows}
    queries = make_queries(rows, variants, seed)
    hits = search_many(store, [q["query"] for q in queries], k=k, progress=progress)
    recs = []
    for q, hs in zip(queries, hits):
        ids = [h["uid"] for h in hs]
        key = _title_key(q["title"])
        same = [i for i, h in enumerate(hs, 1) if h["uid"] == q["uid"] or _title_key(h["title"]) == key]
        recs.append({**q, "rank": same[0] if same else None, "uid_rank": ids.index(q["uid"]) + 1 if q["uid"] in ids else None,
                     "twins": twins[q["uid"]], "top_uid": ids[0] if ids else None,
                     "top_title": hs[0]["title"] if hs else None, "top_score": hs[0]["score"] if hs else None})
    per = pd.DataFrame(recs)
    r = per["rank"]
    per = per.assign(hit1=r.eq(1), hit5=r.le(5), rr=(1.0 / r).fillna(0.0), uhit1=per["uid_rank"].eq(1), ceil=1.0 / per["twins"])
    summary = (per.groupby("variant", sort=False)
               .agg(n=("uid", "size"), **{"recall@1": ("hit1", "mean"), "recall@5": ("hit5", "mean"), "mrr": ("rr", "mean"),
                                          "uid_recall@1": ("uhit1", "mean"), "uid_ceiling@1": ("ceil", "mean")})
               .round(4).reset_index())
    return summary, per.drop(columns=["hit1", "hit5", "rr", "uhit1", "ceil"])


def heldout_rows(cfg: RagConfig, store: Store) -> list[dict[str, str]]:
    """The held-out products asked in the evaluation: eval_splits, those in the store, at most eval_n (seeded)."""
    rows = [r for batch in iter_catalogue(cfg.data_dir, cfg.eval_splits) for r in batch]
    present: set[str] = set()
    for s in range(0, len(rows), 5000):
        got = store.collection.get(where={"uid": {"$in": [r["uid"] for r in rows[s : s + 5000]]}}, include=["metadatas"])
        present.update(m["uid"] for m in got["metadatas"])
    missing = len(rows) - len(present)
    if missing:
        log.warning("rag eval: %d of %d held-out products are not in the store (n cap?); they are not asked", missing, len(rows))
    rows = [r for r in rows if r["uid"] in present]
    if cfg.eval_n is not None and len(rows) > cfg.eval_n:
        rows = random.Random(cfg.seed).sample(rows, cfg.eval_n)
    # How many stored products share each asked title (a title query cannot tell them apart).
    import pyarrow.parquet as pq

    counts = dict.fromkeys((_title_key(r["title"]) for r in rows), 0)
    left = cfg.n if cfg.n is not None else math.inf
    for split in store_order(cfg):
        for batch in pq.ParquetFile(Path(cfg.data_dir) / f"{split}.parquet").iter_batches(batch_size=65536, columns=["title"]):
            for t in batch.column(0).to_pylist()[: int(min(left, batch.num_rows))]:
                key = _title_key(t)
                if key in counts:
                    counts[key] += 1
            left -= batch.num_rows
            if left <= 0:
                break
    return [{**r, "twins": max(1, counts[_title_key(r["title"])])} for r in rows]


def run_eval(cfg: RagConfig, store: Store | None = None) -> dict[str, Any]:
    """Evaluate retrieval on held-out titles and write `retrieval.json`, `retrieval.csv`, `retrieval_queries.csv`.

    Reuses `retrieval.json` when the store, the asked products and the settings are unchanged (unless
    `cfg.force` or `cfg.rebuild`).
    """
    store = store or open_store(cfg)
    rows = heldout_rows(cfg, store)
    if not rows:
        raise StoreError(f"{store.where}: no held-out products ({cfg.eval_splits}) are in the store: nothing to evaluate")
    key = hashlib.blake2b(repr((sorted(store.info.items()), store.count(), cfg.eval_k, cfg.seed, VARIANTS,
                                sorted(r["uid"] for r in rows))).encode(), digest_size=8).hexdigest()
    out = Path(cfg.out_dir)
    path = out / "retrieval.json"
    if path.is_file() and not (cfg.force or cfg.rebuild):
        old = read_json(path)
        if old.get("key") == key:
            log.info("rag eval: unchanged, reusing %s", path)
            return old
    t0 = time.perf_counter()
    summary, per = evaluate_retrieval(store, rows, k=cfg.eval_k, seed=cfg.seed, progress=cfg.progress)
    result = {
        "key": key, "where": store.where, "embedder": store.info.get("embedder"), "embed": store.info.get("embed"),
        "n_docs": store.count(), "n_products": len(rows), "eval_splits": cfg.eval_splits, "k": cfg.eval_k, "seed": cfg.seed,
        "seconds": round(time.perf_counter() - t0, 2),
        "variants": {r.pop("variant"): r for r in summary.to_dict("records")},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "retrieval.csv", summary.to_csv(index=False))
    write_text(out / "retrieval_queries.csv", per.to_csv(index=False))
    write_json(path, result)
    log.info("rag eval: %d products x %d variants in %.1fs; wrote %s", len(rows), len(VARIANTS), result["seconds"], out)
    return result


def retrieval_table(result: dict[str, Any]) -> Any:
    """One row per query variant, from `run_eval`'s result or from `run`'s metrics (`<variant>_<metric>` keys)."""
    import pandas as pd

    if "variants" in result:
        return pd.DataFrame([{"variant": v, **m} for v, m in result["variants"].items()])
    rows = [{"variant": v, **{k[len(v) + 1 :]: x for k, x in result.items() if k.startswith(f"{v}_")}} for v in VARIANTS]
    return pd.DataFrame([r for r in rows if len(r) > 1])
