"""The product store: embeddings, the Chroma client, and building the store through LangChain's indexing API.

    python -c "from prodtune.rag import RagConfig, build_store; print(build_store(RagConfig(data_dir='data/cpu/prepared', persist_dir='/tmp/chroma')))"

A Chroma collection `products` in a `PersistentClient` folder (or on a `chroma run` server through `HttpClient`),
cosine space set in the collection configuration. One record per product: its document is the *embedded text*
(the title, or title + the start of the description; a choice recorded in the collection metadata with the
embedder), its metadata holds uid, title, split and the description (`content`, what goes into a RAG prompt).

Building is `langchain_core.indexing.index` with a persistent record manager (`records.SQLiteRecordManager`): a
record's key is its uid plus a hash of its text and metadata, so a rerun on the same catalogue embeds and writes
nothing, a changed product is written again and its old version deleted, and with `prune` products gone from the
catalogue (or past `n`) are deleted (`cleanup="full"`; without prune, `"incremental"` by uid). The records live in
a namespace named after the collection's id: a rebuilt collection never inherits the records of a deleted one, and
records that disagree with the collection (a lost file) are re-read from the collection before indexing.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings

from prodtune.io import log
from prodtune.models import EMBEDDED_EMBEDDER, resolve_model_id
from prodtune.rag.config import COLLECTION, EMBED_MODES, STORE_FORMAT, RagConfig, StoreError
from prodtune.rag.records import SQLiteRecordManager

# ----------------------------------------------------------------------------------------------
# Embeddings and client
# ----------------------------------------------------------------------------------------------


def default_device() -> str:
    """`cuda` when torch sees a GPU, else `cpu`."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def make_embeddings(name: str = EMBEDDED_EMBEDDER, device: str | None = None, batch_size: int = 64, lazy: bool = False) -> Embeddings:
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


class LazyEmbeddings(Embeddings):
    """LangChain Embeddings that load the sentence-transformers model on first use."""

    def __init__(self, name: str, device: str | None = None, batch_size: int = 64):
        self.name, self.device, self.batch_size = name, device, batch_size
        self.loaded: Embeddings | None = None

    @property
    def inner(self) -> Any:
        """The loaded `HuggingFaceEmbeddings`."""
        if self.loaded is None:
            self.loaded = make_embeddings(self.name, self.device, self.batch_size)
        return self.loaded

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
        raise StoreError("make_client: give persist_dir (a folder) or host (a Chroma server)")
    Path(persist_dir).mkdir(parents=True, exist_ok=True)
    return chromadb.PersistentClient(path=str(persist_dir), settings=settings)


# ----------------------------------------------------------------------------------------------
# Opening the store
# ----------------------------------------------------------------------------------------------


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


def describe_location(persist_dir: Any, host: str | None, port: int) -> str:
    """Where a store is, in words: the folder, or `chroma server host:port`."""
    return f"chroma server {host}:{port}" if host else f"{persist_dir}"


def _space(collection: Any) -> str | None:
    conf = collection.configuration or {}
    return ((conf.get("hnsw") or {}).get("space")) or ((conf.get("spann") or {}).get("space"))


