"""Stage 02: the chain-of-thought dataset (shopper question, reasoning, answer) grounded in each product.

    prodtune cot --backend template --data data/cpu/prepared --out data/cpu/cot
    prodtune cot --backend local --n 5 --out data/cpu/cot_local
    OPENAI_API_KEY=... prodtune cot --backend openai --model gpt-4o-mini --n 2000 --concurrency 16
    prodtune cot --backend openai --base-url http://localhost:11434/v1 --model qwen2.5:7b   # Ollama, no key

Three backends behind one interface (`Backend.run(items, on_result)`):

* `template`: deterministic and offline; builds rows from the product's own sentences and numbers, no model.
  Its rows say so (`backend` column, dataset card): they exercise the pipeline, they are not LLM data.
* `local`: a transformers model (the embedded SmolLM2-135M-Instruct by default) writing the same JSON. Small
  models are weak at JSON, so by default (`local_mode: fields`) the JSON skeleton is forced and the model only
  writes the three string values, greedily, after a worked example; `free` mode only prefixes `{"Question": "`.
* `openai`: any OpenAI-compatible endpoint through `prodtune.llm_client` (concurrency, timeouts, retries with
  backoff and Retry-After, `response_format` json_schema, pydantic validation, invalid answers re-asked).

Every answer then passes quality gates (lengths, no looping text, numbers that are in the source, token overlap
with the source, no copy of the whole description, no near-duplicate question); each decision is counted. Output (`out_dir`):
`cot.jsonl` (append-only, keyed by uid, so a killed run resumes without duplicates or lost rows),
`rejects.jsonl`, `cot.parquet`, `{train,validation,test}.parquet` (a row's split is its product's split in
stage 01), `stats.json`, `run.json` and a dataset card `README.md` (loadable with `datasets.load_dataset(out_dir)`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import difflib
import hashlib
import json
import os
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from prodtune import prompts
from prodtune.io import atomic_path, log, read_json, write_json, write_text

SPLITS = ("train", "validation", "test")
FIELDS = ("Question", "Complex_CoT", "Response")
BACKENDS = ("template", "local", "openai")
DEFAULT_MODELS = {"template": "template", "local": "embedded:smollm2-135m-instruct", "openai": "gpt-4o-mini"}
ROW_COLUMNS = ("uid", "title", "split", *FIELDS, "style", "backend", "model", "prompt_version")
SPLIT_COLUMNS = ("uid", "title", *FIELDS, "style", "backend", "model", "prompt_version")
GATES = ("length", "repetitive", "ungrounded_number", "low_overlap", "copies_description", "near_duplicate")
GATE_LABELS = {"length": "lengths in bounds", "repetitive": "not repetitive", "ungrounded_number": "numbers grounded",
               "low_overlap": "words from the source", "copies_description": "not a copy", "near_duplicate": "not a near-duplicate"}
ANSWER_ERRORS = ("invalid_json", "schema_violation", "refusal", "truncated")  # reasons a reply is not a valid answer


@dataclass
class CoTConfig:
    """Settings of stage 02. Defaults are the offline CPU setting: the template backend over every product."""

    backend: str = field(default="template", metadata={"help": "template | local | openai"})
    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "stage 01 output (train/validation/test.parquet)"})
    out_dir: str = field(default="{data_dir}/cot", metadata={"help": "where cot.jsonl, splits, stats and the card go"})
    n: int | None = field(default=None, metadata={"help": "products to process (seeded order); null: all"})
    seed: int = field(default=3407, metadata={"help": "seed of product order, question styles and request seeds"})
    styles: list[str] = field(default_factory=lambda: list(prompts.COT_STYLES), metadata={"help": "question styles to draw from"})
    model: str | None = field(default=None, metadata={"help": "model name/path; null: the backend's default"})
    # openai backend
    base_url: str = field(default="https://api.openai.com/v1", metadata={"help": "OpenAI-compatible API root"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once"})
    timeout_s: float = field(default=60.0, metadata={"help": "per-request timeout"})
    max_retries: int = field(default=6, metadata={"help": "retries of 429/5xx/timeouts per request"})
    backoff_base_s: float = field(default=0.5, metadata={"help": "first backoff delay; doubles per retry"})
    backoff_max_s: float = field(default=30.0, metadata={"help": "longest backoff delay"})
    max_invalid_retries: int = field(default=2, metadata={"help": "re-asks after malformed or schema-violating answers"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (openai backend)"})
    max_tokens: int = field(default=700, metadata={"help": "completion token limit (openai backend)"})
    structured_output: str = field(default="json_schema", metadata={"help": "json_schema | json_object | none"})
    few_shot: bool = field(default=True, metadata={"help": "include the worked example in the prompt"})
    # local backend
    local_mode: str = field(default="fields", metadata={"help": "fields: forced JSON skeleton | free: JSON prefix only"})
    local_batch_size: int = field(default=8, metadata={"help": "products per generate() call"})
    local_threads: int | None = field(default=None, metadata={"help": "torch CPU threads while generating; null: torch's default (1 avoids OpenMP spin-waits on busy shared cores)"})
    local_question_tokens: int = field(default=40, metadata={"help": "token cap of the question (local)"})
    local_cot_tokens: int = field(default=120, metadata={"help": "token cap of the reasoning (local)"})
    local_response_tokens: int = field(default=72, metadata={"help": "token cap of the answer (local)"})
    # quality gates
    min_question_chars: int = field(default=15, metadata={"help": "shortest question"})
    max_question_chars: int = field(default=400, metadata={"help": "longest question"})
    min_cot_chars: int = field(default=60, metadata={"help": "shortest reasoning"})
    max_cot_chars: int = field(default=3000, metadata={"help": "longest reasoning"})
    min_response_chars: int = field(default=20, metadata={"help": "shortest answer"})
    max_response_chars: int = field(default=1200, metadata={"help": "longest answer"})
    min_distinct: float = field(default=0.6, metadata={"help": "least share of distinct word 3-grams in reasoning and answer"})
    min_overlap: float = field(default=0.5, metadata={"help": "share of the answer's content words found in the source"})
    max_copy_ratio: float = field(default=0.8, metadata={"help": "reject answers that reproduce this share of the description"})
    dedup_threshold: float = field(default=0.8, metadata={"help": "Jaccard of word 3-grams above which a question is a near-duplicate"})
    overwrite: bool = field(default=False, metadata={"help": "delete earlier output in out_dir and start again"})

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"CoTConfig.backend: {self.backend!r} is not one of {BACKENDS}")
        bad = [s for s in self.styles if s not in prompts.COT_STYLES]
        if bad or not self.styles:
            raise ValueError(f"CoTConfig.styles: unknown or empty {bad}; known: {sorted(prompts.COT_STYLES)}")
        if self.n is not None and self.n < 1:
            raise ValueError("CoTConfig.n: must be a positive number of products or null")
        if self.concurrency < 1 or self.local_batch_size < 1:
            raise ValueError("CoTConfig.concurrency and local_batch_size must be >= 1")
        if self.timeout_s <= 0 or self.max_retries < 0 or self.max_invalid_retries < 0:
            raise ValueError("CoTConfig: timeout_s must be > 0, max_retries and max_invalid_retries >= 0")
        if self.structured_output not in ("json_schema", "json_object", "none"):
            raise ValueError("CoTConfig.structured_output: json_schema | json_object | none")
        if self.local_mode not in ("fields", "free"):
            raise ValueError("CoTConfig.local_mode: fields | free")
        if not (0 <= self.min_overlap <= 1 and 0 <= self.min_distinct <= 1 and 0 < self.max_copy_ratio <= 1 and 0 < self.dedup_threshold <= 1):
            raise ValueError("CoTConfig: min_overlap and min_distinct in [0, 1], max_copy_ratio and dedup_threshold in (0, 1]")
        for lo, hi in (("min_question_chars", "max_question_chars"), ("min_cot_chars", "max_cot_chars"),
                       ("min_response_chars", "max_response_chars")):
            if not 0 <= getattr(self, lo) <= getattr(self, hi):
                raise ValueError(f"CoTConfig: need 0 <= {lo} <= {hi}")

    @property
    def model_name(self) -> str:
        """The model actually used: `model`, or the backend's default."""
        return self.model or DEFAULT_MODELS[self.backend]


