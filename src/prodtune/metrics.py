"""Per-row text metrics and paired bootstrap confidence intervals, used by stage 06.

    python -c "from prodtune.metrics import rouge_l; print(rouge_l('a red mug', 'a red cup'))"

ROUGE-L comes from Google's `rouge-score`, chrF from `sacrebleu`, embedding similarity from
sentence-transformers (MiniLM by default). The hallucination proxy, repetition rate and `<think>` adherence
are small rules written here because no library defines them; each is documented where it is defined.
Confidence intervals come from `scipy.stats.bootstrap` (percentile method, seeded).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

_NUMBER = re.compile(r"\d+(?:[.,]\d+)?")
_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 (stemmed, `rouge-score`) of one prediction against one reference, in [0, 1]."""
    if not prediction.strip() or not reference.strip():
        return 0.0
    return float(_rouge().score(reference, prediction)["rougeL"].fmeasure)


@lru_cache(maxsize=1)
def _chrf() -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF()


def chrf(prediction: str, reference: str) -> float:
    """Sentence-level chrF (`sacrebleu`, character 6-grams, beta 2), in [0, 100]."""
    if not prediction.strip():
        return 0.0
    return float(_chrf().sentence_score(prediction, [reference]).score)


def numbers(text: str) -> set[str]:
    """Numbers in a text, normalised (`1,5` -> `1.5`)."""
    return {n.replace(",", ".") for n in _NUMBER.findall(text)}


def capitalised_words(text: str) -> set[str]:
    """Brand-like tokens: capitalised words that do not start a sentence (lower-cased for comparison)."""
    out = set()
    for sent in re.split(r"(?<=[.!?:;])\s+|\n+", text):
        words = _WORD.findall(sent)
        for w in words[1:]:
            if w[0].isupper() and len(w) > 1:
                out.add(w.lower())
    return out


def unsupported(answer: str, source: str) -> dict[str, Any]:
    """Hallucination proxy: numbers and brand-like words in `answer` that `source` (title + context) lacks.

    Returns:
        `{"numbers": [...], "names": [...], "rate": k / max(1, claims)}` where claims are all numbers and
        brand-like words of the answer; `rate` is the share of them that the source does not contain.
    """
    src_numbers = numbers(source)
    src_words = {w.lower() for w in _WORD.findall(source)}
    nums = sorted(numbers(answer) - src_numbers)
    caps = capitalised_words(answer)
    names = sorted(caps - src_words)
    claims = len(numbers(answer)) + len(caps)
    return {"numbers": nums, "names": names, "rate": (len(nums) + len(names)) / claims if claims else 0.0}


def repetition_rate(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same text (0 = no loops, -> 1 = a loop)."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def think_adherence(completion: str, prompt: str = "<think>\n") -> bool:
    """True when a DeepSeek-track reply holds exactly one reasoning block, `<think>...</think>`, then a non-empty answer.

    The `<think>` is the prompt's when the prompt ends with it (the R1 template's generation prompt, the study's
    prompt), else the reply's own first word (ChatML templates): one open tag in all, never doubled, never missing.

    Args:
        completion: the generated continuation.
        prompt: the prompt it continues (only whether it ends with `<think>` matters).
    """
    reply = ("<think>" if prompt.rstrip().endswith("<think>") else "") + completion.lstrip()
    if not reply.startswith("<think>") or reply.count("<think>") != 1 or reply.count("</think>") != 1:
        return False
    cot, answer = reply[len("<think>"):].split("</think>", 1)
    return bool(cot.strip()) and bool(answer.strip())


class Embedder:
    """Sentence embeddings for cosine similarity (MiniLM by default, normalised vectors)."""

    def __init__(self, model: str = "embedded:all-minilm-l6-v2", device: str | None = None):
        from sentence_transformers import SentenceTransformer

        from prodtune.models import resolve_model_id

        self.model = SentenceTransformer(resolve_model_id(model), device=device or "cpu")

    def cosine(self, predictions: Sequence[str], references: Sequence[str]) -> np.ndarray:
        """Row-wise cosine similarity of predictions and references; an empty prediction scores 0."""
        a = self.model.encode(list(predictions), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        b = self.model.encode(list(references), batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
        sims = (a * b).sum(axis=1)
        empty = np.array([not p.strip() for p in predictions])
        sims[empty] = 0.0
        return sims.astype(float)


def _bootstrap(values: np.ndarray, n_boot: int, seed: int, alpha: float) -> tuple[float, float, np.ndarray]:
    """Percentile bootstrap CI of the mean (`scipy.stats.bootstrap`) and the resampled means.

    The percentile method on `default_rng(seed)` draws the same resamples as the hand-written bootstrap this
    replaced, so the CIs are the same numbers. One row has no spread to resample: its CI is the value itself.
    """
    from scipy.stats import bootstrap

    if len(values) < 2:
        return float(values.mean()), float(values.mean()), np.full(n_boot, values.mean())
    res = bootstrap((values,), np.mean, n_resamples=n_boot, confidence_level=1 - alpha, method="percentile",
                    vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high), res.bootstrap_distribution


def bootstrap_mean_ci(values: Sequence[float], n_boot: int = 2000, seed: int = 3407, alpha: float = 0.05) -> dict[str, float]:
    """Mean of a metric over rows with a percentile bootstrap CI.

    Args:
        values: one number per row.
        n_boot: resamples.
        seed: seed of the resampling.
        alpha: 1 - confidence level (0.05: a 95% CI).

    Returns:
        `{"mean", "lo", "hi", "n"}`; NaNs when `values` is empty.
    """
    x = np.asarray(values, dtype=float)
    if len(x) == 0:
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": 0}
    lo, hi, _ = _bootstrap(x, n_boot, seed, alpha)
    return {"mean": float(x.mean()), "lo": lo, "hi": hi, "n": int(len(x))}


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 3407, alpha: float = 0.05) -> dict[str, float]:
    """Mean of `a - b` over the same rows with a paired percentile bootstrap CI and a two-sided p-value.

    The rows are resampled together (the per-row differences are the sample), so the CI reflects the difference
    between two systems on the same products, not the spread of each system alone. The p-value is twice the
    smaller share of resampled mean differences on either side of 0.

    Raises:
        ValueError: `a` and `b` do not have the same number of rows.
    """
    x, y = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired bootstrap needs the same rows: {x.shape} vs {y.shape}")
    d = x - y
    if len(d) == 0:
        return {"diff": float("nan"), "lo": float("nan"), "hi": float("nan"), "p": float("nan"), "n": 0,
                "excludes_zero": False}
    lo, hi, means = _bootstrap(d, n_boot, seed, alpha)
    p = 2 * min((means <= 0).mean(), (means >= 0).mean())
    return {"diff": float(d.mean()), "lo": lo, "hi": hi, "p": float(min(1.0, p)), "n": int(len(d)),
            "excludes_zero": bool(lo > 0 or hi < 0)}