def _retry_locked(fn: Any, *args: Any, **kw: Any) -> Any:
    # Chroma's local SQLite can answer "database is locked" right after a write from another connection of its
    # pool; the write goes through a moment later.
    from tenacity import retry, retry_if_exception_message, stop_after_attempt, wait_exponential

    return retry(retry=retry_if_exception_message(match=".*locked.*"), stop=stop_after_attempt(5),
                 wait=wait_exponential(multiplier=0.2), reraise=True)(fn)(*args, **kw)


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
            missing, and check that an existing one was built with the same embedder, embedded text and format.
        embeddings: a ready LangChain Embeddings object (skips loading the model again).

    Raises:
        StoreError: no store or collection there (when not creating), or settings differ from the existing store's.
    """
    from chromadb.errors import NotFoundError
    from langchain_chroma import Chroma

    if isinstance(persist, RagConfig):
        cfg = persist
        persist, host, port, collection = cfg.persist_dir, cfg.host, cfg.port, cfg.collection
        device, embed_batch = device or cfg.device, cfg.embed_batch
    where = describe_location(persist, host, port)
    if not host and persist is not None and create is None and not Path(persist).is_dir():
        raise StoreError(f"{persist}: no Chroma store there; build it first (prodtune rag --rag.persist_dir={persist})")
    client = make_client(persist, host, port)
    if create is None:
        try:
            col = client.get_collection(collection)
        except NotFoundError as e:
            raise StoreError(f"{where}: no collection {collection!r}; build it first (prodtune rag)") from e
    else:
        col = _create_or_check(client, collection, create, where)
    if _space(col) != "cosine":
        raise StoreError(f"{where}: collection {collection!r} uses the {_space(col)!r} space, not cosine; rebuild it")
    info = dict(col.metadata or {})
    if "embedder" not in info:
        raise StoreError(f"{where}: collection {collection!r} has no prodtune metadata (embedder); rebuild it")
    if info.get("format") != STORE_FORMAT:
        raise StoreError(f"{where}: collection {collection!r} has the record format {info.get('format')!r}, this code "
                         f"reads {STORE_FORMAT!r}; rebuild it (prodtune rag --rag.rebuild=true)")
    if embeddings is None:
        embeddings = make_embeddings(info["embedder"], device, embed_batch, lazy=True)
    vs = Chroma(client=client, collection_name=collection, embedding_function=embeddings, create_collection_if_not_exists=False)
    return Store(client=client, collection=col, embeddings=embeddings, vectorstore=vs, where=where, info=info)


def _create_or_check(client: Any, collection: str, create: dict[str, Any], where: str) -> Any:
    hnsw = {"space": "cosine", **(create.get("hnsw") or {})}
    meta = {"format": STORE_FORMAT, "embedder": create["embedder"], "embed": create["embed"],
            "content_chars": int(create["content_chars"])}
    col = client.get_or_create_collection(collection, configuration={"hnsw": hnsw}, metadata=meta)
    old = col.metadata or {}
    # Chroma keeps an existing collection's settings silently: check them instead of trusting them.
    diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v and not (k == "content_chars" and meta["embed"] == "title")}
    if diff:
        raise StoreError(f"{where}: collection {collection!r} was built with other settings {diff} (stored, asked); "
                         "use another persist folder or rebuild it (prodtune rag --rag.rebuild=true)")
    have = (col.configuration or {}).get("hnsw") or {}
    if "ef_search" in hnsw and have.get("ef_search") != hnsw["ef_search"]:
        # The one HNSW knob Chroma lets change; it is read when the index is loaded, so it counts from the next
        # process that opens the store (one that already queried it keeps the old value).
        _retry_locked(col.modify, configuration={"hnsw": {"ef_search": hnsw["ef_search"]}})
    fixed = {k: (have.get(k), hnsw[k]) for k in ("ef_construction", "max_neighbors") if k in hnsw and have.get(k) != hnsw[k]}
    if fixed:
        log.warning("rag: %s keeps its HNSW %s (stored, asked); rebuild to change them", where, fixed)
    return col


# ----------------------------------------------------------------------------------------------
# The catalogue as LangChain documents
# ----------------------------------------------------------------------------------------------


def embed_text(title: str, content: str, mode: str = "title", content_chars: int = 200) -> str:
    """The text whose embedding represents a product: its title, or its title and the start of its description."""
    if mode == "title":
        return title
    if mode == "title+content":
        return f"{title}. {content[:content_chars]}"
    raise ValueError(f"embed mode must be one of {EMBED_MODES}, not {mode!r}")


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


def store_order(cfg: RagConfig) -> list[str]:
    """Splits in the order they are stored: with a cap `n`, the held-out ones first (evaluation asks for them)."""
    if cfg.n is None:
        return list(cfg.splits)
    return [s for s in cfg.eval_splits if s in cfg.splits] + [s for s in cfg.splits if s not in cfg.eval_splits]


def catalogue_documents(cfg: RagConfig, seen: dict[str, str]) -> Iterator[Any]:
    """The catalogue as LangChain Documents (embedded text; uid, title, split, content); fills `seen` uid -> split.

    Raises:
        ValueError: a uid appears twice in the catalogue (the message names both files).
    """
    from langchain_core.documents import Document

    for rows in iter_catalogue(cfg.data_dir, store_order(cfg), cfg.n):
        for r in rows:
            if r["uid"] in seen:
                raise ValueError(f"{Path(cfg.data_dir) / r['split']}.parquet: uid {r['uid']!r} is already in "
                                 f"{seen[r['uid']]}.parquet (or twice in this file); uids must be unique in the catalogue")
            seen[r["uid"]] = r["split"]
            yield Document(page_content=embed_text(r["title"], r["content"], cfg.embed, cfg.content_chars),
                           metadata={"uid": r["uid"], "title": r["title"], "split": r["split"], "content": r["content"]})


def record_key(doc: Any) -> str:
    """A stored record's id: the product uid and a hash of what is stored, so any change gives a new key."""
    payload = json.dumps([doc.page_content, doc.metadata], sort_keys=True, ensure_ascii=False)
    return f"{doc.metadata['uid']}:{hashlib.blake2b(payload.encode(), digest_size=12).hexdigest()}"


def catalogue_rows(cfg: RagConfig) -> int:
    """Products that the build reads (all stored splits, at most `n`)."""
    import pyarrow.parquet as pq

    total = 0
    for s in cfg.splits:
        p = Path(cfg.data_dir) / f"{s}.parquet"
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing; run stage 01 (prodtune prepare) first")
        total += pq.ParquetFile(p).metadata.num_rows
    return total if cfg.n is None else min(total, cfg.n)


# ----------------------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------------------


def records_path(cfg: RagConfig) -> Path:
    """The record manager's SQLite file: `records_db`, else beside the store (a server store: in out_dir)."""
    if cfg.records_db:
        return Path(cfg.records_db)
    return Path(cfg.out_dir if cfg.host else cfg.persist_dir) / "index_records.sqlite3"