# ----------------------------------------------------------------------------------------------
# The answer schema and its parser
# ----------------------------------------------------------------------------------------------


class CoTAnswer(BaseModel):
    """One generated row: exactly these three non-empty strings (the study's column names)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True, strict=True)

    Question: str
    Complex_CoT: str
    Response: str

    @field_validator("Question", "Complex_CoT", "Response")
    @classmethod
    def _not_blank(cls, v: str) -> str:
        if not v:
            raise ValueError("empty string")
        return v


def answer_schema() -> dict[str, Any]:
    """The JSON schema sent as `response_format` (OpenAI strict mode: all keys required, no extra keys)."""
    return {
        "type": "object",
        "properties": {
            "Question": {"type": "string", "description": "the shopper's question, naming the product"},
            "Complex_CoT": {"type": "string", "description": "step-by-step reasoning from the description's facts"},
            "Response": {"type": "string", "description": "a concise answer to the shopper"},
        },
        "required": list(FIELDS),
        "additionalProperties": False,
    }


def response_format(mode: str) -> dict[str, Any] | None:
    """`response_format` for a structured-output mode (`json_schema`, `json_object`, `none`)."""
    if mode == "json_schema":
        return {"type": "json_schema", "json_schema": {"name": "cot_row", "strict": True, "schema": answer_schema()}}
    if mode == "json_object":
        return {"type": "json_object"}
    return None


_THINK = re.compile(r"^\s*<think>.*?</think>", re.S)
_FENCE = re.compile(r"^\s*```(?:json)?\s*|\s*```\s*$")


def parse_answer(text: str) -> tuple[CoTAnswer | None, str | None, str]:
    """Parse and validate a model's reply.

    Tolerates what well-meaning servers add around the object: a reasoning model's `<think>...</think>`,
    Markdown code fences, text before the first `{` or after the object.

    Args:
        text: the raw completion text.

    Returns:
        `(answer, None, "")` when valid, else `(None, reason, detail)` with reason `invalid_json` or
        `schema_violation` and a short human-readable detail.
    """
    text = _FENCE.sub("", _THINK.sub("", text or ""))
    start = text.find("{")
    if start < 0:
        return None, "invalid_json", "no JSON object in the reply"
    try:
        obj, _ = json.JSONDecoder(strict=False).raw_decode(text, start)
    except json.JSONDecodeError as e:
        return None, "invalid_json", f"{e.msg} at char {e.pos}"
    if not isinstance(obj, dict):
        return None, "schema_violation", f"top level is {type(obj).__name__}, not an object"
    try:
        return CoTAnswer.model_validate(obj), None, ""
    except ValidationError as e:
        parts = [f"{'.'.join(map(str, err['loc'])) or 'object'}: {err['msg']}" for err in e.errors()[:4]]
        return None, "schema_violation", "; ".join(parts)


# ----------------------------------------------------------------------------------------------
# Products, styles and text helpers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    """One product to generate a row for, with its stage 01 split and its seeded question style."""

    uid: str
    title: str
    content: str
    split: str
    style: str
    order: int


def _h(*parts: Any) -> int:
    """A stable 64-bit hash (Python's `hash` is salted per process, which would break resume and seeds)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def style_for(uid: str, seed: int, styles: list[str]) -> str:
    """The question style of a product: a seeded, order-independent draw from `styles`."""
    return styles[_h("style", seed, uid) % len(styles)]


def load_products(data_dir: str | Path, seed: int = 3407, styles: list[str] | None = None) -> list[Item]:
    """Read the prepared splits of stage 01 and return every product in a seeded order.

    Args:
        data_dir: folder with `{train,validation,test}.parquet` (columns uid, title, content).
        seed: seeds the order (so `n` takes a reproducible sample over all splits) and the styles.
        styles: question styles to draw from (default: all of `prompts.COT_STYLES`).

    Raises:
        FileNotFoundError: when a split file is missing.
        ValueError: when a uid occurs twice (naming both files).
    """
    styles = styles or list(prompts.COT_STYLES)
    data_dir = Path(data_dir)
    seen: dict[str, str] = {}
    rows: list[tuple[int, str, str, str, str]] = []
    for split in SPLITS:
        path = data_dir / f"{split}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run stage 01 first (prodtune prepare / notebook 01)")
        try:
            tab = pq.ParquetFile(path).read(columns=["uid", "title", "content"])  # read_table would import pyarrow.dataset (0.6 s)
        except (pa.ArrowInvalid, KeyError) as e:
            raise ValueError(f"{path}: cannot read columns uid, title, content: {e}") from e
        for uid, title, content in zip(*(tab.column(c).to_pylist() for c in ("uid", "title", "content"))):
            if uid in seen:
                raise ValueError(f"{path}: uid {uid!r} also occurs in {seen[uid]}")
            seen[uid] = str(path)
            rows.append((_h("order", seed, uid), uid, title or "", content or "", split))
    rows.sort()
    return [Item(uid, t, c, s, style_for(uid, seed, styles), i) for i, (_, uid, t, c, s) in enumerate(rows)]


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


def _words(text: str) -> list[str]:
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
    src = {_stem(w) for w in _words(source)}
    words = [w for w in _words(text) if w not in _STOP and (len(w) >= 3 or w.isdigit())]
    if not words:
        return 0.0  # an answer without a single content word ("Yes. The answer is no.") states no fact
    return sum(_stem(w) in src for w in words) / len(words)


def copy_ratio(text: str, source: str, min_run: int = 4) -> float:
    """Share of `source`'s words that `text` reproduces in runs of at least `min_run` consecutive words."""
    src, txt = _words(source), _words(text)
    if not src:
        return 0.0
    blocks = difflib.SequenceMatcher(None, src, txt, autojunk=False).get_matching_blocks()
    return sum(b.size for b in blocks if b.size >= min_run) / len(src)


def distinct_ratio(text: str, k: int = 3) -> float:
    """Distinct word k-grams over all k-grams (1.0 for texts shorter than 2k words); low means looping text."""
    w = _words(text)
    if len(w) < 2 * k:
        return 1.0
    grams = [tuple(w[i : i + k]) for i in range(len(w) - k + 1)]
    return len(set(grams)) / len(grams)


