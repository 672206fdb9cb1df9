"""Stage 01: read, clean, filter, deduplicate, sample and split the AmazonTitles-1.3MM dump.

    prodtune prepare --input data/sample/trn_sample.jsonl --out_dir data/cpu/prepared --sample 300
    python -c "from prodtune import data; print(data.run(data.Config(out_dir='/tmp/prepared')))"

The input is a path or an http(s) URL of the dump (`fetch.py` downloads it once into `<home>/data/raw/` and takes
`trn.json.gz` out of the dataset's zip). Reads `trn.json` / `.jsonl` / `.gz` in blocks (never the whole file as
Python objects), writes `{train,validation,test}.parquet` (+ `.jsonl` with `write_jsonl`), `rejects.jsonl` and
`stats.json` into `out_dir`. Every input line is accounted for: `input_lines = kept + sum(filtered.values()) + rejected`.
Parsing is Arrow's JSON reader (`read.py`), cleaning Arrow's regex kernels plus Python for the rows that need it
(`clean.py`), the keys of a product are xxhash's xxh3 of its uid (seeded: sampling and split) and of its text.
"""

from __future__ import annotations

import collections
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from prodtune.config import ConfigError
from prodtune.data.clean import (clean_array, clean_column, clean_text, reference_clean, study_clean_array,
                                 truncate_text)
from prodtune.data.fetch import fetch_input, is_url
from prodtune.data.read import SCHEMA, Reject, iter_lines, open_input, parse_block, parse_line, read_blocks
from prodtune.io import InputError, atomic_path, log, read_json, write_json

SPLITS = ("train", "validation", "test")
FILTERS = ("empty_title", "empty_content", "short_content", "duplicate_uid", "duplicate_title_content", "not_sampled")
# What to do when most lines are rejected for one reason, or are too short (a warning names it and the fix; an
# InputError when nothing is kept).
HINTS = {
    "bad_type:uid": "If the uids are null, use --uid_from_text / data.uid_from_text=true.",
    "missing_field:uid": "If the rows have no uid, add one (--uid_from_text / data.uid_from_text=true covers null uids).",
    "short_content": "Use --min_content_chars / data.min_content_chars=N with a smaller N.",
}


@dataclass
class DataConfig:
    """Settings of stage 01. Defaults follow the study (content of at least 100 characters)."""

    SECTION: ClassVar[str] = "data"

    input: str = field(default="data/sample/trn_sample.jsonl", metadata={
        "help": "trn.json, .jsonl or .gz, or a zip holding one: a path or an http(s) URL (downloaded to <home>/data/raw)"})
    out_dir: str = field(default="{data_dir}/prepared", metadata={"help": "where splits, rejects and stats go"})
    min_content_chars: int = field(default=100, metadata={"help": "drop rows whose cleaned content is shorter"})
    max_content_chars: int = field(default=2000, metadata={"help": "truncate longer content at a word boundary"})
    max_title_chars: int = field(default=400, metadata={"help": "truncate longer titles at a word boundary"})
    sample: int | None = field(default=None, metadata={"help": "keep N products (seeded); null keeps all"})
    seed: int = field(default=3407, metadata={"help": "seed of sampling and splitting (xxh3-64 of the uid)"})
    validation_frac: float = field(default=0.1, metadata={"help": "share of products in validation"})
    test_frac: float = field(default=0.1, metadata={"help": "share of products in test"})
    write_jsonl: bool = field(default=False, metadata={
        "help": "also write {split}.jsonl next to the Parquet (a second copy of the text: 0.9 GB for the full dump)"})
    parquet_compression: str = field(default="snappy", metadata={
        "help": "snappy (fast, shrinks text ~2.3x; the Parquet default), lz4, zstd (smallest) or none (largest)"})
    uid_from_text: bool = field(default=False, metadata={"help": "give rows with a null uid a hash of title+content"})
    cleaner: str = field(default="prodtune", metadata={"help": "prodtune (readable text) or study (the study's regex; "
                                                               "only to train the reference recipe in stage 06)"})
    force: bool = field(default=False, metadata={
        "help": "run even if out_dir holds this config's outputs, newer than the input (else they are reused)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar over the input bytes"})

    def __post_init__(self) -> None:
        if self.min_content_chars < 0 or self.max_content_chars < max(1, self.min_content_chars):
            raise ConfigError(f"data.min_content_chars={self.min_content_chars}, data.max_content_chars="
                              f"{self.max_content_chars}: need 0 <= min_content_chars <= max_content_chars, max >= 1")
        if self.max_title_chars < 1:
            raise ConfigError(f"data.max_title_chars={self.max_title_chars}: must be at least 1")
        if not (0 <= self.validation_frac < 1 and 0 <= self.test_frac < 1 and self.validation_frac + self.test_frac < 1):
            raise ConfigError(f"data.validation_frac={self.validation_frac}, data.test_frac={self.test_frac}: each "
                              "must be in [0, 1) and their sum below 1")
        if self.parquet_compression not in ("lz4", "snappy", "zstd", "none"):
            raise ConfigError(f"data.parquet_compression={self.parquet_compression!r}: must be lz4, snappy, zstd or none")
        if self.cleaner not in ("prodtune", "study"):
            raise ConfigError(f"data.cleaner={self.cleaner!r}: must be 'prodtune' or 'study'")
        if self.sample is not None and self.sample < 1:
            raise ConfigError(f"data.sample={self.sample}: must be a positive number of products or null")
        if not 0 <= self.seed < 2**64 - 1:
            raise ConfigError(f"data.seed={self.seed}: must be in [0, 2**64 - 2] (xxh3 seeds; seed + 1 is used too)")


