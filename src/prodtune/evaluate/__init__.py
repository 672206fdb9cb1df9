"""Stage 06: compare base, fine-tuned, RAG and reasoning models on the held-out test split, with CIs.

    prodtune evaluate --profile cpu          # reads models/cpu/{llama,deepseek,study,chroma}, writes outputs/cpu/

Systems (each generated greedily on the same test products, generations cached and resumable):

| system | model | prompt | task |
| --- | --- | --- | --- |
| base | base model | Alpaca(title) | description |
| base+rag | base model | Alpaca(title + retrieved descriptions) | description |
| llama-ft | Llama-track adapter | Alpaca(title) | description |
| llama-ft+rag | Llama-track adapter | Alpaca(title + retrieved descriptions) | description |
| study-recipe | adapter of the study's recipe (regex-stripped text, loss on the whole text), same budget | Alpaca(title) | description |
| deepseek-ft | DeepSeek-track adapter | R1(question asking for the description) | description |
| base-r1 / deepseek-ft-cot | base / DeepSeek-track adapter | R1(CoT test question) | sales answer |

Metrics per row: ROUGE-L, chrF, MiniLM cosine to the reference, a hallucination proxy (numbers and brand-like
words absent from title + context), repetition, empty and endless answers, `<think>` adherence (R1 prompts),
latency and tokens/s. Paired bootstrap 95% CIs for the differences that answer the study's questions.
Retrieval for RAG never returns the product being described (its uid is excluded), so RAG cannot copy the answer.

Modules: `score` (per-row metrics, summaries, comparisons), `generate` (cached generation, `generate_and_score`, the pooled jobs of stage 06,
the notebooks' `before_after`), `report` (tables, loss figure, report.md/html), `stage` (`EvalConfig`, `run`).
"""

from prodtune.evaluate.generate import (
    DEEPSEEK_DESCRIBE_QUESTION,
    Job,
    before_after,
    before_after_table,
    build_inputs,
    cache_key,
    cached_generate,
    decoding_of,
    generate_and_score,
    plan_job,
    rag_settings,
    read_cache,
    read_run_card,
    run_jobs,
    score_job,
)
from prodtune.evaluate.report import (
    comparisons_table,
    examples_table,
    loss_figure,
    loss_histories,
    metrics_table,
    read_metrics,
    render_report,
    write_report,
)
from prodtune.evaluate.score import (
    COMPARISONS,
    DESCRIPTION_METRICS,
    HEADLINE,
    answer_of,
    compare,
    is_finite_metrics,
    score_rows,
    summarize,
    summarize_frame,
)
from prodtune.evaluate.stage import SYSTEMS, Config, EvalConfig, run

__all__ = [
    "COMPARISONS", "DEEPSEEK_DESCRIBE_QUESTION", "Job", "DESCRIPTION_METRICS", "HEADLINE", "SYSTEMS", "Config", "EvalConfig",
    "answer_of", "before_after", "before_after_table", "build_inputs", "cache_key", "cached_generate", "compare",
    "comparisons_table", "decoding_of", "examples_table", "generate_and_score", "is_finite_metrics", "loss_figure", "loss_histories",
    "metrics_table", "plan_job", "rag_settings", "read_cache", "read_metrics", "read_run_card", "render_report", "run",
    "run_jobs", "score_job", "score_rows", "summarize",
    "summarize_frame", "write_report",
]