def sentences(text: str) -> list[str]:
    """Split a description into sentences (keeps decimals such as `5.3` and sizes such as `14"` intact)."""
    return [s.strip() for s in _SENT.split(text.strip()) if s.strip()]


def shingles(text: str, k: int = 3) -> frozenset:
    """Word k-grams of a question, for near-duplicate detection (the whole word tuple when shorter than k)."""
    w = _words(text)
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


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------


@dataclass
class GenResult:
    """What a backend produced for one item: an answer, or a reason it has none."""

    item: Item
    answer: CoTAnswer | None = None
    raw: str = ""
    reason: str | None = None
    detail: str = ""
    retryable: bool = False
    meta: dict[str, Any] = field(default_factory=dict)


OnResult = Callable[[GenResult], None]


class Backend:
    """One interface for all generators: `run(items, on_result)` calls `on_result` once per item, as results come."""

    name = "base"

    def __init__(self, cfg: CoTConfig):
        self.cfg = cfg
        self.model = cfg.model_name

    def run(self, items: list[Item], on_result: OnResult) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# -- template ------------------------------------------------------------------------------------

_USE = re.compile(r"\b(for|fits?|works?|perfect|ideal|suitable|designed|uses?|recommended|keeps?|helps?|lets?)\b", re.I)
_GIFT = re.compile(r"\b(gift|includes?|included|ages?|kids?|girls?|boys?|children|set|box|pack|guide|case)\b", re.I)
_STANDOUT = re.compile(r"\b(more|less|than|extra|only|up to|longer|better|lighter|thick|free|certified|built-in|premium|"
                       r"handmade|organic|waterproof|water-resistant|non-stick|noise)\b", re.I)

TEMPLATE_QUESTIONS = {
    "fit_use": ("What is the {name} good for?", "Will the {name} suit what I need it for?",
                "I'm considering the {name}. What kind of use is it designed for?"),
    "comparison": ("What sets the {name} apart from similar products?", "Why would I pick the {name} over a basic alternative?",
                   "How does the {name} compare with other options?"),
    "gift": ("Would the {name} make a good gift?", "I'm looking for a present. Is the {name} a good choice, and who is it for?",
             "Is the {name} a thoughtful gift idea?"),
    "specs": ("What are the key specifications of the {name}?", "Can you give me the main figures for the {name}?",
              "What size and specs does the {name} have?"),
}
TEMPLATE_OPENERS = {
    "fit_use": ("The shopper wants to know what the {name} is suited for.", "Here the question is whether the {name} fits the shopper's use."),
    "comparison": ("The shopper is comparing the {name} with alternatives. The description covers only this product, "
                   "so I can point out its own strengths but must not claim facts about other brands.",),
    "gift": ("The shopper is thinking about the {name} as a present, so who it suits and what comes with it matter most.",),
    "specs": ("The shopper asks for concrete specifications of the {name}, so I should give only figures that the "
              "description states.",),
}
TEMPLATE_LEADS = {
    "fit_use": "Here is what it is made for: ", "comparison": "What stands out: ",
    "gift": "It can make a nice gift. ", "specs": "Here are the key figures: ",
}
_FIGURE = re.compile(r"\d+(?:[.,]\d+)?(?:[\s-]?(?:°\s?[CF]|%|[A-Za-z]+\b|[\"”]))?")


def short_name(title: str, max_chars: int = 80) -> str:
    """The product's name for a question: the whole title when short, else its first comma-separated part."""
    title = " ".join(title.split())
    if len(title) <= max_chars:
        return title
    head = re.split(r",| - | \(|\|", title)[0].strip()
    return head if len(head) <= max_chars else head[:max_chars].rsplit(" ", 1)[0]


def _clause(sentence: str, max_chars: int) -> str:
    """A sentence cut to its first clause(s) within `max_chars`, ending with a full stop."""
    s = sentence.rstrip()
    if len(s) > max_chars:
        parts = re.split(r"(?<=[;,:])\s+| – | — ", s)
        out = parts[0]
        for p in parts[1:]:
            if len(out) + len(p) + 1 > max_chars:
                break
            out += " " + p
        s = out.rstrip(";,: ")
    return s if s[-1:] in ".!?" else s + "."


def template_answer(item: Item, max_copy_ratio: float = 0.8) -> tuple[CoTAnswer, str]:
    """Build a grounded row from the product's own facts, with no model. Deterministic per uid.

    The question is a seeded phrasing of the product's style; the reasoning quotes the sentences that
    matter for that style (sentences with numbers for specs, "includes"/ages for gifts, use words for
    fit/use, distinctive claims for comparison) and says what the description does not cover; the answer
    restates at most two of them, cut so the answer never reproduces most of the description.

    Returns:
        `(answer, style)`; the style falls back to fit_use when a specs product states no number.
    """
    facts = sentences(item.content) or [item.content.strip()]
    style = item.style
    numeric = [s for s in facts if re.search(r"\d", s)]
    if style == "specs" and not numeric:
        style = "fit_use"
    pick = {
        "specs": numeric,
        "fit_use": [s for s in facts if _USE.search(s)],
        "gift": [s for s in facts if _GIFT.search(s) or _USE.search(s)],
        "comparison": [s for s in facts if _STANDOUT.search(s)],
    }[style]
    ordered = pick + [s for s in facts if s not in pick]
    name = short_name(item.title)
    k = _h("phrasing", item.uid)
    question = TEMPLATE_QUESTIONS[style][k % len(TEMPLATE_QUESTIONS[style])].format(name=name)

    cot = [TEMPLATE_OPENERS[style][k % len(TEMPLATE_OPENERS[style])].format(name=name),
           "I will answer only from the product title and description."]
    for i, s in enumerate(ordered[:3]):
        cot.append(("The description says: " if i == 0 else "It also says: ") + f"\u201c{s}\u201d")
    if style == "specs":
        figs = [f.strip() for s in numeric for f in _FIGURE.findall(s)]
        if figs:
            cot.append("So the figures I can rely on are " + ", ".join(dict.fromkeys(figs)) + ".")
    cot.append("Nothing in the description covers price, warranty or reviews, so I will not mention them.")
    cot.append("A short answer with these facts addresses the question.")

    # At most two facts, and never most of the description: a one-sentence description is cut to a clause.
    budget = max(40, int(len(item.content) * min(0.6, max_copy_ratio - 0.15)))
    chosen: list[str] = []
    for s in ordered[:3]:
        c = _clause(s, max_chars=max(40, budget - sum(map(len, chosen))))
        if chosen and (len(c) < 20 or sum(map(len, chosen)) + len(c) > budget):
            break  # a fragment such as "Textured." reads worse than one complete fact
        chosen.append(c)
        if len(chosen) == 2:
            break
    response = TEMPLATE_LEADS[style] + " ".join(chosen)
    return CoTAnswer(Question=question, Complex_CoT=" ".join(cot), Response=response), style


