"""Stage 02's `local` backend: a transformers causal LM (the embedded SmolLM2-135M-Instruct by default) writing the JSON row.

    prodtune cot --backend local --n 5 --out-dir data/cpu/cot_local
    prodtune cot --profile colab-t4        # the GPU profiles' local model: Llama-3.1-8B-Instruct in 4-bit

The model loads through `models.load_for_inference`, like every inference model: float32 on CPU; on CUDA an 8B
model in 4-bit and the dtype of `gpu.resolve_dtype` (float16 on a T4).

Small models are weak at JSON, so by default (`local_mode: fields`) a logits processor forces the JSON skeleton
and the model only writes the three string values, greedily, after a worked example; `free` mode only prefixes
`{"Question": "` (kept to measure how often a small model closes the object itself).
"""

from __future__ import annotations

import time
from typing import Any

from prodtune import prompts
from prodtune.cot.backends import Backend, GenResult, OnResult
from prodtune.cot.config import FIELDS, CoTAnswer, CoTConfig, parse_answer
from prodtune.cot.products import Item, short_name
from prodtune.io import log

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


def cut_to_sentence(text: str) -> str:
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
        from prodtune.models import load_for_inference

        t0 = time.perf_counter()
        self.lm, self.tok = load_for_inference(self.model)  # its tokenizer always has a pad token
        self.tok.padding_side = "left"  # decoder-only batched generation continues from the right edge
        self.device = next(self.lm.parameters()).device.type
        self.loaded = {"device": self.device, "load_in_4bit": bool(getattr(self.lm, "is_loaded_in_4bit", False)),
                       "dtype": str(self.lm.dtype).replace("torch.", "")}
        self.caps = [cfg.local_question_tokens, cfg.local_cot_tokens, cfg.local_response_tokens]
        self.batch_size = cfg.local_batch_size  # rows per generate() call; _generate_fitting lowers it on OOM
        log.info("cot local: loaded %s (%s) in %.1fs", self.model, self.loaded, time.perf_counter() - t0)

    def run_info(self) -> dict[str, Any]:
        """Where the model ran: device, 4-bit or not, dtype, and the batch size an OOM forced (stats' `this_run`)."""
        lowered = self.batch_size < self.cfg.local_batch_size
        return {**self.loaded, **({"oom_batch_size": self.batch_size} if lowered else {})}

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

    def _generate_fitting(self, batch: list[Item]) -> list[tuple[str, list[str], list[str]]]:
        """`generate(batch)`, halving the batch on CUDA out-of-memory until it fits (1 row is the last try).

        A profile's `local_batch_size` is sized for its card's free memory; a card with less (another process,
        a larger CUDA context, longer descriptions) would otherwise lose the whole stage to one OOM. The smaller
        size sticks for the rest of the run and is reported in `run_info()["oom_batch_size"]`.
        """
        import torch

        try:
            return self.generate(batch)
        except torch.cuda.OutOfMemoryError:
            if len(batch) == 1:
                raise
        torch.cuda.empty_cache()
        half = max(1, len(batch) // 2)
        log.warning("cot local: CUDA out of memory at %d rows a batch; going on at %d", len(batch), half)
        self.batch_size = min(self.batch_size, half)
        return [out for i in range(0, len(batch), half) for out in self._generate_fitting(batch[i : i + half])]

    def run(self, items: list[Item], on_result: OnResult) -> None:
        i = 0
        while i < len(items):
            batch = items[i : i + self.batch_size]
            i += len(batch)
            t0 = time.perf_counter()
            outs = self._generate_fitting(batch)
            sec = (time.perf_counter() - t0) / len(batch)
            for it, (raw, trunc, cut) in zip(batch, outs):
                meta = {"attempts": 1, "seconds": round(sec, 3), "truncated": trunc}
                ans, reason, detail = parse_answer(raw)
                if ans is not None and cut:
                    vals = ans.model_dump()
                    vals.update({f: cut_to_sentence(vals[f]) for f in cut})
                    empty = [f for f in cut if not vals[f]]
                    if empty:
                        ans, reason, detail = None, "truncated", f"{', '.join(empty)} hit its token cap before a sentence ended"
                    else:
                        ans = CoTAnswer(**vals)
                elif ans is None and trunc:
                    reason, detail = "truncated", f"hit the token cap ({', '.join(trunc)}); {detail}"
                on_result(GenResult(it, ans, raw=raw, reason=reason, detail=detail, meta=meta))