Config = DataConfig

_BLOCK_BYTES = 8 << 20  # raw bytes per block; one block is parsed and cleaned at once by a worker thread
_PIECE_BYTES = 256 << 10  # a block with a bad line is retried in pieces this big before going line by line
_IN_FLIGHT = 4  # blocks parsed ahead of the one being deduplicated and written


@dataclass
class _Block:
    """One block after parsing, cleaning and the per-row filters: the rows that passed them, ready for dedup."""

    table: pa.Table  # the rows that passed the filters, cleaned
    uids: list[bytes]  # their uids
    pairs: list[int]  # xxh3-128 of their title and content
    rejects: list[Reject]
    lines: int
    bytes: int
    filtered: dict[str, int]
    truncated: int


def _process_block(chunk: bytes | memoryview, cfg: DataConfig) -> _Block:
    """Worker: parse, clean, filter a block; its keys. Line numbers are block-relative (first line 1)."""
    tab, rejects, n_lines = parse_block(chunk, 1, cfg.uid_from_text, _PIECE_BYTES)
    title, title_len = clean_column(tab.column("title"), cfg.cleaner, cfg.max_title_chars)
    content, content_len = clean_column(tab.column("content"), cfg.cleaner, cfg.max_content_chars)
    empty_title = title_len == 0
    empty_content = ~empty_title & (content_len == 0)  # empty before or after cleaning
    rest = ~empty_title & ~empty_content
    short = rest & (content_len < cfg.min_content_chars)
    keep = rest & ~short
    filtered = {"empty_title": int(empty_title.sum()), "empty_content": int(empty_content.sum()),
                "short_content": int(short.sum())}
    mask = pa.array(keep)
    kept = pa.table([tab.column("uid").combine_chunks().filter(mask), title.filter(mask), content.filter(mask)],
                    schema=SCHEMA)
    # (title, content) joined by "\0", which cleaned text never holds (both cleaners drop control characters)
    joined = pc.binary_join_element_wise(kept.column("title"), kept.column("content"), "\x00").cast(pa.binary())
    pairs = [xxhash.xxh3_128_intdigest(t) for t in joined.to_numpy(zero_copy_only=False)]
    uids = kept.column("uid").cast(pa.binary()).to_numpy(zero_copy_only=False).tolist()
    return _Block(kept, uids, pairs, rejects, n_lines, len(chunk), filtered,
                  truncated=int((keep & (content_len > cfg.max_content_chars)).sum()))


