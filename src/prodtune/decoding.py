"""Decoding settings a run card records (`generation`) as logits processors: anti-loop decoding over the generated
text only, and the DeepSeek track's no-EOS-inside-`<think>`. Used by `models.generate`/`generation_kwargs` (stage 06,
notebooks, generate/chat/serve alike), so every caller decodes a run the same way.
"""

from __future__ import annotations

from typing import Any, Sequence

from prodtune.prompts import THINK_CLOSE


# The anti-loop decoding looks at the generated text only, never the prompt: transformers' own `no_repeat_ngram_size`
# bans every n-gram of the prompt too, so a RAG answer could not quote its retrieved context, nor a description
# repeat its product's title (measured on real validation rows: the fine-tuned model with RAG fell from copying a
# close neighbour to ignoring it). Part of the generation cache keys, so older cached generations are not reused.
ANTI_LOOP_SCOPE = "generated-text"


def anti_loop_processors(prompt_length: int, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                         think_before_eos: bool = False, tokenizer: Any = None, eos_ids: Sequence[int] = ()) -> Any:
    """Logits processors that stop loops in the text generated after `prompt_length` tokens (left-padded batches
    share it): a repetition penalty on tokens already generated, and no repeated token n-gram of the generated text;
    with `think_before_eos` (the DeepSeek track), no EOS until the reply has closed its `</think>` and begun an
    answer (`ThinkBeforeEOS`; needs `tokenizer` and `eos_ids`)."""
    from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

    class GeneratedNoRepeatNGram(NoRepeatNGramLogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            return super().__call__(input_ids[:, prompt_length:], scores)

    from transformers import LogitsProcessorList

    out = LogitsProcessorList()  # empty (falsy) when all are off
    if repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(float(repetition_penalty), prompt_ignore_length=prompt_length))
    if no_repeat_ngram_size:
        out.append(GeneratedNoRepeatNGram(int(no_repeat_ngram_size)))
    if think_before_eos:
        if tokenizer is None or not eos_ids:
            raise ValueError("think_before_eos needs the tokenizer and the EOS ids")
        out.append(ThinkBeforeEOS(tokenizer, prompt_length, eos_ids))
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
