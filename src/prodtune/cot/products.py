"""The products stage 02 writes rows for: stage 01's splits read in a seeded order, each with its question style.

    python -c "from prodtune.cot import load_products; print(load_products('data/cpu/prepared')[0])"
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from prodtune import prompts
from prodtune.cot.config import SPLITS


@dataclass(frozen=True)
class Item:
    """One product to generate a row for, with its stage 01 split and its seeded question style."""

    uid: str
    title: str
    content: str
    split: str
    style: str
    order: int


def stable_hash(*parts: Any) -> int:
    """A stable 64-bit hash of `parts` (Python's `hash` is salted per process, which would break resume and seeds)."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(map(str, parts)).encode(), digest_size=8).digest(), "little")


def style_for(uid: str, seed: int, styles: list[str]) -> str:
    """The question style of a product: a seeded, order-independent draw from `styles`."""
    return styles[stable_hash("style", seed, uid) % len(styles)]


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
            rows.append((stable_hash("order", seed, uid), uid, title or "", content or "", split))
    rows.sort()
    return [Item(uid, t, c, s, style_for(uid, seed, styles), i) for i, (_, uid, t, c, s) in enumerate(rows)]


def short_name(title: str, max_chars: int = 80) -> str:
    """The product's name for a question: the whole title when short, else its first comma-separated part."""
    title = " ".join(title.split())
    if len(title) <= max_chars:
        return title
    head = re.split(r",| - | \(|\|", title)[0].strip()
    return head if len(head) <= max_chars else head[:max_chars].rsplit(" ", 1)[0]
