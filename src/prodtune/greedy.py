"""The greedy loop `models.generate` runs on a CPU (`engine="pruned"`): continuous batching. Rows are admitted in
length order as others finish, the rows still generating share every forward pass (one read of the weights serves
them all), a finished row's KV cache is dropped, and attention reads grouped-query keys without copying them. The
tokens are those of transformers' `generate(do_sample=False)` with the same logits processors:
`tests/unit/test_greedy.py` and `benchmarks/bench_evaluate.py` compare them.

    python benchmarks/bench_evaluate.py     # stage 06 with this loop and with transformers' generate, same outputs

Why, measured on 2 cores (SmolLM2-135M, fp32): a decode step costs a fixed ~36 ms (the weights) plus ~2.3 ms a row,
so a batch that shrinks as its answers end (40..160 tokens) spends most steps on few rows; and transformers' SDPA
path copies the keys and values of every layer three times over (`repeat_kv`: 9 query heads, 3 key/value heads)
whenever there is a padding mask, which on 48 rows x 600 cached tokens took 38 ms a layer against 2 ms for
`scaled_dot_product_attention(enable_gqa=True)`, with bit-identical outputs.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

GQA_ATTENTION = "sdpa_gqa"  # the attention implementation `gqa_attention` registers with transformers


def _sdpa_gqa(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
              scaling: float | None = None, is_causal: bool | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' SDPA attention (`integrations.sdpa_attention`), but grouped-query keys and values are read in
    place (`enable_gqa`) instead of being repeated per query head when a mask is given."""
    import torch

    causal = query.shape[2] > 1 and attention_mask is None and (
        is_causal if is_causal is not None else getattr(module, "is_causal", True))
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling, is_causal=bool(causal),
        enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def gqa_attention(model: Any) -> Iterator[None]:
    """Within the block, a CPU model on transformers' SDPA attention whose key/value heads are fewer than its query
    heads (Llama 3, SmolLM2, R1-Distill) attends through `_sdpa_gqa`; anything else is left as it is. The same
    kernel on the same numbers: the outputs are bit-identical (tests/unit/test_greedy.py)."""
    cfg = getattr(model, "config", None)
    heads, kv = getattr(cfg, "num_attention_heads", None), getattr(cfg, "num_key_value_heads", None)
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:  # an older transformers: no attention registry
        AttentionInterface = None  # noqa: N806
    if (AttentionInterface is None or getattr(cfg, "_attn_implementation", None) != "sdpa" or not kv or kv == heads
            or next(model.parameters()).device.type != "cpu" or not hasattr(model, "set_attn_implementation")):
        yield
        return
    AttentionInterface.register(GQA_ATTENTION, _sdpa_gqa)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    model.set_attn_implementation(GQA_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation("sdpa")


def growing_cache(config: Any, reserve: int) -> Any:
    """A `DynamicCache` whose layers write each step's keys and values into a buffer allocated once, with room for
    `reserve` tokens after the first update (the prompt), and hand attention views of it, where `DynamicLayer`
    concatenates (copies) the whole cache at every step. The values are the same tensors, so attention and the tokens
    are unchanged; measured on 2 cores (SmolLM2, 15 rows x 400 prompt tokens) a decode step took 122 ms instead of
    136 ms. A model whose cache is not plain full attention (sliding windows, linear attention) gets transformers'
    own `DynamicCache` (`greedy_stream` then admits rows only between batches)."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class GrowingLayer(DynamicLayer):
        growing = True

        def lazy_initialization(self, key_states: Any, value_states: Any) -> None:
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self.n = 0

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            n, m = self.n, key_states.shape[-2]
            if self._k is None or n + m > self._k.shape[-2]:
                cap = n + m + reserve
                k = key_states.new_empty((*key_states.shape[:-2], cap, key_states.shape[-1]))
                v = value_states.new_empty((*value_states.shape[:-2], cap, value_states.shape[-1]))
                if n:
                    k[..., :n, :], v[..., :n, :] = self._k[..., :n, :], self._v[..., :n, :]
                self._k, self._v = k, v
            self._k[..., n : n + m, :] = key_states
            self._v[..., n : n + m, :] = value_states
            self.n = n + m
            self.keys, self.values = self._k[..., : self.n, :], self._v[..., : self.n, :]
            return self.keys, self.values

        def batch_select_indices(self, indices: Any) -> None:
            if self.is_initialized and self.n:
                self._k, self._v = self._k[indices, ...], self._v[indices, ...]
                self.keys, self.values = self._k[..., : self.n, :], self._v[..., : self.n, :]

        def regroup(self, keep: Any, cut: int, other: Any, width: int, room: int) -> None:
            """Become rows `keep` of this layer without their first `cut` columns (padding in every kept row),
            then `other`'s rows (a newly admitted batch's layer), both right-aligned to `width` columns with zeros
            on the left (masked), in one new buffer with `room` more columns."""
            old = ((self._k[keep, :, cut : self.n], self._v[keep, :, cut : self.n])
                   if self.n and keep.numel() else None)
            new = (other.keys, other.values) if other is not None else None
            parts = [p for p in (old, new) if p is not None]
            ref = parts[0][0]
            shape = (sum(k.shape[0] for k, _ in parts), ref.shape[1], width + room, ref.shape[-1])
            self._k, self._v = ref.new_empty(shape), ref.new_empty(shape)
            r = 0
            for k, v in parts:
                pad = width - k.shape[-2]
                for buf, x in ((self._k, k), (self._v, v)):
                    buf[r : r + k.shape[0], :, :pad] = 0
                    buf[r : r + k.shape[0], :, pad:width] = x
                r += k.shape[0]
            self.n = width
            self.keys, self.values = self._k[..., :width, :], self._v[..., :width, :]
            self.is_initialized = True

        def _adopt(self) -> None:  # after a DynamicLayer method replaced keys/values: they become the buffer
            self._k, self._v, self.n = self.keys, self.values, int(self.keys.shape[-2])

        def crop(self, tokens_to_remove: int) -> None:
            super().crop(tokens_to_remove)
            self._adopt()

        def batch_repeat_interleave(self, repeats: int) -> None:
            super().batch_repeat_interleave(repeats)
            self._adopt()

    try:
        cache = DynamicCache(config=config)
    except TypeError:  # older transformers: no config argument, no layers to replace
        return DynamicCache()
    if cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [GrowingLayer() for _ in cache.layers]
    return cache


@dataclass
class _Cohort:
    """Rows admitted together: they share a padded prompt width, so their logits processors (made for that width)
    see `ids`, their prompts and generated tokens, exactly as in a batch of their own."""

    rows: list[int]       # prompt indices, in batch order
    ids: Any              # [rows, width + steps] token ids
    procs: Any            # a LogitsProcessorList, or None


def greedy_stream(model: Any, prompts: Sequence[Sequence[int]], *, max_new_tokens: int | Sequence[int],
                  eos_ids: Sequence[int], pad_token_id: int,
                  processors: Callable[[int, list[int]], Any] | None = None, max_rows: int = 48,
                  max_tokens: int | None = None, refill: float = 0.25,
                  on_done: Callable[[int, list[int], float], None] | None = None) -> tuple[list[list[int]], list[float]]:
    """Greedy decoding of many prompts with continuous batching: prompts are admitted in the order given (sort them
    by length: admitted together they pad little) while the batch has room, each row leaves when it writes an EOS or
    its last token, and the free places are refilled.

    Each admitted group is one left-padded prefill of its own (its own processors, made by `processors(width,
    rows)`); its KV cache then joins the running batch's, right-aligned to the longer of the two, so the next step
    runs every row at once. A finished row rides along, its tokens ignored, until a regroup (when a quarter of the
    places, `refill`, are finished or free and prompts wait, or when the finished rows are that many): a regroup
    copies the kept cache once, drops the leading columns that are padding in every kept row, and adds the new rows,
    where dropping each finished row at once copied the whole cache at every exit. A row's tokens do not depend on
    the rows beside it: each attends to its own tokens only (masked padding), from its own positions.

    Args:
        model: a causal LM (peft or plain) that takes `past_key_values`, `position_ids` and `logits_to_keep`.
        prompts: token ids of each prompt, unpadded (as the tokenizer gives them, special tokens included).
        max_new_tokens: steps at most, one number or one per prompt.
        eos_ids: token ids that end a row (kept in its tokens, as `generate` does).
        pad_token_id: fills the padding.
        processors: `(width, rows) -> LogitsProcessorList | None` for a group admitted with prompt width `width`
            (the rows' prompt indices, in order), called on that group's ids and scores; stateful ones follow the
            regroups through `select(keep)` (`decoding.GroundedClaims`, `ThinkBeforeEOS`).
        max_rows: rows at most in a step.
        max_tokens: also cap rows x (cache width + the longest token limit) at admission (None: no cap).
        refill: the fraction of `max_rows` that is finished or free before the batch is regrouped.
        on_done: called as `on_done(index, tokens, seconds)` when a row ends (a caller checkpoints there).

    Returns:
        `(tokens, seconds)`: each prompt's generated token ids (up to and including its EOS), and its share of the
        wall time (each step's time split among the rows still generating in it; a prefill's among its rows).
    """
    import torch

    n = len(prompts)
    limits = [int(max_new_tokens)] * n if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    if len(limits) != n or any(m < 1 for m in limits):
        raise ValueError(f"max_new_tokens: one number >= 1, or one per prompt ({n}); got {max_new_tokens!r}")
    if max_rows < 1:
        raise ValueError(f"max_rows: {max_rows}; must be >= 1")
    dev = next(model.parameters()).device
    eos = torch.tensor(sorted(set(eos_ids)), device=dev)
    eos_set = set(int(e) for e in eos_ids)
    tokens: list[list[int]] = [[] for _ in range(n)]
    seconds = [0.0] * n
    room = max(limits, default=1)
    threshold = max(1, int(max_rows * refill))
    growing = all(getattr(layer, "growing", False) for layer in growing_cache(model.config, 1).layers)
    cohorts: list[_Cohort] = []
    cache = mask = pos = pending = None  # over every row of the batch, cohorts in order; mask covers `pending` too
    alive: list[bool] = []               # per batch row: still generating (a finished row rides to the regroup)
    queue = 0

    def step_done(i: int) -> bool:
        return tokens[i][-1] in eos_set or len(tokens[i]) >= limits[i]

    with gqa_attention(model), torch.inference_mode():
        while queue < n or any(alive):
            live = sum(alive)
            admit = queue < n and (live == 0 or (growing and max_rows - live >= threshold))
            if admit or len(alive) - live >= threshold:
                # regroup: the live rows without the padding they all share, then the next prompts
                t0 = time.perf_counter()
                keep = [r for r, a in enumerate(alive) if a]
                width = int(mask.shape[1]) - 1 if mask is not None else 0
                cut = width - int(mask[keep, :-1].sum(1).max()) if keep and growing else 0
                take: list[int] = []
                while admit and queue + len(take) < n and live + len(take) < max_rows:
                    w = max(width - cut if keep else 0, max(len(prompts[j]) for j in (*take, queue + len(take))))
                    if max_tokens and (take or keep) and (live + len(take) + 1) * (w + room) > max_tokens:
                        break
                    take.append(queue + len(take))
                queue += len(take)
                r = 0
                for c in cohorts:  # each cohort keeps its live rows; its processors follow
                    local = [k for k in range(len(c.rows)) if alive[r + k]]
                    r += len(c.rows)
                    c.rows, c.ids = [c.rows[k] for k in local], c.ids[local]
                    for proc in c.procs or ():
                        if hasattr(proc, "select"):
                            proc.select(local)
                cohorts = [c for c in cohorts if c.rows]
                new = _prefill(model, [prompts[i] for i in take], take, pad_token_id, room, processors) if take else None
                if new is not None:
                    t1 = time.perf_counter()
                    for k, i in enumerate(take):
                        tokens[i].append(int(new.pending[k]))
                        seconds[i] += (t1 - t0) / len(take)
                    t0 = t1
                if not keep:
                    cache, mask, pos, pending = new.cache, new.mask, new.pos, new.pending
                else:
                    idx = torch.tensor(keep, dtype=torch.long, device=dev)
                    w_old = width - cut
                    w = max(w_old, new.mask.shape[1] - 1 if new is not None else 0)
                    if growing:
                        for k, layer in enumerate(cache.layers):
                            layer.regroup(idx, cut, new.cache.layers[k] if new is not None else None, w, room)
                    else:
                        cache.batch_select_indices(idx)
                    parts = [(mask[idx, cut:], pos[idx], pending[idx])] + (
                        [(new.mask, new.pos, new.pending)] if new is not None else [])
                    mask = torch.cat([torch.cat([m.new_zeros((m.shape[0], w + 1 - m.shape[1])), m], 1) for m, _, _ in parts])
                    pos, pending = torch.cat([p for _, p, _ in parts]), torch.cat([x for _, _, x in parts])
                alive = [True] * len(keep)
                if new is not None:
                    cohorts.append(new.cohort)
                    alive += [True] * len(take)
                    for k, i in enumerate(take):  # ended on its first token (an EOS, or a limit of 1)
                        if step_done(i):
                            alive[len(keep) + k] = False
                            if on_done is not None:
                                on_done(i, tokens[i], seconds[i])
                dt = time.perf_counter() - t0
                for c in cohorts:
                    for i in c.rows:
                        seconds[i] += dt / len(alive)
                if not any(alive):
                    continue
            # one decode step for every row of the batch
            t0 = time.perf_counter()
            res = model(input_ids=pending[:, None], attention_mask=mask, position_ids=pos, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            cache = res.past_key_values
            scores = res.logits[:, -1, :].to(dtype=torch.float32)
            nxt, r = [], 0
            for c in cohorts:
                s = scores[r : r + len(c.rows)]
                if c.procs:
                    s = c.procs(c.ids, s)
                c.ids = torch.cat([c.ids, s.argmax(-1)[:, None]], 1)
                nxt.append(c.ids[:, -1])
                r += len(c.rows)
            pending = torch.cat(nxt)
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], 1)
            pos = pos + 1
            dt = time.perf_counter() - t0
            live, step, r = sum(alive), pending.tolist(), 0
            for c in cohorts:
                for k, i in enumerate(c.rows):
                    if alive[r + k]:
                        tokens[i].append(step[r + k])
                        seconds[i] += dt / live
                        if step_done(i):
                            alive[r + k] = False
                            if on_done is not None:
                                on_done(i, tokens[i], seconds[i])
                r += len(c.rows)
    return tokens, seconds


@dataclass
class _Admitted:
    cache: Any
    mask: Any      # [rows, width + 1]: the prompt and the first generated token
    pos: Any       # [rows, 1]: the position of that token
    pending: Any   # [rows]: the first generated token
    cohort: _Cohort


def _prefill(model: Any, prompts: Sequence[Sequence[int]], rows: list[int], pad_token_id: int, room: int,
             processors: Callable[[int, list[int]], Any] | None) -> _Admitted:
    """One left-padded forward pass over newly admitted prompts, into a cache of their own, and their first token
    (position ids from the mask, as transformers computes them)."""
    import torch

    dev = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long, device=dev)
    mask = torch.zeros((len(prompts), width), dtype=torch.long, device=dev)
    for k, p in enumerate(prompts):
        if p:
            ids[k, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=dev)
            mask[k, width - len(p):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    res = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=growing_cache(model.config, room),
                use_cache=True, logits_to_keep=1)
    scores = res.logits[:, -1, :].to(dtype=torch.float32)
    procs = (processors(width, list(rows)) or None) if processors else None
    if procs:
        scores = procs(ids, scores)
    first = scores.argmax(-1)
    return _Admitted(cache=res.past_key_values, mask=torch.cat([mask, mask.new_ones((len(prompts), 1))], 1),
                     pos=pos[:, -1:] + 1, pending=first, cohort=_Cohort(rows=list(rows), ids=torch.cat([ids, first[:, None]], 1),
                                                                        procs=procs))

