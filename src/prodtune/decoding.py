"""Decoding settings a run card records (`generation`, the table `DECODING`) as logits processors: anti-loop decoding
over the generated text only, a shortest answer, claims grounded in the prompt, and the DeepSeek track's
no-EOS-inside-`<think>` and reasoning budget. Used by `models.generate`/`generation_kwargs` (stage 06,
notebooks, generate/chat/serve alike), so every caller decodes a run the same way; the greedy loop that runs them on
a CPU is `prodtune.greedy`.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from prodtune.metrics import FUNCTION_WORDS
from prodtune.prompts import THINK_CLOSE


# The anti-loop decoding looks at the generated text only, never the prompt: transformers' own `no_repeat_ngram_size`
# bans every n-gram of the prompt too, so a RAG answer could not quote its retrieved context, nor a description
# repeat its product's title (measured on real validation rows: the fine-tuned model with RAG fell from copying a
# close neighbour to ignoring it). Part of the generation cache keys, so older cached generations are not reused.
ANTI_LOOP_SCOPE = "generated-text"

# The greedy loops `models.generate` can run (`engine`; stage 06's `evaluate.engine`): auto picks pruned on a CPU.
ENGINES = ("auto", "pruned", "transformers")


# Every decoding setting a run card can record (`generation`), with its "off" value: one table for the train config,
# the card, stage 06, generate/chat/serve and the tuning script. Chosen on validation (benchmarks/tune_decoding.py).
DECODING: dict[str, Any] = {
    "repetition_penalty": 1.0,   # > 1 discourages tokens the generated text already holds
    "no_repeat_ngram_size": 0,   # no repeated token n-gram of the generated text
    "min_new_tokens": 0,         # no EOS before this many tokens
    "ground_claims": False,      # no number or brand-like word the prompt lacks (GroundedClaims)
    "think_before_eos": False,   # DeepSeek track: no EOS before </think> and an answer (ThinkBeforeEOS)
    "think_budget": 0,           # DeepSeek track: reasoning closed after this many tokens (ThinkBudget)
}
# Recorded in every cache key even when off (the first two settings there were): the others only when on, so
# generations cached before a setting existed stay valid.
_ALWAYS_KEYED = ("repetition_penalty", "no_repeat_ngram_size")


def decoding_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
    """Settings normalised as a run card and the caches record them: the two anti-loop numbers always, every other
    setting only when it is on; unknown names are an error (a typo would silently decode otherwise)."""
    settings = dict(settings or {})
    bad = sorted(set(settings) - set(DECODING))
    if bad:
        raise ValueError(f"unknown decoding setting(s) {bad}; known: {', '.join(DECODING)}")
    out: dict[str, Any] = {}
    for name, off in DECODING.items():
        value = type(off)(settings.get(name) if settings.get(name) is not None else off)
        if name in _ALWAYS_KEYED or value != off:
            out[name] = value
    return out


def describe_decoding(settings: dict[str, Any] | None) -> str:
    """The settings that are on, in words, for the report ("" when decoding is plain greedy)."""
    s = decoding_settings(settings)
    words = []
    if s["repetition_penalty"] != 1.0:
        words.append(f"repetition penalty {s['repetition_penalty']:g}")
    if s["no_repeat_ngram_size"]:
        words.append(f"no repeated {s['no_repeat_ngram_size']}-gram")
    if s.get("min_new_tokens"):
        words.append(f"no EOS before {s['min_new_tokens']} new tokens")
    if s.get("ground_claims"):
        words.append("no number or brand-like word the prompt lacks")
    if s.get("think_before_eos"):
        words.append("no EOS before `</think>` and an answer")
    if s.get("think_budget"):
        words.append(f"reasoning closed after {s['think_budget']} tokens")
    return ", ".join(words)


def anti_loop_processors(prompt_length: int, tokenizer: Any = None, eos_ids: Sequence[int] = (),
                         sources: Sequence[str] | None = None, greedy: bool = True, **settings: Any) -> Any:
    """The logits processors of decoding `settings` (names and "off" values: `DECODING`), over the text generated
    after `prompt_length` tokens (left-padded batches share it): a repetition penalty on tokens already generated;
    no repeated token n-gram of the generated text; no EOS before `min_new_tokens`; with `think_before_eos` (the
    DeepSeek track), no EOS until the reply has closed its `</think>` and begun an answer (`ThinkBeforeEOS`; needs
    `tokenizer` and `eos_ids`); with `think_budget`, a reply still reasoning after that many tokens is made to close
    it and answer (`ThinkBudget`); with `ground_claims`, no number or brand-like word that the row's source text
    (`sources`, one per row: its prompt) lacks (`GroundedClaims`, last, so that it sees the final scores)."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor, NoRepeatNGramLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)

    s = {**DECODING, **decoding_settings(settings)}

    class GeneratedNoRepeatNGram(NoRepeatNGramLogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            return super().__call__(input_ids[:, prompt_length:], scores)

    out = LogitsProcessorList()  # empty (falsy) when all are off
    if s["repetition_penalty"] != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(s["repetition_penalty"]), prompt_ignore_length=prompt_length))
    if s["no_repeat_ngram_size"]:
        out.append(GeneratedNoRepeatNGram(int(s["no_repeat_ngram_size"])))
    if s["min_new_tokens"]:
        if not eos_ids:
            raise ValueError("min_new_tokens needs the EOS ids")
        out.append(MinNewTokensLengthLogitsProcessor(prompt_length, int(s["min_new_tokens"]), list(eos_ids)))
    if s["think_before_eos"]:
        if tokenizer is None or not eos_ids:
            raise ValueError("think_before_eos needs the tokenizer and the EOS ids")
        out.append(ThinkBeforeEOS(tokenizer, prompt_length, eos_ids))
    if s["think_budget"]:
        if tokenizer is None:
            raise ValueError("think_budget needs the tokenizer")
        out.append(ThinkBudget(tokenizer, prompt_length, int(s["think_budget"])))
    if s["ground_claims"]:
        if tokenizer is None or sources is None:
            raise ValueError("ground_claims needs the tokenizer and one source text per row")
        out.append(GroundedClaims(tokenizer, prompt_length, sources, greedy=greedy))
    return out