class _Dedup:
    """The uids and (title, content) keys met so far, in input order: a row goes if its uid was met (even on a row
    dropped for its text), else if its text was met among the rows kept so far."""

    def __init__(self) -> None:
        self.uids: set[bytes] = set()
        self.pairs: set[int] = set()

    def first_unseen(self, uids: list[bytes], pairs: list[int]) -> tuple[np.ndarray, int, int]:
        """(keep mask, duplicate uids, duplicate texts) of one block's rows."""
        keep = np.ones(len(uids), np.bool_)
        dup_uid = dup_pair = 0
        seen_u, seen_p = self.uids, self.pairs
        for i, (u, p) in enumerate(zip(uids, pairs)):
            if u in seen_u:
                keep[i] = False
                dup_uid += 1
                continue
            seen_u.add(u)
            if p in seen_p:
                keep[i] = False
                dup_pair += 1
            else:
                seen_p.add(p)
        return keep, dup_uid, dup_pair


def _uid_keys(uids: list[bytes], seed: int) -> np.ndarray:
    """xxh3-64 of each uid with `seed`: a product's sampling key (seed) and split key (seed + 1)."""
    h = xxhash.xxh3_64_intdigest
    return np.fromiter((h(u, seed) for u in uids), np.uint64, len(uids))


class _SplitWriter:
    """Writes each split as Parquet (+ JSONL) row groups into temporary files, renamed into place at close."""

    def __init__(self, out: Path, write_jsonl: bool, compression: str = "snappy"):
        self.write_jsonl = write_jsonl
        self.counts = dict.fromkeys(SPLITS, 0)
        self._stack = contextlib.ExitStack()
        self._pq, self._jl = {}, {}
        for s in SPLITS:
            tmp = self._stack.enter_context(atomic_path(out / f"{s}.parquet"))
            # Long unique strings: dictionary encoding only costs time (see benchmarks/README.md for compression)
            self._pq[s] = self._stack.enter_context(
                pq.ParquetWriter(tmp, SCHEMA, compression=compression, use_dictionary=["uid"], write_statistics=["uid"]))
            if write_jsonl:
                self._jl[s] = self._stack.enter_context(open(self._stack.enter_context(atomic_path(out / f"{s}.jsonl")),
                                                             "wb"))

    def write(self, split: str, tab: pa.Table) -> None:
        if tab.num_rows == 0:
            return
        self._pq[split].write_table(tab)
        if self.write_jsonl:
            cols = [tab.column(c).to_pylist() for c in ("uid", "title", "content")]
            self._jl[split].write(b"".join(orjson.dumps({"uid": u, "title": t, "content": c}) + b"\n"
                                           for u, t, c in zip(*cols)))
        self.counts[split] += tab.num_rows

    def close(self, ok: bool) -> None:
        """Finish the files; on failure (`ok=False`) the temporary files are removed and old outputs stay."""
        if ok:
            self._stack.close()
        else:
            self._stack.__exit__(RuntimeError, RuntimeError("prepare aborted"), None)


def _done_before(cfg: DataConfig, src: Path, out: Path) -> dict[str, Any] | None:
    """The stats of an earlier run of this config into `out`, if its outputs are all there and newer than the input."""
    path = out / "stats.json"
    try:
        stats = read_json(path)
        fresh = path.stat().st_mtime >= src.stat().st_mtime
    except (OSError, ValueError):
        return None
    same = {k: v for k, v in stats.get("config", {}).items() if k not in ("force", "progress")} == {
        k: getattr(cfg, k) for k in cfg.__dataclass_fields__ if k not in ("force", "progress")}
    files = [f"{s}.parquet" for s in SPLITS] + [f"{s}.jsonl" for s in SPLITS if cfg.write_jsonl] + ["rejects.jsonl"]
    return stats if fresh and same and all((out / f).is_file() for f in files) else None


def _most_lines_lost(n_lines: int, counts: dict[str, int]) -> tuple[str, int] | None:
    """The reason that took most of the lines, if one did."""
    reason, n = max(counts.items(), key=lambda kv: kv[1], default=("", 0))
    return (reason, n) if n_lines and 2 * n > n_lines else None


