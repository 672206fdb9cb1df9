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
_WORD = re.compile(r"[A-Za-z](?:[A-Za-z'’-]*[A-Za-z])?")  # a closing quote or a dash is not part of the word
# A sentence ends at . ! ? : ; (and the quotes or brackets that close with it) before a space, or at a new line.
SENTENCE_SPLIT = re.compile(r"(?<=[.!?:;])[\"'’”)\]]*\s+|\n+")
# Capitalised mid-sentence, these are no claim about a product (after a quote: 'A fine book' The Times): not counted.
FUNCTION_WORDS = frozenset(
    "a an and are as at be but by each every for from he her his i if in is it its my no not of on or our she so "
    "some that the their there these they this those to was we were what when where which who why with you your".split())


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
    """Brand-like tokens: capitalised words that do not start a sentence and are no function word (lower-cased for
    comparison)."""
    out = set()
    for sent in SENTENCE_SPLIT.split(text):
        words = _WORD.findall(sent)
        for w in words[1:]:
            if w[0].isupper() and len(w) > 1 and w.lower() not in FUNCTION_WORDS:
                out.add(w.lower())
    return out


# A number, with the unit that follows it if any: "5 mm", "5mm", "1,000 mAh", "2.5-inch", "12 x" (a pack of 12).
_UNITS = ("mm|cm|dm|m|km|cl|dl|in|inch|inches|ft|feet|yd|oz|fl oz|lb|lbs|pounds?|kg|g|mg|ml|l|liters?|litres?|gal|gallons?|w|"
          "watts?|kw|v|volts?|mah|ah|a|amps?|hz|khz|mhz|ghz|gb|tb|mb|kb|mbps|gbps|rpm|psi|db|k|mp|pcs|pieces?|pack|"
          "count|ct|sheets?|pages?|hours?|hrs?|h|minutes?|mins?|seconds?|sec|s|days?|years?|yrs?|months?|weeks?|"
          "x|%|°f|°c|degrees?|\"|'|”|″")
_CLAIM_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+(?:[.,]\d+)?)(?:\s*-?\s*(" + _UNITS + r"))?(?![\w])",
                           re.IGNORECASE)
_UNIT_ALIASES = {"inch": "in", "inches": "in", '"': "in", "”": "in", "″": "in", "feet": "ft", "lbs": "lb",
                 "pound": "lb", "pounds": "lb", "liter": "l", "liters": "l", "litre": "l", "litres": "l",
                 "gallon": "gal", "gallons": "gal", "watt": "w", "watts": "w", "volt": "v", "volts": "v",
                 "amp": "a", "amps": "a", "piece": "pcs", "pieces": "pcs", "ct": "count", "sheet": "sheets",
                 "page": "pages", "hour": "h", "hours": "h", "hr": "h", "hrs": "h", "minute": "min", "minutes": "min",
                 "mins": "min", "second": "s", "seconds": "s", "sec": "s", "day": "days", "year": "years", "yr": "years",
                 "yrs": "years", "month": "months", "week": "weeks", "degree": "°", "degrees": "°", "'": "ft"}


def number_claims(text: str) -> set[tuple[str, str]]:
    """(number, unit) pairs of a text, normalised: `1,000 mAh` -> ("1000", "mah"), `5mm` -> ("5", "mm"), `2,5` ->
    ("2.5", ""); the unit is "" where none follows the number."""
    out = set()
    for num, unit in _CLAIM_NUMBER.findall(text):
        num = num.replace(",", "") if re.fullmatch(r"\d{1,3}(?:,\d{3})+", num) else num.replace(",", ".")
        unit = unit.lower()
        out.add((num, _UNIT_ALIASES.get(unit, unit)))
    return out


def claim_check(answer: str, own: str, neighbours: str = "") -> dict[str, Any]:
    """The hallucination measure: the answer's claims checked against the product's own text, and the unsupported ones
    against what was retrieved about other products.

    Claims are numbers (with their unit: "5 mm" is not supported by "5 cm", but is by a bare "5"; a number without
    a unit is supported by the same number anywhere in the text) and brand-like words (capitalised words that do not start a
    sentence). A claim is supported when the product's own text (its title and reference description) holds it;
    an unsupported claim is "copied" when a retrieved neighbour (another product) holds it.

    Args:
        answer: the generated answer.
        own: the product's own title and reference description (for a CoT question, also its source text).
        neighbours: the retrieved descriptions of other products shown in the prompt ("" without RAG).

    Returns:
        `{"claims", "unsupported" (list), "copied" (list), "unsupported_rate", "copied_rate"}`: rates are shares of
        the answer's claims (0.0 when it makes none); copied claims are a subset of the unsupported ones.
    """
    def holds(text_nums: set[tuple[str, str]], text_words: set[str], claim: tuple[str, str] | str) -> bool:
        if isinstance(claim, str):
            return claim in text_words
        num, unit = claim
        # with a unit: the same number with that unit, or without any; without: the same number anywhere
        return bool({(num, unit), (num, "")} & text_nums) if unit else any(n == num for n, _ in text_nums)

    claims: list[tuple[str, str] | str] = sorted(number_claims(answer)) + sorted(capitalised_words(answer))
    own_nums, own_words = number_claims(own), {w.lower() for w in _WORD.findall(own)}
    nb_nums, nb_words = number_claims(neighbours), {w.lower() for w in _WORD.findall(neighbours)}
    missing = [c for c in claims if not holds(own_nums, own_words, c)]
    copied = [c for c in missing if holds(nb_nums, nb_words, c)]
    show = lambda c: c if isinstance(c, str) else (c[0] + (" " + c[1] if c[1] else ""))  # noqa: E731
    n = len(claims)
    return {"claims": n, "unsupported": [show(c) for c in missing], "copied": [show(c) for c in copied],
            "unsupported_rate": len(missing) / n if n else 0.0, "copied_rate": len(copied) / n if n else 0.0}


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
