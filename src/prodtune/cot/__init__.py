"""Stage 02: the chain-of-thought dataset (shopper question, reasoning, answer) grounded in each product.

    prodtune cot --backend template --data_dir data/cpu/prepared --out_dir data/cpu/cot
    prodtune cot --backend local --n 5 --out_dir data/cpu/cot_local
    OPENAI_API_KEY=... prodtune cot --backend openai --model gpt-4o-mini --n 2000 --concurrency 16
    prodtune cot --backend openai --base_url http://localhost:11434/v1 --model qwen2.5:7b   # Ollama, no key

`run(cfg)` reads stage 01's splits from `cfg.data_dir`, asks a backend for one JSON row per product, passes each
answer through the quality gates (lengths, no looping text, numbers that are in the source, token overlap with the
source, no copy of the whole description, no near-duplicate question), counts every decision, and writes under
`cfg.out_dir`: `cot.jsonl` (append-only, keyed by uid, so a killed run resumes without duplicates or lost rows),
`rejects.jsonl`, `cot.parquet`, `{train,validation,test}.parquet` (a row's split is its product's split in
stage 01), `stats.json`, `run.json` and a dataset card `README.md` (loadable with `datasets.load_dataset(out_dir)`);
with `push_to_hub: user/name` it then uploads the dataset.

One job per module:

| module | job |
|---|---|
| `config` | `CoTConfig`, `pick_backend`, the answer model `CoTAnswer`, its JSON schema and its parser |
| `products` | stage 01's products in a seeded order, each with its question style |
| `gates` | the quality gates and their text helpers |
| `backends` | the `Backend` interface and `make_backend` |
| `template`, `local`, `openai_backend` | the three backends |
| `store` | the resumable store, Parquet outputs, dataset card, Hub upload, loaders for notebooks |
| `stage` | `run`: the stage end to end, and its stats |
"""

from __future__ import annotations

from prodtune.cot.backends import Backend, GenResult, make_backend
from prodtune.cot.config import (
    ANSWER_ERRORS,
    BACKENDS,
    DEFAULT_MODELS,
    FIELDS,
    GATE_LABELS,
    GATES,
    ROW_COLUMNS,
    SPLIT_COLUMNS,
    SPLITS,
    CoTAnswer,
    CoTConfig,
    Config,
    answer_schema,
    parse_answer,
    pick_backend,
    response_format,
)
from prodtune.cot.gates import Gates, QuestionIndex, copy_ratio, distinct_ratio, numbers_in, overlap, sentences, shingles
from prodtune.cot.products import Item, load_products, short_name, stable_hash, style_for
from prodtune.cot.stage import funnel, run, summarize
from prodtune.cot.store import CoTStore, dataset_card, load_rejects, load_rows, push_to_hub, read_jsonl, write_outputs
from prodtune.cot.template import TemplateBackend, template_answer

__all__ = [
    "ANSWER_ERRORS", "BACKENDS", "DEFAULT_MODELS", "FIELDS", "GATE_LABELS", "GATES", "ROW_COLUMNS", "SPLIT_COLUMNS",
    "SPLITS", "Backend", "CoTAnswer", "CoTConfig", "CoTStore", "Config", "Gates", "GenResult", "Item", "QuestionIndex",
    "TemplateBackend", "answer_schema", "copy_ratio", "dataset_card", "distinct_ratio", "funnel", "load_products",
    "load_rejects", "load_rows", "make_backend", "numbers_in", "overlap", "parse_answer", "pick_backend", "push_to_hub",
    "read_jsonl", "response_format", "run", "sentences", "shingles", "short_name", "stable_hash", "style_for", "summarize",
    "template_answer", "write_outputs",
]
