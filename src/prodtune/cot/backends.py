"""One interface for stage 02's three generators: `Backend.run(items, on_result)`; `make_backend(cfg)` picks one.

    python -c "from prodtune.cot import CoTConfig, make_backend; print(make_backend(CoTConfig()).name)"

* `template` (`prodtune.cot.template`): deterministic and offline, rows built from each product's own facts.
* `local` (`prodtune.cot.local`): a transformers model writing the JSON, its skeleton forced.
* `openai` (`prodtune.cot.openai_backend`): any OpenAI-compatible endpoint through the official `openai` client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from prodtune.cot.config import CoTAnswer, CoTConfig
from prodtune.cot.products import Item


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

    def run_info(self) -> dict[str, Any]:
        """What the last `run` settled on that stats should show (e.g. the structured-output mode a server took)."""
        return {}


def make_backend(cfg: CoTConfig) -> Backend:
    """The backend named by `cfg.backend` (the local one loads its model here)."""
    if cfg.backend == "local":
        from prodtune.cot.local import LocalBackend

        return LocalBackend(cfg)
    if cfg.backend == "openai":
        from prodtune.cot.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg)
    from prodtune.cot.template import TemplateBackend

    return TemplateBackend(cfg)