def open_records(cfg: RagConfig, store: Store, batch: int) -> SQLiteRecordManager:
    """The record manager of this collection; its records are re-read from the collection when the counts differ."""
    prefix = f"chroma/{cfg.collection}/"
    rm = SQLiteRecordManager(f"{prefix}{store.collection.id}", records_path(cfg))
    rm.clear_others(prefix)  # records of deleted collections of this name (rebuilds) can never match again
    stored = store.count()
    if rm.count() != stored:  # a lost or foreign records file, or a build stopped between its two writes
        log.warning("rag: %s holds %d records of the collection, which holds %d; reading them from the collection",
                    rm.path, rm.count(), stored)
        rm.clear()
        for offset in range(0, stored, batch):
            got = store.collection.get(include=["metadatas"], limit=batch, offset=offset)
            rm.update(got["ids"], group_ids=[(m or {}).get("uid") for m in got["metadatas"]])
    return rm


def build_store(cfg: RagConfig, embeddings: Any = None) -> dict[str, Any]:
    """Create or update the store from the prepared splits with `langchain_core.indexing.index`.

    Unchanged products are neither embedded nor written (their record key is already recorded), so a second build
    is cheap and adding products embeds only the new ones. Writes and deletes go in batches within the client's
    maximum. `cfg.force` embeds and writes everything again; `cfg.rebuild` deletes the collection first.

    Args:
        cfg: stage settings.
        embeddings: a ready LangChain Embeddings object (else loaded lazily from cfg.embedder).

    Returns:
        Build stats: n_docs (in the store), catalogue (rows read), added (new products), updated (products whose
        text or metadata changed), unchanged, removed, reembedded (unchanged but forced), batch_size,
        max_batch_size, records (the record manager's file), seconds.

    Raises:
        StoreError: the existing store was built with other settings (and rebuild is False).
        ValueError: a uid appears twice in the catalogue.
    """
    from langchain_core.indexing import index
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    where = describe_location(cfg.persist_dir, cfg.host, cfg.port)
    if cfg.rebuild:
        from chromadb.errors import NotFoundError

        try:
            make_client(cfg.persist_dir, cfg.host, cfg.port).delete_collection(cfg.collection)
            log.info("rag: deleted collection %r in %s (rebuild)", cfg.collection, where)
        except NotFoundError:
            pass
    create = {"embedder": cfg.embedder, "embed": cfg.embed, "content_chars": cfg.content_chars,
              "hnsw": {"ef_search": cfg.ef_search, "ef_construction": cfg.ef_construction, "max_neighbors": cfg.max_neighbors}}
    embeddings = embeddings or make_embeddings(cfg.embedder, cfg.device, cfg.embed_batch, lazy=True)
    store = open_store(cfg, create=create, embeddings=embeddings)
    max_batch = store.client.get_max_batch_size()
    batch = min(cfg.upsert_batch or max_batch, max_batch)
    if cfg.upsert_batch and cfg.upsert_batch > max_batch:
        log.warning("rag: upsert_batch %d is above the client's maximum %d; using %d", cfg.upsert_batch, max_batch, max_batch)
    rm = open_records(cfg, store, batch)
    before = rm.groups()
    seen: dict[str, str] = {}
    docs = tqdm(catalogue_documents(cfg, seen), total=catalogue_rows(cfg), unit="doc", desc=f"rag build ({cfg.embed})",
                disable=not cfg.progress, mininterval=1)
    try:
        # full: whatever this run did not see goes (gone products, products past n, old versions of changed ones);
        # incremental: only old versions of the products seen.
        res = index(docs, rm, store.vectorstore, batch_size=batch, cleanup="full" if cfg.prune else "incremental",
                    source_id_key="uid", cleanup_batch_size=batch, force_update=cfg.force, key_encoder=record_key)
        after = rm.groups()
    finally:
        docs.close()
        rm.close()
    added = len(after - before)
    stats = {
        "where": store.where, "collection": cfg.collection, "embedder": cfg.embedder, "embed": cfg.embed,
        "n_docs": store.count(), "catalogue": len(seen), "added": added, "updated": res["num_added"] - added,
        "unchanged": res["num_skipped"], "removed": len(before - after), "reembedded": res["num_updated"],
        "batch_size": batch, "max_batch_size": max_batch, "records": str(rm.path), "seconds": round(time.perf_counter() - t0, 2),
    }
    if res["num_added"] or res["num_updated"] or res["num_deleted"]:
        # A new revision tells cached evaluations that the store changed (counts alone can stay equal).
        rev = hashlib.blake2b(f"{time.time_ns()}:{res}".encode(), digest_size=6).hexdigest()
        _retry_locked(store.collection.modify, metadata={**(store.collection.metadata or {}), "revision": rev})
    log.info("rag build: %d docs in %s (+%d new, %d updated, %d unchanged, %d removed) in %.1fs",
             stats["n_docs"], store.where, stats["added"], stats["updated"], stats["unchanged"], stats["removed"], stats["seconds"])
    return stats
