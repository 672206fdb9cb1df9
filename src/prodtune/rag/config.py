"""Settings of stage 05 (`RagConfig`), its names (collection, embedded-text modes, query variants) and `StoreError`.

    python -c "from prodtune.rag import RagConfig; print(RagConfig())"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from prodtune.config import ConfigError
from prodtune.io import UserError
from prodtune.models import EMBEDDED_EMBEDDER

COLLECTION = "products"
EMBED_MODES = ("title", "title+content")
VARIANTS = ("exact", "typo", "truncated", "paraphrase")
SPLITS = ("train", "validation", "test")
# Bump when the record layout changes: a store of another format is refused ("rebuild it"), never half-read.
# 2: the embedded text is the Chroma document, the description is metadata `content`, ids are uid-content keys
# written through langchain_core.indexing.index.
STORE_FORMAT = "prodtune-rag/2"


class StoreError(UserError, ValueError):
    """The Chroma store is missing, empty, or was built with other settings than asked for."""


@dataclass
class RagConfig:
    """Settings of stage 05. Defaults: the embedded MiniLM, title embeddings, a local persistent store."""

    SECTION: ClassVar[str] = "rag"

    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "stage 01 output (train/validation/test.parquet)"})
    persist_dir: str = field(default="{models_dir}/chroma", metadata={"help": "Chroma PersistentClient folder"})
    out_dir: str = field(default="{outputs_dir}/rag", metadata={"help": "build.json and the retrieval tables"})
    records_db: str | None = field(
        default=None,
        metadata={"help": "SQLite file of the indexing records (what is stored, by content key); "
                          "null: <persist_dir>/index_records.sqlite3, or <out_dir>/index_records.sqlite3 with host"})
    collection: str = field(default=COLLECTION, metadata={"help": "Chroma collection name"})
    embedder: str = field(default=EMBEDDED_EMBEDDER, metadata={"help": "sentence-transformers name/folder or embedded:*"})
    embed: str = field(default="title", metadata={"help": "what is embedded: title | title+content"})
    content_chars: int = field(default=200, metadata={"help": "description characters embedded with embed=title+content"})
    splits: list[str] = field(default_factory=lambda: list(SPLITS), metadata={"help": "splits stored"})
    n: int | None = field(default=None, metadata={"help": "store at most N products (held-out splits first); null: all"})
    upsert_batch: int | None = field(default=None, metadata={"help": "records per write; null: the client's maximum"})
    embed_batch: int = field(default=64, metadata={"help": "texts per embedding forward pass"})
    device: str | None = field(default=None, metadata={"help": "embedding device; null: cuda if available, else cpu"})
    host: str | None = field(default=None, metadata={"help": "Chroma server host (HttpClient); null: local folder"})
    port: int = field(default=8000, metadata={"help": "Chroma server port"})
    ef_search: int = field(default=100, metadata={"help": "HNSW ef at query time (recall vs latency; see benchmarks/README.md)"})
    ef_construction: int = field(default=100, metadata={"help": "HNSW ef while building"})
    max_neighbors: int = field(default=16, metadata={"help": "HNSW M (links per node)"})
    eval_splits: list[str] = field(default_factory=lambda: ["validation", "test"], metadata={"help": "held-out titles asked"})
    eval_n: int | None = field(default=2000, metadata={"help": "ask at most N held-out products (seeded); null: all"})
    eval_k: int = field(default=10, metadata={"help": "hits fetched per evaluation query (MRR@k)"})
    seed: int = field(default=3407, metadata={"help": "seed of the typo rules and of the evaluation sample"})
    prune: bool = field(default=True, metadata={"help": "delete stored products no longer in the catalogue (or past n)"})
    force: bool = field(default=False, metadata={"help": "embed and write every product again, and evaluate again"})
    rebuild: bool = field(default=False, metadata={"help": "delete the collection first (to change embedder or embed)"})
    progress: bool = field(default=True, metadata={"help": "show progress bars"})

    def __post_init__(self) -> None:
        if self.embed not in EMBED_MODES:
            raise ConfigError(f"RagConfig.embed must be one of {EMBED_MODES}, not {self.embed!r}")
        for name in ("content_chars", "embed_batch", "ef_search", "ef_construction", "max_neighbors", "port"):
            if getattr(self, name) < 1:
                raise ConfigError(f"RagConfig.{name} must be >= 1, not {getattr(self, name)}")
        if self.eval_k < 5:
            raise ConfigError(f"RagConfig.eval_k must be >= 5 (recall@5 is reported), not {self.eval_k}")
        for name in ("n", "upsert_batch", "eval_n"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"RagConfig.{name} must be a positive number or null, not {v}")
        for name in ("splits", "eval_splits"):
            bad = [s for s in getattr(self, name) if s not in SPLITS]
            if bad or not getattr(self, name):
                raise ConfigError(f"RagConfig.{name}: unknown or no split(s) {bad}; use a list of {', '.join(SPLITS)}")
