"""Stage 02's `template` backend: deterministic, offline rows built from each product's own sentences and numbers.

    python -c "from prodtune.cot import load_products, template_answer; print(template_answer(load_products('data/cpu/prepared')[0]))"

No model is involved: the rows exercise the pipeline end to end and say so (`backend` column, dataset card);
they are not LLM data.
"""

from __future__ import annotations

import dataclasses
import re
import time

from prodtune.cot.backends import Backend, GenResult, OnResult
from prodtune.cot.config import CoTAnswer, CoTConfig
from prodtune.cot.gates import sentences
from prodtune.cot.products import Item, short_name, stable_hash

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
    k = stable_hash("phrasing", item.uid)
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
