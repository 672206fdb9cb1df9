"""A track's training rows: read a split, fit each row to `max_seq_length` keeping its EOS, hash the data.

    python -c "from prodtune.train import load_track_split; print(load_track_split('llama', 'data/cpu/prepared', 'train'))"
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

from prodtune import prompts as P
from prodtune.io import UserError

COT_COLUMNS = ("uid", "title", "Question", "Complex_CoT", "Response")


def load_track_split(track: str, data_dir: str | os.PathLike, split: str) -> Any:
    """One split of a track's data as a DataFrame.

    Raises:
        FileNotFoundError: the stage that writes it has not run (named in the message).
        UserError: the file lacks the track's columns.
    """
    import pandas as pd

    path = Path(data_dir) / f"{split}.parquet"
    if track == "llama":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run notebook 01 first (prodtune prepare)")
        df = pd.read_parquet(path)
        missing = [c for c in ("title", "content") if c not in df.columns]
        if missing:
            raise UserError(f"{path}: columns {missing} missing; expected uid, title, content")
        return df
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: the CoT dataset is missing; run notebook 02 first (prodtune cot)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run notebook 02 first (prodtune cot)")
    df = pd.read_parquet(path)
    missing = [c for c in ("Question", "Complex_CoT", "Response") if c not in df.columns]
    if missing:
        raise UserError(f"{path}: columns {missing} missing; expected {list(COT_COLUMNS)}")
    return df


def fit_example(example: dict[str, str], tokenizer: Any, max_seq_length: int) -> tuple[dict[str, str] | None, bool]:
    """Cut an example's completion so prompt + completion + EOS fit `max_seq_length` tokens.

    TRL truncates the token sequence at the end, which would drop the EOS of long rows and teach the model
    to never stop. Cutting the text first (at the last sentence end in the budget, else a word) keeps the EOS.
    An R1 completion (`cot</think>answer`) is cut inside the reasoning, so `</think>` and the answer survive.

    Returns:
        `(example, truncated)`; `(None, False)` when the prompt (plus an R1 answer) leaves fewer than 8 tokens.
    """
    eos = tokenizer.eos_token
    body = example["completion"][: -len(eos)] if example["completion"].endswith(eos) else example["completion"]
    n_prompt = len(tokenizer(example["prompt"])["input_ids"])
    budget = max_seq_length - n_prompt - 1
    head, tail = body, ""
    if P.THINK_CLOSE in body:  # keep "\n</think>\n{answer}" whole; only the reasoning may be shortened
        head, rest = body.split(P.THINK_CLOSE, 1)
        head, tail = head.rstrip("\n"), "\n" + P.THINK_CLOSE + rest
        budget -= len(tokenizer(tail, add_special_tokens=False)["input_ids"]) + 1
    if budget < 8:
        return None, False
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return {"prompt": example["prompt"], "completion": body + eos}, False
    text = tokenizer.decode(ids[:budget], skip_special_tokens=False)
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    if cut >= len(text) // 2:
        text = text[: cut + 1]
    elif " " in text:
        text = text[: text.rfind(" ")]
    return {"prompt": example["prompt"], "completion": text.rstrip() + tail + eos}, True


def build_dataset(track: str, df: Any, tokenizer: Any, max_seq_length: int, loss_on: str = "completion",
                  contexts: Sequence[Sequence[str]] | None = None, max_context_chars: int = 600) -> tuple[Any, dict[str, int]]:
    """A `datasets.Dataset` of prompt/completion rows (or `text` rows for `loss_on="all"`), fitted to length.

    Args:
        contexts: llama track: retrieved descriptions per row put into the prompt (`train.rag_k`); None: plain.
        max_context_chars: longest retrieved description shown.

    Returns:
        `(dataset, counts)` with counts `rows`, `truncated`, `dropped` and, with contexts, `with_context` (rows whose
        prompt shows at least one neighbour).

    Raises:
        UserError: no row fits `max_seq_length`.
    """
    from datasets import Dataset

    rows, truncated, dropped = [], 0, 0
    for ex in P.build_examples(track, df.to_dict("records"), tokenizer, contexts, max_context_chars):
        fitted, cut = fit_example(ex, tokenizer, max_seq_length)
        if fitted is None:
            dropped += 1
            continue
        truncated += cut
        rows.append({"text": P.full_text(fitted)} if loss_on == "all" else fitted)
    if not rows:
        raise UserError(f"no {track} row fits max_seq_length={max_seq_length}; raise train.max_seq_length")
    counts = {"rows": len(rows), "truncated": truncated, "dropped": dropped}
    if contexts is not None:
        counts["with_context"] = sum(1 for c in contexts if len(c))
    return Dataset.from_list(rows), counts


def neighbour_contexts(frames: Sequence[Any], catalogue: Any, cfg: Any) -> list[list[list[str]]]:
    """The retrieved descriptions each row's training prompt shows (`train.rag_k` > 0), per frame: its `rag_k` nearest
    catalogue products by title (never itself), those below `rag_min_score` left out (`prompts.shown_contexts`).
    All frames' titles go through one embedding pass (the catalogue is embedded once)."""
    from prodtune.rag import nearest_products

    titles = [t for df in frames for t in df["title"].tolist()]
    uids = [u for df in frames for u in df["uid"].astype(str).tolist()]
    ctx = [P.shown_contexts(h, cfg.rag_min_score)
           for h in nearest_products(titles, uids, catalogue, k=cfg.rag_k, embedder=cfg.rag_embedder)]
    out, start = [], 0
    for df in frames:
        out.append(ctx[start : start + len(df)])
        start += len(df)
    return out


def data_hash(paths: Sequence[str | os.PathLike]) -> str:
    """blake2b of the files' rows (the run card's `data_hash`): same rows, same hash.

    The rows are hashed, not the file bytes, so rewriting identical data (a rerun of stage 01 or 02, another
    Parquet writer version) does not make a finished training run look stale.
    """
    import pandas as pd

    h = hashlib.blake2b(digest_size=12)
    for p in paths:
        df = pd.read_parquet(p)
        h.update(Path(p).name.encode() + b"\0" + "\0".join(map(str, df.columns)).encode())
        h.update(pd.util.hash_pandas_object(df, index=False).values.tobytes())
    return h.hexdigest()


def token_count(ds: Any, tokenizer: Any) -> int:
    """Tokens of a fitted dataset's full texts (prompt + completion, or `text`): the run card's tokens per epoch."""
    return sum(len(tokenizer(P.full_text(r) if "prompt" in r else r["text"])["input_ids"]) for r in ds)
