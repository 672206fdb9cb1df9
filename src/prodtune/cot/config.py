"""Stage 02's settings (`CoTConfig`) and the answer every backend must produce (`CoTAnswer`, its JSON schema, its parser).

    python -c "from prodtune.cot import CoTConfig; print(CoTConfig())"
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from prodtune import prompts
from prodtune.config import ConfigError

SPLITS = ("train", "validation", "test")
FIELDS = ("Question", "Complex_CoT", "Response")
BACKENDS = ("template", "local", "openai")
STRUCTURED_OUTPUTS = ("json_schema", "json_object", "none")
LOCAL_MODES = ("fields", "free")
DEFAULT_MODELS = {"template": "template", "local": "embedded:smollm2-135m-instruct", "openai": "gpt-4o-mini"}
ROW_COLUMNS = ("uid", "title", "split", *FIELDS, "style", "backend", "model", "prompt_version")
SPLIT_COLUMNS = ("uid", "title", *FIELDS, "style", "backend", "model", "prompt_version")
GATES = ("length", "repetitive", "ungrounded_number", "low_overlap", "copies_description", "near_duplicate")
GATE_LABELS = {"length": "lengths in bounds", "repetitive": "not repetitive", "ungrounded_number": "numbers grounded",
               "low_overlap": "words from the source", "copies_description": "not a copy", "near_duplicate": "not a near-duplicate"}
ANSWER_ERRORS = ("invalid_json", "schema_violation", "refusal", "truncated")  # reasons a reply is not a valid answer
# Fields that steer a run but do not shape its rows: left out of stats.json's `config`.
RUN_CONTROL = ("overwrite", "progress", "push_to_hub", "hub_private")


@dataclass
class CoTConfig:
    """Settings of stage 02. Defaults are the offline CPU setting: the template backend over every product."""

    SECTION: ClassVar[str] = "cot"

    backend: str = field(default="template", metadata={"help": "template (offline, no model) | local (transformers) | openai (API)"})
    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "stage 01 output folder (train/validation/test.parquet)"})
    out_dir: str = field(default="{data_dir}/cot", metadata={"help": "where cot.jsonl, the splits, stats.json and the card go"})
    n: int | None = field(default=None, metadata={"help": "products to process (seeded order over all splits); null: all"})
    seed: int = field(default=3407, metadata={"help": "seed of product order, question styles and request seeds"})
    styles: list[str] = field(default_factory=lambda: list(prompts.COT_STYLES),
                              metadata={"help": f"question styles to draw from ({', '.join(prompts.COT_STYLES)})"})
    model: str | None = field(default=None, metadata={"help": "model name (openai) or hub id / path / embedded:* (local); null: the backend's default (local: local_model)"})
    overwrite: bool = field(default=False, metadata={"help": "delete earlier output in out_dir and start again"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar over products"})
    push_to_hub: str | None = field(default=None, metadata={"help": "then upload the dataset to this Hub repo id (user/name; needs HF_TOKEN); null: no upload"})
    hub_private: bool = field(default=True, metadata={"help": "create the Hub dataset repository private"})
    # openai backend (the `openai` client does the retries, backoff, Retry-After and timeouts)
    base_url: str = field(default="https://api.openai.com/v1", metadata={"help": "OpenAI-compatible API root, e.g. http://localhost:8000/v1"})
    api_key_env: str = field(default="OPENAI_API_KEY", metadata={"help": "environment variable holding the API key (the key itself is never a setting)"})
    concurrency: int = field(default=8, metadata={"help": "requests in flight at once (openai backend)"})
    timeout_s: float = field(default=60.0, metadata={"help": "per-request timeout in seconds (openai backend)"})
    max_retries: int = field(default=6, metadata={"help": "client retries of 408/409/429/5xx, timeouts and dropped connections per request"})
    max_invalid_retries: int = field(default=2, metadata={"help": "re-asks after malformed or schema-violating answers"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature (openai backend)"})
    max_tokens: int = field(default=700, metadata={"help": "completion token limit (openai backend)"})
    structured_output: str = field(default="json_schema", metadata={"help": "json_schema | json_object | none (response_format sent)"})
    few_shot: bool = field(default=True, metadata={"help": "include the worked example in the prompt"})
    # local backend
    local_model: str = field(default=DEFAULT_MODELS["local"], metadata={
        "help": "the local backend's model when `model` is null: hub id, path or embedded:* (GPU profiles: a 4-bit 8B "
                "instruct model, loaded like every inference model, models.load_for_inference)"})
    local_mode: str = field(default="fields", metadata={"help": "fields: forced JSON skeleton | free: JSON prefix only"})
    local_batch_size: int = field(default=8, metadata={"help": "products per generate() call (local backend)"})
    local_threads: int | None = field(default=None, metadata={"help": "torch CPU threads while generating; null: torch's default (1 avoids OpenMP spin-waits on busy shared cores)"})
    local_question_tokens: int = field(default=40, metadata={"help": "token cap of the question (local backend)"})
    local_cot_tokens: int = field(default=120, metadata={"help": "token cap of the reasoning (local backend)"})
    local_response_tokens: int = field(default=72, metadata={"help": "token cap of the answer (local backend)"})
    # quality gates
    min_question_chars: int = field(default=15, metadata={"help": "shortest question, in characters"})
    max_question_chars: int = field(default=400, metadata={"help": "longest question, in characters"})
    min_cot_chars: int = field(default=60, metadata={"help": "shortest reasoning, in characters"})
    max_cot_chars: int = field(default=3000, metadata={"help": "longest reasoning, in characters"})
    min_response_chars: int = field(default=20, metadata={"help": "shortest answer, in characters"})
    max_response_chars: int = field(default=1200, metadata={"help": "longest answer, in characters"})
    min_distinct: float = field(default=0.6, metadata={"help": "least share of distinct word 3-grams in reasoning and answer"})
    min_overlap: float = field(default=0.5, metadata={"help": "least share of the answer's content words found in the source"})
    max_copy_ratio: float = field(default=0.8, metadata={"help": "reject answers that reproduce this share of the description"})
    dedup_threshold: float = field(default=0.8, metadata={"help": "Jaccard of word 3-grams above which a question is a near-duplicate"})

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"CoTConfig.{name}: {getattr(self, name)!r} is not allowed; {allowed}")

        for name, choices in (("backend", BACKENDS), ("structured_output", STRUCTURED_OUTPUTS), ("local_mode", LOCAL_MODES)):
            if getattr(self, name) not in choices:
                raise bad(name, f"choose one of {', '.join(choices)}")
        if not self.styles or any(s not in prompts.COT_STYLES for s in self.styles):
            raise bad("styles", f"a non-empty list of {', '.join(prompts.COT_STYLES)}")
        if self.n is not None and self.n < 1:
            raise bad("n", "a positive number of products, or null for all")
        for name in ("concurrency", "local_batch_size", "local_question_tokens", "local_cot_tokens", "local_response_tokens",
                     "max_tokens"):
            if getattr(self, name) < 1:
                raise bad(name, "must be >= 1")
        if self.local_threads is not None and self.local_threads < 1:
            raise bad("local_threads", "must be >= 1, or null for torch's default")
        for name in ("max_retries", "max_invalid_retries", "temperature"):
            if getattr(self, name) < 0:
                raise bad(name, "must be >= 0")
        if self.timeout_s <= 0:
            raise bad("timeout_s", "must be > 0 seconds")
        for name in ("min_overlap", "min_distinct"):
            if not 0 <= getattr(self, name) <= 1:
                raise bad(name, "must be in [0, 1]")
        for name in ("max_copy_ratio", "dedup_threshold"):
            if not 0 < getattr(self, name) <= 1:
                raise bad(name, "must be in (0, 1]")
        for lo, hi in (("min_question_chars", "max_question_chars"), ("min_cot_chars", "max_cot_chars"),
                       ("min_response_chars", "max_response_chars")):
            if not 0 <= getattr(self, lo) <= getattr(self, hi):
                raise ConfigError(f"CoTConfig.{lo}/{hi}: {getattr(self, lo)} / {getattr(self, hi)} not allowed; "
                                  f"need 0 <= {lo} <= {hi}")
        if self.push_to_hub is not None and self.push_to_hub.count("/") != 1:
            raise bad("push_to_hub", "a Hub repo id such as user/name, or null")

    @property
    def model_name(self) -> str:
        """The model actually used: `model`, or the backend's default (`local_model` for the local backend)."""
        return self.model or (self.local_model if self.backend == "local" else DEFAULT_MODELS[self.backend])


def pick_backend(backend: str | None, base_url: str | None) -> str | None:
    """The backend a notebook asks for: `backend` when named; `openai` when only a server's `base_url` is given (a
    URL names an OpenAI-compatible endpoint, so that is the backend meant); None leaves the profile's choice (cpu:
    template, GPU profiles: local). An API key alone switches nothing: a key in the environment must not start paid
    requests by itself; name the backend (`openai`) for that."""
    return backend or ("openai" if base_url else None)


Config = CoTConfig


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
