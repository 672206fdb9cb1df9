"""Stage 02's quality gates and the text helpers they use: lengths, looping text, grounded numbers, overlap with
the source, copies of the description, near-duplicate questions.

    python -c "from prodtune.cot import numbers_in, overlap; print(numbers_in('1,000 mAh'), overlap('red wool', 'Red wool hat'))"
"""

from __future__ import annotations

import difflib
import re
from collections import Counter

from prodtune.cot.config import CoTAnswer, CoTConfig
from prodtune.cot.products import Item

_WORD = re.compile(r"[a-z0-9]+")
_NUM = re.compile(r"\d+(?:[.,]\d+)*")
_ENUM = re.compile(r"(?im)^\s*(?:step\s*)?\d{1,2}\s*[.):]\s+|\bstep\s+\d{1,2}\b")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"“‘(])")
_STOP = frozenset(
    """a about above after again all also am an and any are as at be because been being both but by can could did do
    does doing down during each few for from further had has have having he her here hers him his how i if in into is it
    its itself just me more most my no nor not now of off on once only or other our out over own same she should so some
    such than that the their them then there these they this those through to too under until up very was we were what
    when where which while who whom why will with would you your yours yes yet well may might must shall let lets get
    gets got make makes made one ones thing things really quite great good nice lot lots much many product item items
    description describes described says said states stated mentions mentioned according shopper customer question
    answer recommend recommended choice option options pick buy need needs want wants looking""".split()
)


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric words of `text`."""
    return _WORD.findall(text.lower())


def _stem(w: str) -> str:
    # Crude suffix stripping, enough to match "charges" with "charge" or "washing" with "wash" for the overlap gate.
    for suf in ("ing", "ed", "es", "s", "ly"):
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: -len(suf)]
    return w


def numbers_in(text: str) -> set[str]:
    """Numbers in `text`, normalised (`1,000` -> `1000`, `5.0` -> `5`), for the grounding gate."""
    out = set()
    for m in _NUM.findall(text):
        v = m.replace(",", "")
        if "." in v:
            v = v.rstrip("0").rstrip(".")
        out.add(v)
    return out


def overlap(text: str, source: str) -> float:
    """Share of `text`'s content words (not stop words) found in `source` (after crude stemming); 0.0 if none."""
    src = {_stem(w) for w in words(source)}
    content = [w for w in words(text) if w not in _STOP and (len(w) >= 3 or w.isdigit())]
    if not content:
        return 0.0  # an answer without a single content word ("Yes. The answer is no.") states no fact
    return sum(_stem(w) in src for w in content) / len(content)


def copy_ratio(text: str, source: str, min_run: int = 4) -> float:
    """Share of `source`'s words that `text` reproduces in runs of at least `min_run` consecutive words."""
    src, txt = words(source), words(text)
    if not src:
        return 0.0
    blocks = difflib.SequenceMatcher(None, src, txt, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= min_run) / len(src)


def distinct_ratio(text: str, k: int = 3) -> float:
    """Distinct word k-grams over all k-grams (1.0 for texts shorter than 2k words); low means looping text."""
    w = words(text)
    if len(w) < 2 * k:
        return 1.0
    grams = [tuple(w[i : i + k]) for i in range(len(w) - k + 1)]
    return len(set(grams)) / len(grams)


def sentences(text: str) -> list[str]:
    """Split a description into sentences (keeps decimals such as `5.3` and sizes such as `14"` intact)."""
    return [s.strip() for s in _SENT.split(text.strip()) if s.strip()]


def shingles(text: str, k: int = 3) -> frozenset:
    """Word k-grams of a question, for near-duplicate detection (the whole word tuple when shorter than k)."""
    w = words(text)
    if len(w) < k:
        return frozenset([tuple(w)])
    return frozenset(tuple(w[i : i + k]) for i in range(len(w) - k + 1))


class QuestionIndex:
    """Accepted questions, for near-duplicate detection by Jaccard similarity of word 3-grams.

    An inverted index from shingle to questions keeps a lookup proportional to the candidates that share
    a shingle, not to every question kept so far.
    """

    def __init__(self, threshold: float = 0.8):
        self.threshold = threshold
        self._sets: list[frozenset] = []
        self._uids: list[str] = []
        self._index: dict[tuple, list[int]] = {}

    def __len__(self) -> int:
        return len(self._sets)

    def nearest(self, question: str) -> tuple[float, str | None]:
        """`(similarity, uid)` of the most similar accepted question (0.0, None when nothing shares a 3-gram)."""
        s = shingles(question)
        hits: Counter = Counter()
        for sh in s:
            for i in self._index.get(sh, ()):
                hits[i] += 1
        best, who = 0.0, None
        for i, inter in hits.items():
            j = inter / (len(s) + len(self._sets[i]) - inter)
            if j > best:
                best, who = j, self._uids[i]
        return best, who

    def add(self, question: str, uid: str) -> None:
        """Remember an accepted question."""
        s = shingles(question)
        i = len(self._sets)
        self._sets.append(s)
        self._uids.append(uid)
        for sh in s:
            self._index.setdefault(sh, []).append(i)


class Gates:
    """The quality gates, in order: lengths, repetition, grounded numbers, token overlap, not a copy.

    Near-duplicate questions, the last gate, need the accepted rows so far: `QuestionIndex`.
    """

    def __init__(self, cfg: CoTConfig):
        self.cfg = cfg
        self.bounds = {
            "Question": (cfg.min_question_chars, cfg.max_question_chars),
            "Complex_CoT": (cfg.min_cot_chars, cfg.max_cot_chars),
            "Response": (cfg.min_response_chars, cfg.max_response_chars),
        }

    def check(self, item: Item, ans: CoTAnswer) -> tuple[str | None, str]:
        """Return `(None, "")` when the answer passes, else `(gate, detail)`."""
        for f, (lo, hi) in self.bounds.items():
            n = len(getattr(ans, f))
            if not lo <= n <= hi:
                return "length", f"{f}: {n} chars outside [{lo}, {hi}]"
        for f in ("Complex_CoT", "Response"):
            d = distinct_ratio(getattr(ans, f))
            if d < self.cfg.min_distinct:
                return "repetitive", f"{f}: only {d:.0%} of its word 3-grams are distinct"
        source = f"{item.title}\n{item.content}"
        # A number the shopper states (e.g. "my laptop is 15 inches") is a premise the answer may repeat.
        allowed = numbers_in(source) | numbers_in(ans.Question)
        for f, text in (("Response", ans.Response), ("Complex_CoT", _ENUM.sub(" ", ans.Complex_CoT))):
            extra = sorted(numbers_in(text) - allowed)
            if extra:
                return "ungrounded_number", f"{f}: {', '.join(extra[:5])} not in the title or description"
        ov = overlap(ans.Response, source)
        if ov < self.cfg.min_overlap:
            return "low_overlap", f"Response: {ov:.2f} of content words in the source < {self.cfg.min_overlap}"
        cr = copy_ratio(ans.Response, item.content)
        if cr >= self.cfg.max_copy_ratio:
            return "copies_description", f"Response reproduces {cr:.0%} of the description"
        return None, ""
