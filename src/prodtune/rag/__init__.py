"""Stage 05: a Chroma store of the catalogue (through LangChain), retrieval by product title, and the RAG chain.

    prodtune rag --profile cpu                                      # build + evaluate (run)
    prodtune rag --profile cpu --rag.embed=title+content --rag.rebuild=true

One job per module: `config` (RagConfig, StoreError), `records` (the persistent LangChain record manager),
`store` (embeddings, client, building through `langchain_core.indexing.index`), `retrieve` (retrieval, prompt,
chain), `evaluate` (query variants, retrieval evaluation), `stage` (`run`). Figures: benchmarks/README.md, RAG.
"""

from prodtune.rag.config import COLLECTION, EMBED_MODES, STORE_FORMAT, VARIANTS, RagConfig, StoreError
from prodtune.rag.evaluate import (
    evaluate_retrieval,
    heldout_rows,
    make_queries,
    paraphrase_title,
    retrieval_table,
    run_eval,
    truncate_title,
    typo_title,
)
from prodtune.rag.records import SQLiteRecordManager
from prodtune.rag.retrieve import (
    make_rag_chain, make_retriever, nearest_products, normalize_query, rag_prompt, retrieve_context, search_many,
)
from prodtune.rag.stage import run
from prodtune.rag.store import (
    LazyEmbeddings,
    Store,
    build_store,
    embed_text,
    iter_catalogue,
    make_client,
    make_embeddings,
    open_store,
    record_key,
    records_path,
)

Config = RagConfig

__all__ = [
    "COLLECTION", "EMBED_MODES", "STORE_FORMAT", "VARIANTS", "Config", "LazyEmbeddings", "RagConfig", "SQLiteRecordManager",
    "Store", "StoreError", "build_store", "embed_text", "evaluate_retrieval", "heldout_rows", "iter_catalogue",
    "make_client", "make_embeddings", "make_queries", "make_rag_chain", "make_retriever", "nearest_products", "normalize_query",
    "open_store", "paraphrase_title", "rag_prompt", "record_key", "records_path", "retrieval_table", "retrieve_context",
    "run", "run_eval", "search_many", "truncate_title", "typo_title",
]
