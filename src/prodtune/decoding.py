"""Decoding settings a run card records (`generation`) as logits processors: anti-loop decoding over the generated
text only, and the DeepSeek track's no-EOS-inside-`<think>`. Used by `models.generate`/`generation_kwargs` (stage 06,
notebooks, generate/chat/serve alike), so every caller decodes a run the same way. `greedy_pruned` is the greedy
loop `models.generate` runs on a CPU: a row that reached EOS leaves the batch.

    python benchmarks/bench_evaluate.py     # stage 06 with this loop and with transformers' generate, same outputs
"""

from __future__ import annotations

from typing import Any, Sequence

from prodtune.prompts import THINK_CLOSE


# The anti-loop decoding looks at the generated text only, never the prompt: transformers' own `no_repeat_ngram_size`
# bans every n-gram of the prompt too, so a RAG answer could not quote its retrieved context, nor a description
# repeat its product's title (measured on real validation rows: the fine-tuned model with RAG fell from copying a
# close neighbour to ignoring it). Part of the generation cache keys, so older cached generations are not reused.
ANTI_LOOP_SCOPE = "generated-text"

# The greedy loops `models.generate` can run (`engine`; stage 06's `evaluate.engine`): auto picks pruned on a CPU.
ENGINES = ("auto", "pruned", "transformers")


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

    def select(self, keep: Sequence[int]) -> None:
        """The batch kept only rows `keep` (in that order; `greedy_pruned` drops finished rows): renumber `done`."""
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


def greedy_pruned(model: Any, input_ids: Any, attention_mask: Any, *, max_new_tokens: int, eos_ids: Sequence[int],
                  pad_token_id: int, logits_processor: Any = None) -> Any:
    """Greedy decoding of a left-padded batch in which a row that produced EOS leaves the batch (its KV cache rows
    are dropped, `DynamicCache.batch_select_indices`), so the rows still generating are the only ones computed.

    transformers' `generate` keeps every row until the last one ends: on a CPU, where a step's cost grows with the
    rows in it, a batch whose answers end at 40..160 tokens spent most of its steps on finished rows. The tokens are
    those of `model.generate(do_sample=False)` with the same processors (the same forward per row; position ids from
    the attention mask, as transformers computes them): `tests/unit/test_decoding.py` and
    `benchmarks/bench_evaluate.py` compare the two. Stateful processors follow the pruning through their
    `select(keep)` (`ThinkBeforeEOS`); the anti-loop ones read only the rows they are given.

    Args:
        model: a causal LM (peft or plain) that takes `past_key_values`, `position_ids` and `logits_to_keep`.
        input_ids, attention_mask: the left-padded prompts, `[rows, prompt tokens]`.
        max_new_tokens: steps at most.
        eos_ids: token ids that end a row (kept in the output, as `generate` does).
        pad_token_id: what fills a row after its EOS.
        logits_processor: a `LogitsProcessorList` (or None), called on the active rows' ids and scores.

    Returns:
        A `[rows, max_new_tokens]` LongTensor of the generated tokens, `pad_token_id` after each row's EOS (or
        fewer columns when every row ended sooner).
    """
    import torch
    from transformers import DynamicCache

    n_rows = input_ids.shape[0]
    eos = torch.tensor(sorted(set(eos_ids)), device=input_ids.device)
    out = torch.full((n_rows, max_new_tokens), pad_token_id, dtype=torch.long, device=input_ids.device)
    active = torch.arange(n_rows, device=input_ids.device)
    ids, mask = input_ids, attention_mask
    try:
        cache = DynamicCache(config=model.config)
    except TypeError:  # older transformers: no config argument
        cache = DynamicCache()
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # left padding: each row counts from its first real token
    step_ids, used = ids, 0
    with torch.inference_mode():
        for t in range(max_new_tokens):
            res = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            cache = res.past_key_values
            scores = res.logits[:, -1, :].to(dtype=torch.float32)
            if logits_processor:
                scores = logits_processor(ids, scores)
            nxt = scores.argmax(-1)
            out[active, t] = nxt
            used = t + 1
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            pos = pos[:, -1:] + 1
            done = torch.isin(nxt, eos)
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)
                if keep.numel() == 0:
                    break
                active, ids, mask, pos, nxt = active[keep], ids[keep], mask[keep], pos[keep], nxt[keep]
                cache.batch_select_indices(keep)
                for proc in logits_processor or ():
                    if hasattr(proc, "select"):
                        proc.select(keep.tolist())
            step_ids = nxt[:, None]
    return out[:, :used]