def run(cfg: DataConfig) -> dict[str, Any]:
    """Run stage 01: read `cfg.input` (fetched first if it is a URL or an archive), write cleaned splits, rejects and
    stats into `cfg.out_dir`.

    Blocks of the input (8 MB) are parsed, cleaned and filtered in two worker threads (Arrow releases the GIL).
    The main thread deduplicates in input order, so the result is the same as cleaning line by line, and writes
    the splits. Sampling and splitting use seeded xxh3-64 hashes of the uid: a product's split does not depend on
    the order of the file or on the other products. Outputs are written atomically; a rerun with the same config
    reuses them unless `cfg.force`.

    Args:
        cfg: stage settings (paths filled).

    Returns:
        The stats dict (also written to `out_dir/stats.json`).

    Raises:
        InputError: the input cannot be read, is empty, or no row is kept (the message names the main reason).
    """
    t0 = time.perf_counter()
    src, out = fetch_input(cfg.input, progress=cfg.progress), Path(cfg.out_dir)
    if not cfg.force and (stats := _done_before(cfg, src, out)) is not None:
        log.info("prepare: %s already holds this config's outputs (force=true to rerun)", out)
        return stats
    blocks = read_blocks(src, _BLOCK_BYTES)
    first = next(blocks)  # raises InputError before anything is written
    size = src.stat().st_size
    filtered = dict.fromkeys(FILTERS, 0)
    rejected: dict[str, int] = {}
    truncated = n_lines = 0
    dedup = _Dedup()
    held: tuple[pa.Table, list[bytes], np.ndarray] | None = None  # with `sample`: the candidates so far
    val_cut, test_cut = cfg.validation_frac, cfg.validation_frac + cfg.test_frac
    out.mkdir(parents=True, exist_ok=True)
    writer = _SplitWriter(out, cfg.write_jsonl, cfg.parquet_compression)
    rejects_ctx = atomic_path(out / "rejects.jsonl")
    rejects_tmp = rejects_ctx.__enter__()
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"prepare {src.name}", mininterval=1)
    ok = False
    try:
        with open(rejects_tmp, "wb") as rejects_fh, ThreadPoolExecutor(2 if size > _BLOCK_BYTES else 1) as pool:
            pending: collections.deque = collections.deque([pool.submit(_process_block, first, cfg)])
            while pending:
                if len(pending) <= _IN_FLIGHT:
                    chunk = next(blocks, None)
                    if chunk is not None:
                        pending.append(pool.submit(_process_block, chunk, cfg))
                        continue
                b = pending.popleft().result()
                for r in b.rejects:
                    r.line += n_lines
                    rejected[r.reason] = rejected.get(r.reason, 0) + 1
                    rejects_fh.write(orjson.dumps(r.to_dict(str(src))) + b"\n")
                n_lines += b.lines
                truncated += b.truncated
                for k, v in b.filtered.items():
                    filtered[k] += v
                if bar is not None:
                    bar.update(b.bytes)
                if b.table.num_rows == 0:
                    continue
                keep, dup_uid, dup_pair = dedup.first_unseen(b.uids, b.pairs)
                filtered["duplicate_uid"] += dup_uid
                filtered["duplicate_title_content"] += dup_pair
                tab, uids = b.table, b.uids
                if dup_uid or dup_pair:
                    tab, uids = tab.filter(pa.array(keep)), [u for u, k in zip(uids, keep) if k]
                if cfg.sample:
                    k_sample = _uid_keys(uids, cfg.seed)
                    if held is not None:
                        tab, uids = pa.concat_tables([held[0], tab]), held[1] + uids
                        k_sample = np.concatenate([held[2], k_sample])
                    if tab.num_rows > cfg.sample:  # the `sample` smallest keys, ties by input order, in input order
                        idx = np.sort(np.argsort(k_sample, kind="stable")[: cfg.sample])
                        filtered["not_sampled"] += tab.num_rows - cfg.sample
                        tab, uids, k_sample = tab.take(idx), [uids[i] for i in idx], k_sample[idx]
                    held = (tab, uids, k_sample)
                else:  # a product's split from its own key: straight from the block into each split
                    which = _split_of(_uid_keys(uids, cfg.seed + 1) / np.float64(2**64), val_cut, test_cut)
                    for j, s in enumerate(SPLITS):
                        writer.write(s, tab.filter(pa.array(which == j)))
        if held is not None:
            tab, uids, _ = held
            order = np.argsort(_uid_keys(uids, cfg.seed + 1), kind="stable")  # a seeded shuffle of the sample
            n_val, n_test = round(len(order) * cfg.validation_frac), round(len(order) * cfg.test_frac)
            parts = {"validation": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
            for s in SPLITS:
                writer.write(s, tab.take(np.sort(parts[s])))
        kept = sum(writer.counts.values())
        lost = _most_lines_lost(n_lines, {**rejected, "short_content": filtered["short_content"]})
        if kept == 0:
            lines_lost = sorted({**rejected, **{k: v for k, v in filtered.items() if v}}.items(), key=lambda kv: -kv[1])
            raise InputError(f"{src}: no row kept of {n_lines:,} lines ("
                             + ", ".join(f"{n:,} {reason}" for reason, n in lines_lost) + "). "
                             + (HINTS.get(lost[0], "") if lost else "rejects.jsonl would list each bad line."))
        ok = True
    finally:
        if bar is not None:
            bar.close()
        writer.close(ok)
        rejects_ctx.__exit__(*((None, None, None) if ok else (RuntimeError, RuntimeError("aborted"), None)))
    if lost:
        log.warning("prepare: %s of %s lines of %s went as %s. %s", f"{lost[1]:,}", f"{n_lines:,}", src.name, lost[0],
                    HINTS.get(lost[0], "rejects.jsonl lists each bad line."))
    stats = {
        "input": str(src),
        "input_lines": n_lines,
        "kept": kept,
        "filtered": filtered,
        "rejected": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())),
        "truncated_content": truncated,
        "splits": writer.counts,
        "seed": cfg.seed,
        "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if stats["input_lines"] != kept + sum(filtered.values()) + stats["rejected"]:
        raise RuntimeError(f"row accounting is off (a bug): {stats}")
    write_json(out / "stats.json", stats)
    log.info("prepare: %d lines -> %d kept, %d filtered, %d rejected in %.1fs; wrote %s",
             n_lines, kept, sum(filtered.values()), stats["rejected"], stats["seconds"], out)
    return stats


