"""Stage 05 as one call: build (or update) the Chroma store, evaluate retrieval, return the metrics.

    prodtune rag --profile cpu                       # the CLI builds RagConfig from the profile's rag: section
    python -c "from prodtune.rag import RagConfig, run; print(run(RagConfig(data_dir='data/cpu/prepared', persist_dir='models/cpu/chroma', out_dir='outputs/cpu/rag')))"
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prodtune.io import write_json
from prodtune.rag.config import RagConfig
from prodtune.rag.evaluate import run_eval
from prodtune.rag.store import build_store, make_embeddings, open_store


def run(cfg: RagConfig) -> dict[str, Any]:
    """Stage 05: build or update the store from `cfg.data_dir`, evaluate retrieval, write `<out_dir>/build.json`.

    Unchanged products are not embedded again and an unchanged evaluation is reused, so a rerun is quick.

    Args:
        cfg: stage settings (paths inside: data_dir, persist_dir or host, out_dir; force, rebuild).

    Returns:
        `{n_docs, added, updated, unchanged, removed, build_seconds, embed, embedder, eval_products,
        "<variant>_recall@1", "<variant>_recall@5", "<variant>_mrr", "<variant>_uid_recall@1", ...}`.
    """
    embeddings = make_embeddings(cfg.embedder, cfg.device, cfg.embed_batch, lazy=True)
    stats = build_store(cfg, embeddings=embeddings)
    write_json(Path(cfg.out_dir) / "build.json", stats)
    ev = run_eval(cfg, open_store(cfg, embeddings=embeddings))
    metrics: dict[str, Any] = {k: stats[k] for k in ("n_docs", "added", "updated", "unchanged", "removed", "embed", "embedder")}
    metrics["build_seconds"] = stats["seconds"]
    for v, m in ev["variants"].items():
        for name, value in m.items():
            if name != "n":
                metrics[f"{v}_{name}"] = value
    metrics["eval_products"] = ev["n_products"]
    return metrics
