"""Retrieval by product title, and the RAG prompt and chain built on it (stage 06 uses these).

    python -c "from prodtune.rag import open_store, retrieve_context as r; print(r(open_store('models/cpu/chroma'), 'Opaline yoga mat teal'))"

`retrieve_context(store, title, k, exclude_uids=[uid])` drops the product itself (a test product is never its own
context); `rag_prompt(title, hits)` is the Llama track's Alpaca RAG prompt (`prodtune.prompts.alpaca_rag_prompt`);
`make_rag_chain(store, llm)` chains both with an LLM in LCEL. `search_many` is the batched form used to evaluate;
`nearest_products` finds the training split's neighbours in memory for retrieval-augmented fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prodtune.rag.config import StoreError
from prodtune.rag.store import EMBEDDED_EMBEDDER, Store, make_embeddings


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
        raise StoreError(f"{store.where}: the store holds no products; build it first (prodtune rag)")
    hits = []
    for doc, dist in pairs:
        uid = doc.metadata.get("uid", doc.id)
        if uid in excl:
            continue
        hits.append({"uid": uid, "title": doc.metadata.get("title", ""), "content": doc.metadata.get("content", ""),
                     "score": round(1.0 - float(dist), 6), "split": doc.metadata.get("split")})
    return _break_ties(hits)[:k]


def nearest_products(
    titles: Sequence[str], uids: Sequence[str], catalogue: Any, *, k: int, embedder: str = EMBEDDED_EMBEDDER,
    embeddings: Any = None, batch_size: int = 64,
) -> list[list[dict[str, Any]]]:
    """For each title, the `k` catalogue products nearest by title, never one with the asking row's uid.

    The in-memory twin of `retrieve_context` for training prompts (stage 03 runs before stage 05 builds the store):
    the same embedder, the same title text, cosine scores, ties to the smaller uid. Exact search, so it suits the
    training split (thousands of rows), not the whole dump.

    Args:
        titles: the asking products' titles.
        uids: their uids (each row's own product is never returned).
        catalogue: a DataFrame (or list of dicts) with uid, title, content: what may be retrieved.
        k: hits per title (0: none).
        embedder: sentence-transformers model (`rag.make_embeddings`), unless `embeddings` is given.
        embeddings: a LangChain `Embeddings` to reuse.
        batch_size: texts per embedding call.

    Returns:
        One list per title of `{uid, title, content, score}`, best first.
    """
    import numpy as np
    import pandas as pd

    cat = catalogue.reset_index(drop=True) if isinstance(catalogue, pd.DataFrame) else pd.DataFrame(list(catalogue))
    if len(titles) != len(uids):
        raise ValueError(f"{len(titles)} titles but {len(uids)} uids")
    if k <= 0 or not len(titles) or not len(cat):
        return [[] for _ in titles]
    emb = embeddings or make_embeddings(embedder, batch_size=batch_size)
    q = np.asarray(emb.embed_documents([normalize_query(t) for t in titles]), dtype=np.float32)
    c = np.asarray(emb.embed_documents([normalize_query(t) for t in cat["title"]]), dtype=np.float32)
    sims = q @ c.T
    cat_uids = cat["uid"].astype(str).tolist()
    out = []
    for i, u in enumerate(uids):
        row = sims[i]
        order = np.argsort(-row, kind="stable")[: k + TIE_MARGIN + 1]
        hits = [{"uid": cat_uids[j], "title": cat["title"].iat[j], "content": cat["content"].iat[j],
                 "score": round(float(row[j]), 6)} for j in order if cat_uids[j] != str(u)]
        out.append(_break_ties(hits)[:k])
    return out


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


def _embed_queries(embeddings: Any, texts: list[str]) -> list[list[float]]:
    # Batched like documents when the model has no query-specific prompt (MiniLM); else one embed_query each.
    if getattr(embeddings, "query_encode_kwargs", None) == {} and hasattr(embeddings, "embed_documents"):
        return embeddings.embed_documents(texts)
    return [embeddings.embed_query(t) for t in texts]


def search_many(store: Store, queries: list[str], k: int = 10, batch: int = 256, progress: bool = False) -> list[list[dict[str, Any]]]:
    """Top-k hits (`uid`, `title`, `score`) for many queries: batched embedding and batched Chroma queries."""
    from tqdm.auto import tqdm

    if store.count() == 0:
        raise StoreError(f"{store.where}: the store holds no products; build it first (prodtune rag)")
    queries = [normalize_query(q) for q in queries]
    out: list[list[dict[str, Any]]] = []
    for s in tqdm(range(0, len(queries), batch), desc="rag queries", disable=not progress):
        vecs = _embed_queries(store.embeddings, queries[s : s + batch])
        res = store.collection.query(query_embeddings=vecs, n_results=k + TIE_MARGIN, include=["metadatas", "distances"])
        for ids, metas, dists in zip(res["ids"], res["metadatas"], res["distances"]):
            hits = [{"uid": (m or {}).get("uid", i), "title": (m or {}).get("title", ""), "score": round(1.0 - float(d), 6)}
                    for i, m, d in zip(ids, metas, dists)]
            out.append(_break_ties(hits)[:k])
    return out