class ThinkBeforeEOS:
    """A logits processor for R1-style replies: EOS is banned until the generated text holds `</think>` followed by
    some answer text, so a reply cannot stop inside its reasoning.

    Seen on the real rows' validation questions (SmolLM2 + the DeepSeek-track adapter): a third of the replies ended
    at EOS right after the reasoning's last sentence, without `</think>` or an answer, although every training target
    closes the block. A reply that never closes it now runs to `max_new_tokens` and is counted as endless, never as
    adherent. The text is decoded per row (special tokens kept: R1's `</think>` is an added token) until the row is
    satisfied; rows already satisfied cost nothing.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, eos_ids: Sequence[int]):
        self.tok, self.start, self.eos = tokenizer, prompt_length, sorted(set(eos_ids))
        self.done: set[int] = set()

    def select(self, keep: Sequence[int]) -> None:
        """The batch kept only rows `keep` (in that order; `greedy.greedy_stream` drops finished rows): renumber `done`."""
        self.done = {new for new, old in enumerate(keep) if old in self.done}

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        for r in range(input_ids.shape[0]):
            if r in self.done:
                continue
            text = self.tok.decode(input_ids[r, self.start:], skip_special_tokens=False)
            if THINK_CLOSE in text and text.split(THINK_CLOSE, 1)[1].strip():
                self.done.add(r)
            else:
                scores[r, self.eos] = float("-inf")
        return scores


class ThinkBudget:
    """A logits processor for R1-style replies: a reply whose reasoning is still open after `budget` generated tokens
    is made to write `\n</think>\n\n` (R1's layout, token by token) and then goes on freely, so it answers within
    `max_new_tokens` ("budget forcing", as in s1: Muennighoff et al., 2025).

    Seen on the real rows' test questions (SmolLM2 + the DeepSeek-track adapter, 384 new tokens): 6 of 64 replies
    were still reasoning at the token limit, so they had no answer. Rows leave with `select` (`greedy.greedy_stream`); the
    state is read from the text, so nothing needs renumbering but the rows already closed.
    """

    def __init__(self, tokenizer: Any, prompt_length: int, budget: int):
        if budget < 1:
            raise ValueError(f"think_budget: {budget}; must be >= 1 (0 turns it off)")
        self.tok, self.start, self.budget = tokenizer, prompt_length, budget
        self.close = tokenizer(f"\n{THINK_CLOSE}\n\n", add_special_tokens=False)["input_ids"]
        self.done: set[int] = set()

    def select(self, keep: Sequence[int]) -> None:
        self.done = {new for new, old in enumerate(keep) if old in self.done}

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        n = input_ids.shape[1] - self.start
        if n < self.budget:
            return scores
        for r in range(input_ids.shape[0]):
            if r in self.done:
                continue
            gen = input_ids[r, self.start:].tolist()
            tail = gen[-len(self.close):]
            k = next((k for k in range(min(len(self.close) - 1, len(tail)), 0, -1) if tail[-k:] == self.close[:k]), 0)
            if k == 0 and THINK_CLOSE in self.tok.decode(gen, skip_special_tokens=False):
                self.done.add(r)  # closed its reasoning on its own: free from here on
                continue
            forced = self.close[k]
            keep = scores[r, forced].clone()
            scores[r, :] = float("-inf")
            scores[r, forced] = keep if keep.isfinite() else 0.0
            if k == len(self.close) - 1:
                self.done.add(r)  # this step writes the last token of the closing
        return scores


# What `metrics.claim_check` counts as a claim, as the text grows token by token: a number (digits, with "." or ","
# inside), and a capitalised word that does not start a sentence (its lower-cased letters).
_TRAILING_NUMBER = re.compile(r"\d+(?:[.,]\d+)*[.,]?$")
_TRAILING_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*$")  # a word being written (metrics' words, grown a token at a time)
_SOURCE_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_LOWER_PIECE = re.compile(r"^[Ġ▁][a-z]{2,}$")  # a vocabulary piece that is a space and a lower-case word
_SOURCE_WORD = re.compile(r"[A-Za-z][A-Za-z'’-]*")
_SENTENCE_END = re.compile(r"(?:^\s*|[.!?:;][\"'’”)\]]*\s+|\n\s*)$")  # as metrics.SENTENCE_SPLIT



class GroundedClaims:
    """A logits processor that lets a row state only the claims its source text holds: every number it writes must
    be (a prefix of) a number of its source, every capitalised word that does not start a sentence (a brand, a
    model name, a place) a word of its source, where the source is what the model was shown (the prompt: the title,
    and the retrieved products with RAG). `metrics.claim_check` counts such claims as unsupported when the product's
    own text lacks them; a small model fine-tuned on real descriptions learns to write specifics (sizes, counts,
    brand names) and, not knowing the product's, invents them.

    Greedy: the best token is checked and, while it would write an unsupported claim, banned and the next best taken
    (at most `max_tries` per row and step; when all of them are claims, the best plain lower-case word is taken,
    `lowercase_word_tokens`, so decoding never stalls and never steps round the name with dashes). A lone or second
    space is banned too: it was the small model's way round a banned name ("the  'A-New-Or-England' medal"). Sampling (`greedy=False`):
    the `max_tries` best tokens are all checked; the tail below them is not. A token is checked by the text it would make (the row's generated text decoded with it),
    so a claim split over several tokens is followed as it grows. Rows leave with `select` (`greedy.greedy_stream`).
    """

    def __init__(self, tokenizer: Any, prompt_length: int, sources: Sequence[str], max_tries: int = 64,
                 greedy: bool = True):
        self.tok, self.start, self.max_tries, self.greedy = tokenizer, prompt_length, max_tries, greedy
        self.safe = lowercase_word_tokens(tokenizer)
        self.numbers = [{n[:k] for n in _SOURCE_NUMBER.findall(src) for k in range(1, len(n) + 1)} for src in sources]
        # a source word's prefixes (a word is written a token at a time), and one-letter words only whole ("I", not
        # the "T" of a "Times" that was banned)
        words = [{*_SOURCE_WORD.findall(src), *FUNCTION_WORDS} for src in sources]
        self.words = [{w.lower()[:k] for w in ws for k in range(1 if len(w) == 1 else 2, len(w) + 1)} for ws in words]
        # and the words a capitalised word may end as: a prefix grows, but "Sh" (of "She") must not stop there
        # ("the author of The Sh ceilings": the measure reads a claim "sh"), nor be closed with a quote ("Cloiste'")
        self.spelt = [sorted({w.rstrip("'’-") for w in ws}) for ws in words]  # to complete a fragment with
        self.whole = [{w.lower() for w in sp} for sp in self.spelt]

    def select(self, keep: Sequence[int]) -> None:
        """The batch kept only rows `keep` (in that order): keep their sources."""
        self.numbers = [self.numbers[i] for i in keep]
        self.words = [self.words[i] for i in keep]
        self.whole = [self.whole[i] for i in keep]
        self.spelt = [self.spelt[i] for i in keep]

    def prefix_only(self, row: int, word: str) -> bool:
        """Whether a capitalised `word` (quotes and dashes after it aside) would be a claim if it ended here: more
        than one letter, and only a prefix of the source's words, not one of them."""
        core = word.rstrip("'’-")
        return len(core) > 1 and core.lower() not in self.whole[row]

    def fragment(self, row: int, text: str) -> Any:
        """The match of the capitalised mid-sentence word `text` ends with when it is only a prefix of the source's
        words (`prefix_only`), else None."""
        m = _TRAILING_WORD.search(text)
        if not m or not m.group(0)[0].isupper() or _SENTENCE_END.search(text[: m.start()]):
            return None
        return m if self.prefix_only(row, m.group(0)) else None

    def allowed(self, row: int, before: str, after: str) -> bool:
        """Whether the text `after` (= `before` + one token) adds no claim that row's source lacks."""
        new = after[len(before):] if after.startswith(before) else after
        if "  " in before[-1:] + new or (new and not new.strip(" ")):
            return False  # a lone or second space: the way round a banned word ("awarded the  'A-New-Or-England'")
        if any(c.isdigit() for c in new):
            m = _TRAILING_NUMBER.search(after)
            if m and m.group(0).rstrip(".,") not in self.numbers[row]:
                return False
        prev = self.fragment(row, before) if after.startswith(before) else None
        if prev:
            # a capitalised word that is only a prefix so far ("The Sh"): the token may grow it, not end it (a space,
            # a stop, EOS, a quote with a stop after it) short of a whole word of the source
            word = _SOURCE_WORD.match(after, prev.start()).group(0)
            if (prev.start() + len(word) < len(after) or not new) and self.prefix_only(row, word):
                return False
        m = _TRAILING_WORD.search(after)
        # the word grows by a letter, or by a dash / quote ("Re-----")
        if m and m.group(0)[0].isupper() and (any(c.isalpha() for c in new)
                                          or (new and m.start() < len(after) - len(new))):
            word = m.group(0).rstrip("'’").lower()  # as the measure reads it: a closing quote is not part of a word
            if not _SENTENCE_END.search(after[: m.start()]) and (
                    word not in self.words[row]
                    # a quote or dash may close a whole name ("Times'"), not a prefix ("Cloiste'")
                    or m.group(0)[-1] in "'’-" and self.prefix_only(row, m.group(0))):
                return False
        return True

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        for r in range(input_ids.shape[0]):
            gen = input_ids[r, self.start:].tolist()
            before = self.tok.decode(gen, skip_special_tokens=True)
            cands = torch.topk(scores[r], min(self.max_tries, scores.shape[-1])).indices.tolist()
            found = False
            for c in cands:
                if not torch.isfinite(scores[r, c]):
                    break
                if not self.allowed(r, before, self.tok.decode([*gen, c], skip_special_tokens=True)):
                    scores[r, c] = float("-inf")
                elif self.greedy:
                    found = True
                    break
            if self.greedy and not found:
                c = self.completion(r, gen, before, scores[r])
                if c is not None:  # a name begun from a prefix: the best token that finishes it as the source spells it
                    keep = torch.full_like(scores[r], float("-inf"))
                    keep[c] = scores[r, c]
                    scores[r] = keep
                    found = True
            if self.greedy and not found and self.safe is not None:
                # every one of the best tokens states an unsupported claim (the model wants a name here): the best
                # plain lower-case word instead of the claim, or of the dashes and quotes it would step round it with
                safe = self.safe[: scores.shape[-1]].to(scores.device)
                keep = torch.zeros(scores.shape[-1], dtype=torch.bool, device=scores.device)
                keep[: safe.shape[0]] = safe  # logits may be wider than the tokenizer (padded vocabulary)
                scores[r] = scores[r].masked_fill(~keep, float("-inf"))
        return scores

    def completion(self, row: int, gen: list[int], before: str, scores: Any) -> int | None:
        """When the row's text ends in a capitalised prefix ("The Sh") and none of the best tokens may follow it, the
        best-scored first token of a source word's rest ("e" of "She", "adow" of a title's "Shadow") that keeps the
        text grounded, or None (then the lower-case fallback; the prefix stays a claim)."""
        m = self.fragment(row, before)
        if m is None:
            return None
        frag = m.group(0).rstrip("'’-")
        best, best_score = None, float("-inf")
        for w in self.spelt[row]:
            if len(w) > len(frag) and w.lower().startswith(frag.lower()):
                ids = self.tok(w[len(frag):], add_special_tokens=False)["input_ids"]
                c = ids[0] if ids else None
                if (c is not None and c < scores.shape[-1] and float(scores[c]) > best_score
                        and self.allowed(row, before, self.tok.decode([*gen, c], skip_special_tokens=True))):
                    best, best_score = c, float(scores[c])
        return best


_SAFE_CACHE: dict[tuple[str, int], Any] = {}


def lowercase_word_tokens(tokenizer: Any) -> Any:
    """A bool mask over the vocabulary (as logits are: `len(tokenizer)` or wider) of the tokens that are a space and a
    lower-case word (byte-level BPE "Ġword", SentencePiece "▁word"): never a claim, whatever follows. None when the
    tokenizer has none (then `GroundedClaims` keeps its `max_tries` fallback). Cached per tokenizer."""
    import torch

    key = (getattr(tokenizer, "name_or_path", ""), len(tokenizer))
    if key not in _SAFE_CACHE:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        mask = torch.tensor([bool(p) and _LOWER_PIECE.match(p) is not None for p in pieces], dtype=torch.bool)
        _SAFE_CACHE[key] = mask if mask.any() else None
    return _SAFE_CACHE[key]