class TemplateBackend(Backend):
    """Deterministic offline rows built from each product's own facts (no model; labelled `template`)."""

    name = "template"

    def __init__(self, cfg: CoTConfig):
        super().__init__(cfg)
        self.model = "template"

    def run(self, items: list[Item], on_result: OnResult) -> None:
        for it in items:
            t0 = time.perf_counter()
            ans, style = template_answer(it, self.cfg.max_copy_ratio)
            if style != it.style:
                it = dataclasses.replace(it, style=style)
            on_result(GenResult(it, ans, raw="", meta={"attempts": 1, "seconds": round(time.perf_counter() - t0, 5)}))


# -- local (transformers) ------------------------------------------------------------------------


class _JSONSkeleton:
    """A logits processor that forces the JSON skeleton around the three values, in one generate() pass.

    The prompt ends with `{"Question": "`. While a row is inside a value, tokens holding a quote, a backslash
    or a newline are banned except the bare `"` token, which closes the value; the code then forces the
    tokens of `, "Complex_CoT": "` (then `, "Response": "`, then `}` and EOS). Values are also closed by force
    when they are complete by shape: the question at its first `?`, the reasoning after `max_sentences[1]`
    sentences, the answer after `max_sentences[2]` (a small greedy model otherwise keeps talking); a value
    reaching its token cap is closed and reported as truncated. Within a value, a token that would repeat a
    4-token run already written in that value is banned (greedy decoding otherwise loops one sentence); the
    prompt is not part of that check, so copying facts from the description stays possible.

    `cut[r]` lists the values of row r closed mid-text (cap or sentence limit): the caller trims them to
    their last complete sentence.
    """

    def __init__(self, tok: Any, caps: list[int], starters: list[list[str]], prompt_len: int, no_repeat: int = 4,
                 max_sentences: tuple[int, int, int] = (1, 3, 2)):
        import torch

        self.torch = torch
        quote = tok.encode('"', add_special_tokens=False)
        if len(quote) != 1:
            raise ValueError("the tokenizer has no single-token quote; use local_mode: free")
        self.quote, self.eos = quote[0], tok.eos_token_id
        vocab = len(tok)
        pieces = tok.batch_decode([[i] for i in range(vocab)])
        banned = {i for i, p in enumerate(pieces) if i != self.quote and any(c in p for c in '"\\\n')}
        banned |= {i for i in tok.all_special_ids if i < vocab}
        self.banned = torch.tensor(sorted(banned), dtype=torch.long)
        self.qmark = {i for i, p in enumerate(pieces) if "?" in p}
        self.term = {i for i, p in enumerate(pieces) if p.rstrip()[-1:] in (".", "!", "?")}
        self.space = {i for i, p in enumerate(pieces) if p[:1].isspace()}
        # Per row: what follows each closed value (the next key and that value's forced start), then `}` + EOS.
        self.glue = [
            [tok.encode(f', "{f}": "{st}', add_special_tokens=False) for f, st in zip(FIELDS[1:], row[1:])]
            + [tok.encode("}", add_special_tokens=False) + [self.eos]]
            for row in starters
        ]
        batch = len(starters)
        self.caps, self.prompt_len, self.no_repeat, self.max_sent = caps, prompt_len, no_repeat, max_sentences
        self.field = [0] * batch
        self.forced: list[list[int]] = [[] for _ in range(batch)]
        self.was_forced = [False] * batch
        self.cur: list[list[int]] = [[] for _ in range(batch)]
        self.sent = [0] * batch
        self.truncated: list[list[str]] = [[] for _ in range(batch)]
        self.cut: list[list[str]] = [[] for _ in range(batch)]

    def _close(self, r: int, quote: bool) -> None:
        self.forced[r] = ([self.quote] if quote else []) + list(self.glue[r][self.field[r]])
        self.field[r] += 1
        self.cur[r], self.sent[r] = [], 0

    def _update(self, r: int, last: int) -> None:
        """Advance row r's state with the token it just produced."""
        if self.was_forced[r]:
            self.forced[r].pop(0)
            if last == self.eos:
                self.field[r] = len(FIELDS) + 1
            return
        if self.field[r] >= len(FIELDS):
            return
        if last == self.quote:
            self._close(r, quote=False)
            return
        f = self.field[r]
        if self.cur[r] and self.cur[r][-1] in self.term and last in self.space:
            self.sent[r] += 1  # a sentence ended before this word
        self.cur[r].append(last)
        if f == 0 and last in self.qmark:
            self._close(r, quote=True)
        elif f > 0 and self.sent[r] >= self.max_sent[f]:
            self.cut[r].append(FIELDS[f])
            self._close(r, quote=True)
        elif len(self.cur[r]) >= self.caps[f]:
            self.truncated[r].append(FIELDS[f])
            self.cut[r].append(FIELDS[f])
            self._close(r, quote=True)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        torch = self.torch
        step = input_ids.shape[1] - self.prompt_len
        for r in range(scores.shape[0]):
            if self.field[r] > len(FIELDS):
                continue  # finished (EOS forced); generate() pads this row
            if step > 0:
                self._update(r, int(input_ids[r, -1]))
                if self.field[r] > len(FIELDS):
                    continue
            self.was_forced[r] = bool(self.forced[r])
            if self.forced[r]:
                nxt = self.forced[r][0]
                keep = scores[r, nxt].clone()
                scores[r] = -float("inf")
                scores[r, nxt] = keep if torch.isfinite(keep) else 0.0
                continue
            scores[r, self.banned] = -float("inf")
            cur, n = self.cur[r], self.no_repeat
            if len(cur) >= n:
                tail = cur[-(n - 1):]
                ban = {cur[i + n - 1] for i in range(len(cur) - n + 1) if cur[i : i + n - 1] == tail}
                if ban:
                    scores[r, list(ban)] = -float("inf")
        return scores


def _cut_to_sentence(text: str) -> str:
    """`text` up to its last sentence end (a value cut by a token cap keeps only complete sentences)."""
    cut = max(text.rfind("."), text.rfind("?"), text.rfind("!"))
    return text[: cut + 1] if cut > 0 else ""


