"""Scoring of generations: per-row metrics, per-system summaries with bootstrap CIs, paired comparisons.

    python -c "from prodtune.evaluate import answer_of; print(answer_of('deepseek', 'why\\n</think>\\nbecause'))"
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import pandas as pd

from prodtune import metrics as M
from prodtune import prompts as P

DESCRIPTION_METRICS = ("rouge_l", "chrf", "embed_cos", "unsupported_rate", "copied_rate", "repetition", "empty", "endless",
                       "tokens_per_s")
HEADLINE = ("rouge_l", "chrf", "embed_cos")
TRACKS = ("llama", "deepseek")

# (a, b, question): the paired differences a - b the report shows, when both systems ran on the same rows.
COMPARISONS = (
    ("llama-ft", "base", "does fine-tuning help?"),
    ("llama-ft+rag", "llama-ft", "does RAG help the fine-tuned model?"),
    ("base+rag", "base", "does RAG help the base model?"),
    ("llama-ft", "study-recipe", "what are our cleaning and masking worth (same budget)?"),
    ("deepseek-ft", "llama-ft", "reasoning track vs description track on descriptions"),
    ("deepseek-ft-cot", "base-r1", "does the DeepSeek track help on its own CoT questions?"),
)


def answer_of(track: str, text: str) -> str:
    """The answer part of a generated continuation, the text every metric scores.

    Args:
        track: `llama` (Alpaca prompt: the description after `### Response:`, cut at a new `### ` section) or
            `deepseek` (R1 prompt: the text after `</think>`).
        text: the continuation.

    Returns:
        The answer; for R1 prompts an empty string when the completion never closes `</think>` (a model that only
        reasons has not answered; `think_ok` counts how often that happens).
    """
    if track == "llama":
        return P.parse_alpaca_response(text)
    if track == "deepseek":
        return text.split(P.THINK_CLOSE, 1)[1].strip() if P.THINK_CLOSE in text else ""
    raise ValueError(f"unknown track {track!r}; expected one of {TRACKS}")


def score_rows(preds: Sequence[dict], refs: Sequence[str], sources: Sequence[str], embedder: M.Embedder | None,
               r1: bool = False, prompts: Sequence[str] | None = None,
               contexts: Sequence[str] | None = None) -> pd.DataFrame:
    """Per-row metrics of generations against references.

    Args:
        preds: `models.generate` results (`text`, `new_tokens`, `seconds`, `finished`).
        refs: the reference answers.
        sources: the product's own text the model was asked about (its title; for a CoT question, also its
            description): with the reference, what the answer's claims are checked against (`metrics.claim_check`).
        embedder: sentence embeddings for `embed_cos`; None leaves that column out.
        r1: R1 prompts (answer after `</think>`, plus `think_ok`).
        prompts: the prompts (R1: whether each opened `<think>` itself; default: they did, as the study's prompt).
        contexts: the retrieved descriptions of other products shown in each prompt (RAG): unsupported claims found
            there count as `copied_rate`.

    Returns:
        One row per generation: rouge_l, chrf, embed_cos, unsupported_rate, copied_rate, unsupported (the claims),
        copied, repetition,
        empty, endless, new_tokens, seconds, tokens_per_s, think_ok (R1 only), answer.
    """
    answers = [answer_of("deepseek" if r1 else "llama", p["text"]) for p in preds]
    cos = embedder.cosine(answers, list(refs)) if embedder is not None else [None] * len(answers)
    rows = []
    opened = list(prompts) if prompts is not None else ["<think>\n"] * len(answers)
    shown = list(contexts) if contexts is not None else [""] * len(answers)
    for p, a, ref, src, c, pr, ctx in zip(preds, answers, refs, sources, cos, opened, shown):
        check = M.claim_check(a, f"{src}\n{ref}", ctx)
        rows.append({
            "rouge_l": M.rouge_l(a, ref),
            "chrf": M.chrf(a, ref),
            **({"embed_cos": float(c)} if c is not None else {}),
            "unsupported_rate": check["unsupported_rate"],
            "copied_rate": check["copied_rate"],
            "unsupported": ", ".join(check["unsupported"])[:200],
            "copied": ", ".join(check["copied"])[:200],
            "repetition": M.repetition_rate(a),
            "empty": float(not a.strip()),
            "endless": float(not p.get("finished", True)),
            "new_tokens": p["new_tokens"],
            "seconds": p["seconds"],
            "tokens_per_s": p["new_tokens"] / p["seconds"] if p["seconds"] > 0 else float("nan"),
            **({"think_ok": float(M.think_adherence(p["text"], pr))} if r1 else {}),
            "answer": a,
        })
    return pd.DataFrame(rows)


def summarize_frame(df: pd.DataFrame, n_boot: int = 2000, seed: int = 3407) -> dict[str, dict[str, float]]:
    """metric -> {mean, lo, hi, n} of one system's per-row frame (bootstrap 95% CI of the mean over rows).

    Infinite and missing values (tokens/s of a row timed at 0 s) are left out of their metric.
    """
    cols = [c for c in (*DESCRIPTION_METRICS, "think_ok") if c in df]
    return {c: M.bootstrap_mean_ci(df[c].replace([np.inf, -np.inf], np.nan).dropna(), n_boot, seed) for c in cols}


def summarize(per_system: dict[str, pd.DataFrame], n_boot: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """system -> metric -> {mean, lo, hi, n} for every system's per-row frame."""
    return {name: summarize_frame(df, n_boot, seed) for name, df in per_system.items()}


def compare(per_system: dict[str, pd.DataFrame], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """Paired bootstrap differences (a - b) on the headline metrics for each of `COMPARISONS` whose systems ran."""
    out = []
    for a, b, question in COMPARISONS:
        if a in per_system and b in per_system and len(per_system[a]) == len(per_system[b]):
            for m in HEADLINE:
                if m in per_system[a] and m in per_system[b]:
                    d = M.paired_bootstrap_diff(per_system[a][m], per_system[b][m], n_boot, seed)
                    out.append({"a": a, "b": b, "question": question, "metric": m, **d})
    return out


def is_finite_metrics(result: dict[str, Any]) -> bool:
    """True when every mean in a stage-06 metrics dict is a finite number (what CI's smoke run asserts)."""
    return all(math.isfinite(v["mean"]) for k, ms in result.items() if k not in ("comparisons", "meta") for v in ms.values())