def _split_of(pos: np.ndarray, val_cut: float, test_cut: float) -> np.ndarray:
    return np.where(pos < val_cut, 1, np.where(pos < test_cut, 2, 0))


# ----------------------------------------------------------------------------------------------
# For notebook 01
# ----------------------------------------------------------------------------------------------


def load_split(data_dir: str | Path, split: str) -> Any:
    """Load one prepared split as a pandas DataFrame (columns uid, title, content)."""
    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run stage 01 (prodtune prepare / notebook 01) first")
    return pq.read_table(path).to_pandas()


def before_after(path: str | Path, n: int = 6, scan_lines: int = 20000) -> Any:
    """Rows whose text the cleaner changes, as raw / ours / the study's regex, for the notebook's EDA."""
    import pandas as pd

    rows = []
    for _, raw in iter_lines(path):
        parsed = parse_line(raw)
        if type(parsed) is str:
            continue
        text = parsed[2] or parsed[1]
        if ("&" in text or "<" in text or not text.isascii()) and clean_text(text) != text:
            rows.append({"raw": text[:160], "prodtune": clean_text(text)[:160], "study regex": reference_clean(text)[:160]})
        scan_lines -= 1
        if len(rows) >= n or scan_lines <= 0:
            break
    return pd.DataFrame(rows)


def funnel(stats: dict[str, Any]) -> list[tuple[str, int]]:
    """The filter funnel as (step, rows remaining) pairs, for tables and plots."""
    rows = [("input lines", stats["input_lines"])]
    left = stats["input_lines"] - stats["rejected"]
    rows.append(("valid JSON rows", left))
    for reason, n in stats["filtered"].items():
        left -= n
        rows.append((f"after {reason}", left))
    return rows


__all__ = ["Config", "DataConfig", "FILTERS", "HINTS", "InputError", "Reject", "SCHEMA", "SPLITS", "before_after",
           "clean_array", "clean_column", "clean_text", "fetch_input", "funnel", "is_url", "iter_lines", "load_split",
           "open_input", "parse_line", "reference_clean", "run", "study_clean_array", "truncate_text"]