class LocalBackend(Backend):
    """A transformers causal LM writing the JSON row; greedy, batched, with a worked example in the prompt.

    In `fields` mode (default) `_JSONSkeleton` forces the JSON structure in a single generate() pass, so the
    model only writes the three values; values cut by their token caps keep their complete sentences (or the
    row is rejected as `truncated`). The text still goes through `parse_answer` and the gates like any other
    backend's. In `free` mode only the prefix `{"Question": "` is given and the model must close the object
    itself (kept to measure how often a small model manages that).
    """

    name = "local"

    def __init__(self, cfg: CoTConfig):
        super().__init__(cfg)
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prodtune.models import resolve_model_id

        path = resolve_model_id(self.model)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        self.tok = AutoTokenizer.from_pretrained(path)
        self.tok.padding_side = "left"  # decoder-only batched generation continues from the right edge
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.caps = [cfg.local_question_tokens, cfg.local_cot_tokens, cfg.local_response_tokens]
        log.info("cot local: loaded %s on %s in %.1fs", path, self.device, time.perf_counter() - t0)

    def _starters(self, it: Item) -> list[str]:
        """Forced starts of the three values (`prompts.COT_LOCAL_STARTERS`), empty in `free` mode."""
        if self.cfg.local_mode != "fields":
            return ["", "", ""]
        st, name = prompts.COT_LOCAL_STARTERS, short_name(it.title)
        return [st["Question"][it.style].format(name=name), st["Complex_CoT"].format(name=name), st["Response"].format(name=name)]

    def _prompt(self, it: Item) -> str:
        msgs = prompts.cot_messages(it.title, it.content, it.style, few_shot=self.cfg.few_shot)
        head = self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        return head + '{"Question": "' + self._starters(it)[0]

    def generate(self, batch: list[Item]) -> list[tuple[str, list[str], list[str]]]:
        """Greedy JSON for a batch of items: `(raw_text, fields_that_hit_their_cap, fields_to_trim)` per item."""
        import torch
        from transformers import LogitsProcessorList

        enc = self.tok([self._prompt(it) for it in batch], return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        start = enc.input_ids.shape[1]
        proc = None
        if self.cfg.local_mode == "fields":
            proc = _JSONSkeleton(self.tok, self.caps, [self._starters(it) for it in batch], start)
            max_new = sum(self.caps) + max(sum(map(len, g)) for g in proc.glue) + 4
        else:
            max_new = sum(self.caps) + 32
        threads = torch.get_num_threads()
        if self.cfg.local_threads and self.device == "cpu":
            torch.set_num_threads(self.cfg.local_threads)
        try:
            with torch.inference_mode():
                out = self.lm.generate(
                    **enc, max_new_tokens=max_new, do_sample=False, pad_token_id=self.tok.pad_token_id,
                    logits_processor=LogitsProcessorList([proc]) if proc else None,
                )
        finally:
            torch.set_num_threads(threads)
        res = []
        for r, row in enumerate(out[:, start:]):
            text = '{"Question": "' + self._starters(batch[r])[0] + self.tok.decode(row, skip_special_tokens=True)
            if proc:
                res.append((text, proc.truncated[r], proc.cut[r]))
            else:
                res.append((text, [] if self.tok.eos_token_id in row.tolist() else ["object"], []))
        return res

    def run(self, items: list[Item], on_result: OnResult) -> None:
        bs = self.cfg.local_batch_size
        for i in range(0, len(items), bs):
            batch = items[i : i + bs]
            t0 = time.perf_counter()
            outs = self.generate(batch)
            sec = (time.perf_counter() - t0) / len(batch)
            for it, (raw, trunc, cut) in zip(batch, outs):
                meta = {"attempts": 1, "seconds": round(sec, 3), "truncated": trunc}
                ans, reason, detail = parse_answer(raw)
                if ans is not None and cut:
                    vals = ans.model_dump()
                    vals.update({f: _cut_to_sentence(vals[f]) for f in cut})
                    empty = [f for f in cut if not vals[f]]
                    if empty:
                        ans, reason, detail = None, "truncated", f"{', '.join(empty)} hit its token cap before a sentence ended"
                    else:
                        ans = CoTAnswer(**vals)
                elif ans is None and trunc:
                    reason, detail = "truncated", f"hit the token cap ({', '.join(trunc)}); {detail}"
                on_result(GenResult(it, ans, raw=raw, reason=reason, detail=detail, meta=meta))


# -- openai-compatible ---------------------------------------------------------------------------


def _run_coro(coro: Any) -> Any:
    """Run a coroutine from sync code, also inside Jupyter (whose event loop already runs in this thread).

    There it runs on a fresh loop in a worker thread; an interrupt (Ctrl-C, the notebook's stop button) cancels
    that loop's task, so requests stop and the rows written so far stay for the next run to resume from.
    """
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict[str, Any] = {}

    def runner() -> Any:
        loop = asyncio.new_event_loop()
        try:
            box["task"], box["loop"] = loop.create_task(coro), loop
            return loop.run_until_complete(box["task"])
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        fut = ex.submit(runner)
        try:
            return fut.result()
        except KeyboardInterrupt:
            if "task" in box:
                box["loop"].call_soon_threadsafe(box["task"].cancel)
            raise


class OpenAIBackend(Backend):
    """Any OpenAI-compatible chat endpoint; concurrent, retried, structured output validated with pydantic.

    The key is read from the environment variable `cfg.api_key_env` at run time and never stored in the
    config, the rows, stats, the card or logs (messages pass through `redact`). Without a key the requests
    go unauthenticated, which local servers (vLLM, Ollama, llama.cpp) accept.
    """

    name = "openai"

    def __init__(self, cfg: CoTConfig):
        super().__init__(cfg)
        self.rf_mode = cfg.structured_output
        self.key = os.environ.get(cfg.api_key_env) or None
        if self.key is None:
            log.warning("cot openai: $%s is not set; sending requests without a key (fine for local servers)", cfg.api_key_env)

    def run(self, items: list[Item], on_result: OnResult) -> None:
        _run_coro(self._run(items, on_result))

    async def _run(self, items: list[Item], on_result: OnResult) -> None:
        from prodtune.llm_client import ChatClient, RetryPolicy

        cfg = self.cfg
        policy = RetryPolicy(cfg.max_retries, cfg.backoff_base_s, cfg.backoff_max_s)
        todo = iter(items)
        async with ChatClient(cfg.base_url, self.model, self.key, cfg.concurrency, cfg.timeout_s, policy, cfg.seed) as client:
            self.client = client

            async def worker() -> None:
                for it in todo:  # a shared iterator: each item goes to exactly one worker
                    on_result(await self._one(client, it))

            tasks = [asyncio.create_task(worker()) for _ in range(min(cfg.concurrency, max(1, len(items))))]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

    async def _one(self, client: Any, it: Item) -> GenResult:
        from prodtune.llm_client import CallStats, RequestFailed

        cfg = self.cfg
        msgs = prompts.cot_messages(it.title, it.content, it.style, few_shot=cfg.few_shot)
        st = CallStats()
        invalid: Counter = Counter()
        raw, reason, detail = "", None, ""
        k = 0
        while k <= cfg.max_invalid_retries:
            mode = self.rf_mode
            try:
                choice, _ = await client.complete(
                    msgs, temperature=cfg.temperature, max_tokens=cfg.max_tokens, stats=st,
                    response_format=response_format(mode), seed=(cfg.seed + _h("req", it.uid) + k) % 2**31,
                )
            except RequestFailed as e:
                if e.reason == "http_400" and mode != "none" and re.search(r"response_format|json_schema|schema", e.detail, re.I):
                    # Older servers reject json_schema: fall back to json_object, then to a plain prompt, once per
                    # run (requests in flight that used the old mode must not skip a step).
                    if self.rf_mode == mode:
                        self.rf_mode = "json_object" if mode == "json_schema" else "none"
                        log.warning("cot openai: server rejected response_format %s; falling back to %s", mode, self.rf_mode)
                    continue
                return GenResult(it, None, reason=e.reason, detail=client.redact(e.detail), retryable=e.retryable,
                                 meta=self._meta(st, invalid))
            raw = client.redact(choice["content"])
            if choice.get("refusal"):
                ans, reason, detail = None, "refusal", client.redact(str(choice["refusal"]))[:300]
            else:
                ans, reason, detail = parse_answer(raw)
                if ans is None and choice.get("finish_reason") == "length":
                    reason, detail = "truncated", f"finish_reason=length; {detail}"
            if ans is not None:
                return GenResult(it, ans, raw=raw, meta=self._meta(st, invalid))
            invalid[reason] += 1
            k += 1
        return GenResult(it, None, raw=raw, reason=reason, detail=detail, meta=self._meta(st, invalid))

    @staticmethod
    def _meta(st: Any, invalid: Counter) -> dict[str, Any]:
        return {**st.to_dict(), "invalid_answers": dict(invalid)}


def make_backend(cfg: CoTConfig) -> Backend:
    """The backend named by `cfg.backend`."""
    return {"template": TemplateBackend, "local": LocalBackend, "openai": OpenAIBackend}[cfg.backend](cfg)


# ----------------------------------------------------------------------------------------------
# Resumable, append-only storage
# ----------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file written by `CoTStore`, first cutting a torn last line left by a killed run."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            log.warning("%s: line %d is not valid JSON; skipped", path, n)
    return out


class CoTStore:
    """`cot.jsonl` (accepted rows) and `rejects.jsonl`, appended one line per product and flushed at once.

    A product is done once it has a row or a final reject; rejects marked `retryable` (retries exhausted on
    transient errors) are tried again by the next run. Rows are read back deduplicated by uid, so even a
    file concatenated by hand never yields a product twice.
    """

    def __init__(self, out: Path):
        self.rows_path, self.rejects_path = out / "cot.jsonl", out / "rejects.jsonl"
        self.rows: dict[str, dict] = {}
        for r in _read_jsonl(self.rows_path):
            self.rows.setdefault(r["uid"], r)
        self.rejects: list[dict] = _read_jsonl(self.rejects_path)
        self._rows_fh = open(self.rows_path, "ab")  # noqa: SIM115 - closed in close()
        self._rej_fh = open(self.rejects_path, "ab")  # noqa: SIM115

    def done(self) -> set[str]:
        """Uids with a row or a final (non-retryable) reject."""
        final = {r["uid"] for r in self.rejects if not r.get("retryable")}
        return set(self.rows) | final

    def add_row(self, row: dict) -> None:
        if row["uid"] in self.rows:
            return
        self._rows_fh.write(orjson.dumps(row) + b"\n")
        self._rows_fh.flush()
        self.rows[row["uid"]] = row

    def add_reject(self, rec: dict) -> None:
        self._rej_fh.write(orjson.dumps(rec) + b"\n")
        self._rej_fh.flush()
        self.rejects.append(rec)

    def close(self) -> None:
        for fh in (self._rows_fh, self._rej_fh):
            if not fh.closed:
                os.fsync(fh.fileno())
                fh.close()


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def _manifest(cfg: CoTConfig, data_dir: Path) -> dict[str, Any]:
    m = {"backend": cfg.backend, "model": cfg.model_name, "prompt_version": prompts.COT_PROMPT_VERSION, "seed": cfg.seed,
         "styles": list(cfg.styles), "data_dir": str(data_dir)}
    if cfg.backend == "openai":
        m["base_url"] = cfg.base_url
    if cfg.backend == "local":
        m["local_mode"] = cfg.local_mode
    return m


def _prepare_out(out: Path, cfg: CoTConfig, data_dir: Path) -> None:
    """Create `out`; refuse to mix rows of another backend/model/prompt version unless `overwrite`."""
    out.mkdir(parents=True, exist_ok=True)
    run_json = out / "run.json"
    new = _manifest(cfg, data_dir)
    old = read_json(run_json) if run_json.is_file() else {}
    if not old and (out / "cot.jsonl").is_file():  # rows without a manifest: judge them by their own backend
        first = _read_jsonl(out / "cot.jsonl")[:1]
        old = {"backend": first[0].get("backend")} if first else {}
    # Template rows take a second and follow the code, so they are rebuilt rather than resumed: a changed
    # template can then never leave stale rows behind. Rows of a model are never discarded that way.
    if cfg.overwrite or (cfg.backend == "template" and old.get("backend", "template") == "template"):
        for name in ("cot.jsonl", "rejects.jsonl", "cot.parquet", "stats.json", "README.md", "run.json",
                     *(f"{s}.parquet" for s in SPLITS)):
            (out / name).unlink(missing_ok=True)
    elif old and (out / "cot.jsonl").is_file():
        keys = ("backend", "model", "prompt_version", "seed", "styles")
        diff = {k: (old.get(k), new[k]) for k in keys if old.get(k) != new[k]}
        if diff:
            raise ValueError(
                f"{out}: holds rows made with {', '.join(f'{k}={a!r}' for k, (a, _) in diff.items())}; this run asks for "
                f"{', '.join(f'{k}={b!r}' for k, (_, b) in diff.items())}. Use another out dir or overwrite=True (--overwrite)."
            )
    write_json(run_json, new)


def run_cot(
    cfg: CoTConfig,
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
    backend: Backend | None = None,
) -> dict[str, Any]:
    """Run stage 02: generate, gate and store CoT rows for the selected products; resume where a run stopped.

    Args:
        cfg: stage settings.
        data_dir: stage 01 output folder (default `cfg.data_dir`).
        out_dir: output folder (default `cfg.out_dir`).
        progress: show a tqdm bar over products.
        backend: a ready backend (tests, benchmarks); default `make_backend(cfg)`.

    Returns:
        The stats dict (also in `out_dir/stats.json`): funnel, rejects by reason, retries, splits, rows/s.

    Raises:
        FileNotFoundError: stage 01 output is missing.
        ValueError: `out_dir` holds rows of another backend/model/prompt version.
        prodtune.llm_client.FatalError: the endpoint refused the key or does not exist (rows done so far are kept).
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    data = Path(data_dir or cfg.data_dir)
    out = Path(out_dir or cfg.out_dir)
    for p, what in ((data, "data_dir"), (out, "out_dir")):
        if "{" in str(p):
            raise ValueError(f"CoTConfig.{what}: {p} still holds a template; build the config with prodtune.config.stage_config")
    products = load_products(data, cfg.seed, cfg.styles)
    selected = products[: cfg.n] if cfg.n else products
    _prepare_out(out, cfg, data)
    store = CoTStore(out)
    done = store.done()
    todo = [it for it in selected if it.uid not in done]
    index = QuestionIndex(cfg.dedup_threshold)
    for uid, r in store.rows.items():
        index.add(r["Question"], uid)
    gates = Gates(cfg)
    run_counts: Counter = Counter()
    log.info("cot %s: %d products selected, %d already done, %d to generate -> %s", cfg.backend, len(selected),
             len(selected) - len(todo), len(todo), out)

    bar = tqdm(total=len(selected), initial=len(selected) - len(todo), desc=f"cot {cfg.backend}", unit="product",
               disable=not progress, mininterval=0.5)
    model = cfg.model_name if cfg.backend != "template" else "template"

    def on_result(res: GenResult) -> None:
        it, ans = res.item, res.answer
        base = {"uid": it.uid, "title": it.title, "split": it.split, "style": it.style}
        reason, detail = res.reason, res.detail
        if ans is not None:
            reason, detail = gates.check(it, ans)
            if reason is None:
                sim, other = index.nearest(ans.Question)
                if sim >= cfg.dedup_threshold:
                    reason, detail = "near_duplicate", f"Jaccard {sim:.2f} with the question of {other}"
        if ans is not None and reason is None:
            index.add(ans.Question, it.uid)
            store.add_row({**base, **ans.model_dump(), "backend": backend_obj.name, "model": backend_obj.model,
                           "prompt_version": prompts.COT_PROMPT_VERSION, "meta": res.meta})
            run_counts["accepted"] += 1
        else:
            rec = {**base, "reason": reason or "unknown", "detail": detail, "retryable": res.retryable,
                   "answer": ans.model_dump() if ans is not None else None, "raw": res.raw[:2000], "meta": res.meta}
            store.add_reject(rec)
            run_counts["rejected" if not res.retryable else "failed_retryable"] += 1
        bar.update(1)

    # Loading a model (local backend) only when something is left to generate keeps a finished rerun instant.
    backend_obj = backend or (make_backend(cfg) if todo else None)
    if backend_obj is not None:
        model = backend_obj.model
    try:
        if todo:
            backend_obj.run(todo, on_result)
    finally:
        bar.close()
        store.close()
    gen_s = time.perf_counter() - t0
    stats = summarize(store, cfg, selected, len(products), model)
    stats["this_run"] = {
        "generated": len(todo), **dict(run_counts), "seconds": round(gen_s, 3),
        "rows_per_s": round(len(todo) / gen_s, 3) if todo and gen_s > 0 else None,
        "resumed_done": len(selected) - len(todo),
    }
    if isinstance(backend_obj, OpenAIBackend) and hasattr(backend_obj, "client"):
        stats["this_run"]["structured_output"] = backend_obj.rf_mode
    write_outputs(out, store, products, stats)
    log.info("cot %s: %d rows (%s), %d rejected, %d to retry; wrote %s in %.1fs", cfg.backend, stats["rows"],
             stats["splits"], stats["rejected"], stats["pending_retryable"], out, time.perf_counter() - t0)
    return stats


def summarize(store: CoTStore, cfg: CoTConfig, selected: list[Item], n_products: int, model: str) -> dict[str, Any]:
    """Stats over everything in the store (all runs so far): funnel, rejects by reason, retries, tokens."""
    sel = {it.uid for it in selected}
    latest: dict[str, dict] = {}
    for r in store.rejects:
        if r["uid"] not in store.rows:
            latest[r["uid"]] = r  # the last decision about a product counts
    final = {u: r for u, r in latest.items() if not r.get("retryable")}
    pending = {u: r for u, r in latest.items() if r.get("retryable")}
    by_reason = Counter(r["reason"] for r in final.values())
    http: Counter = Counter()
    invalid: Counter = Counter()
    tokens = Counter()
    truncated = 0
    for rec in [*store.rows.values(), *store.rejects]:  # every attempt costs, superseded ones included
        m = rec.get("meta") or {}
        http.update(m.get("retries") or {})
        invalid.update(m.get("invalid_answers") or {})
        tokens["prompt"] += m.get("prompt_tokens", 0)
        tokens["completion"] += m.get("completion_tokens", 0)
        truncated += bool(m.get("truncated"))
    n_sel_done = len(sel & set(store.rows)) + len(sel & set(final))
    answered = len(store.rows) + sum(v for k, v in by_reason.items() if k in GATES)
    left = answered
    funnel = [["products attempted", len(store.rows) + len(latest)], ["valid answer", answered]]
    for g in GATES:
        left -= by_reason.get(g, 0)
        funnel.append([GATE_LABELS[g], left])
    splits = Counter(r["split"] for r in store.rows.values())
    stats = {
        "backend": cfg.backend,
        "model": model,
        "prompt_version": prompts.COT_PROMPT_VERSION,
        "seed": cfg.seed,
        "products_available": n_products,
        "products_selected": len(selected),
        "complete": n_sel_done == len(selected),
        "rows": len(store.rows),
        "rejected": len(final),
        "pending_retryable": len(pending),
        "splits": {s: splits.get(s, 0) for s in SPLITS},
        "styles": dict(Counter(r["style"] for r in store.rows.values())),
        "funnel": funnel,
        "gates": {g: by_reason.get(g, 0) for g in GATES},
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "pending_by_reason": dict(Counter(r["reason"] for r in pending.values())),
        "retries": {"http": dict(sorted(http.items())), "http_total": sum(http.values()),
                    "invalid_answers": dict(sorted(invalid.items())), "invalid_total": sum(invalid.values())},
        "truncated_answers": truncated,
        "tokens": dict(tokens),
        "pass_rate": round(len(store.rows) / max(1, len(store.rows) + len(final)), 4),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("overwrite",)},
    }
    return stats


def _rows_table(rows: list[dict], columns: tuple[str, ...]) -> pa.Table:
    schema = pa.schema([(c, pa.string()) for c in columns])
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)


def write_outputs(out: Path, store: CoTStore, products: list[Item], stats: dict[str, Any]) -> None:
    """Write `cot.parquet`, the split files, `stats.json` and the dataset card from the store (atomically)."""
    order = {it.uid: it.order for it in products}
    rows = sorted(store.rows.values(), key=lambda r: (order.get(r["uid"], len(order)), r["uid"]))
    for name, table in [("cot", _rows_table(rows, ROW_COLUMNS))] + [
        (s, _rows_table([r for r in rows if r["split"] == s], SPLIT_COLUMNS)) for s in SPLITS
    ]:
        with atomic_path(out / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
    write_json(out / "stats.json", stats)
    write_text(out / "README.md", dataset_card(stats))


def _size_category(n: int) -> str:
    for lim, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return name
    return "1M<n<10M"


def dataset_card(stats: dict[str, Any]) -> str:
    """The dataset card (README.md with the Hub's YAML header) for the CoT dataset described by `stats`."""
    backend = stats["backend"]
    header = {
        "pretty_name": f"prodtune product CoT ({backend} backend)",
        "language": ["en"],
        "license": "other",
        "task_categories": ["text-generation", "question-answering"],
        "tags": ["synthetic", "chain-of-thought", "e-commerce", "prodtune", f"backend-{backend}"],
        "size_categories": [_size_category(stats["rows"])],
        # `datasets` fails on an empty split file, so only splits with rows are declared (all files exist).
        "configs": [{"config_name": "default", "data_files": [
            {"split": s, "path": f"{s}.parquet"} for s in SPLITS if stats["splits"][s] or not stats["rows"]]}],
    }
    import yaml

    if backend == "template":
        kind = ("**Template rows, not LLM output.** Every row was built deterministically by `prodtune.cot.template_answer` "
                "from the product's own sentences and numbers, without any language model. They let the offline pipeline "
                "run end to end; do not use them as reasoning data.")
    elif backend == "local":
        kind = (f"Generated offline by the local model `{stats['model']}` (greedy, JSON skeleton "
                f"`{stats['config'].get('local_mode')}` mode), then filtered by the quality gates below.")
    else:
        kind = f"Generated by `{stats['model']}` through an OpenAI-compatible API, then filtered by the quality gates below."
    funnel = "\n".join(f"| {step} | {n} |" for step, n in stats["funnel"])
    reasons = "\n".join(f"| {k} | {v} |" for k, v in stats["rejected_by_reason"].items()) or "| (none) | 0 |"
    return (
        "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n"
        f"# prodtune product CoT dataset ({backend})\n\n{kind}\n\n"
        "Each row holds a shopper's question about one product (`Question`), step-by-step reasoning that uses only "
        "the product's title and description (`Complex_CoT`) and a concise answer (`Response`), in the column layout "
        "of the study's published dataset. `uid`/`title` name the product (AmazonTitles-1.3MM via prodtune stage 01); "
        "a row's split is its product's split in stage 01, so no product appears in two splits.\n\n"
        "| field | value |\n|---|---|\n"
        f"| source | prodtune stage 01 prepared splits (`{stats['config'].get('data_dir')}`) |\n"
        f"| backend | `{backend}` |\n| model | `{stats['model']}` |\n| prompt version | `{stats['prompt_version']}` |\n"
        f"| seed | {stats['seed']} |\n| rows | {stats['rows']} ({', '.join(f'{k} {v}' for k, v in stats['splits'].items())}) |\n"
        f"| question styles | {', '.join(f'{k} {v}' for k, v in sorted(stats['styles'].items()))} |\n"
        f"| retries (HTTP / invalid answers) | {stats['retries']['http_total']} / {stats['retries']['invalid_total']} |\n\n"
        "## Quality gates\n\nAnswers must be valid JSON with exactly `Question`, `Complex_CoT`, `Response`; have bounded "
        f"lengths; not loop (at least {stats['config'].get('min_distinct'):.0%} distinct word 3-grams in reasoning and answer); "
        "use no number absent from the title, description or question; have at least "
        f"{stats['config'].get('min_overlap')} of the answer's content words in the source; reproduce less than "
        f"{stats['config'].get('max_copy_ratio'):.0%} of the description; and ask a question that is not a near-duplicate "
        f"(word 3-gram Jaccard < {stats['config'].get('dedup_threshold')}) of an accepted one.\n\n"
        f"| step | products |\n|---|---|\n{funnel}\n\n| rejected because | products |\n|---|---|\n{reasons}\n\n"
        "## Use\n\n```python\nfrom datasets import load_dataset\nds = load_dataset(\"path/to/this/folder\")  # train / validation / test\n```\n\n"
        "Made with `prodtune cot` (stage 02); `cot.jsonl` keeps per-row generation metadata, `rejects.jsonl` every rejected answer "
        "with its reason.\n"
    )


def funnel(stats: dict[str, Any]) -> list[tuple[str, int]]:
    """The gate funnel as (step, products remaining) pairs, for tables and plots."""
    return [(s, n) for s, n in stats["funnel"]]


def load_rows(out_dir: str | Path, split: str | None = None) -> "Any":
    """The accepted rows as a pandas DataFrame: `cot.parquet`, or one split's file."""
    import pandas as pd

    path = Path(out_dir) / f"{split or 'cot'}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run stage 02 (prodtune cot / notebook 02) first")
    return pd.read_parquet(path)


def load_rejects(out_dir: str | Path) -> "Any":
    """Every rejected answer with its reason as a pandas DataFrame (latest decision per product)."""
    import pandas as pd

    recs = _read_jsonl(Path(out_dir) / "rejects.jsonl")
    df = pd.DataFrame(recs, columns=["uid", "title", "split", "style", "reason", "detail", "retryable", "answer", "raw", "meta"])
    return df.drop_duplicates("uid", keep="last").reset_index(drop=True)


def push_to_hub(out_dir: str | Path, repo_id: str, token: str | None = None, private: bool = True) -> str:
    """Upload the dataset (card + splits) to the Hugging Face Hub; needs a token (`HF_TOKEN` or `token`).

    The card is uploaded first, so `datasets`' push keeps its text and only updates the YAML metadata
    (`configs`, `dataset_info`) for the files it writes under `data/`.

    Args:
        out_dir: a stage 02 output folder.
        repo_id: `user/name` of the dataset repository (created if missing).
        token: a write token; default `$HF_TOKEN`.
        private: create the repository private.

    Returns:
        The dataset's URL.
    """
    from datasets import DatasetDict, load_dataset
    from huggingface_hub import HfApi

    out = Path(out_dir)
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise ValueError("push_to_hub needs a Hugging Face write token: set HF_TOKEN or pass token=")
    files = {s: str(out / f"{s}.parquet") for s in SPLITS if (out / f"{s}.parquet").is_file() and pq.read_metadata(out / f"{s}.parquet").num_rows}
    if not files:
        raise FileNotFoundError(f"{out}: no non-empty split parquet files; run stage 02 first")
    dd = DatasetDict(load_dataset("parquet", data_files=files))
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(path_or_fileobj=str(out / "README.md"), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
    dd.push_to_hub(repo_id, token=token)
    url = f"https://huggingface.co/datasets/{repo_id}"
    log.info("cot: pushed %s to %s", out, url)
    return url


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register `prodtune cot`."""
    p = sub.add_parser("cot", help="stage 02: generate the chain-of-thought dataset (template, local or openai backend)")
    p.add_argument("--backend", choices=BACKENDS, help="template (offline, no model) | local (transformers) | openai (API)")
    p.add_argument("--data", help="stage 01 output folder (default: the profile's data_dir/prepared)")
    p.add_argument("--out", help="output folder (default: the profile's data_dir/cot)")
    p.add_argument("--n", type=int, help="number of products (seeded order over all splits)")
    p.add_argument("--model", help="model name (openai) or hub id / path / embedded:* (local)")
    p.add_argument("--base-url", help="OpenAI-compatible API root, e.g. http://localhost:8000/v1")
    p.add_argument("--api-key-env", help="environment variable with the API key (default OPENAI_API_KEY)")
    p.add_argument("--concurrency", type=int, help="requests in flight (openai backend)")
    p.add_argument("--timeout-s", type=float, help="per-request timeout")
    p.add_argument("--seed", type=int)
    p.add_argument("--overwrite", action="store_true", help="discard earlier output in --out and start again")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="then upload to this Hub dataset repo (needs HF_TOKEN)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    from prodtune.config import stage_config

    cfg = stage_config(
        CoTConfig, args.profile, "cot", args.set,
        backend=args.backend, data_dir=args.data, out_dir=args.out, n=args.n, model=args.model, base_url=args.base_url,
        api_key_env=args.api_key_env, concurrency=args.concurrency, timeout_s=args.timeout_s, seed=args.seed,
        overwrite=True if args.overwrite else None,
    )
    stats = run_cot(cfg, progress=not args.no_progress)
    keys = ("backend", "model", "rows", "rejected", "pending_retryable", "splits", "gates", "rejected_by_reason", "retries", "this_run")
    print(orjson.dumps({k: stats[k] for k in keys}).decode())
    if args.push_to_hub:
        print(push_to_hub(cfg.out_dir, args.push_to_hub))
    return 0 if stats["complete"] else 3
