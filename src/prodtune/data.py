"""Stage 01: stream, clean, filter, deduplicate, sample and split the AmazonTitles-1.3MM dump.

    prodtune prepare --input data/sample/trn_sample.jsonl --out data/cpu/prepared --sample 300

Reads `trn.json` / `.jsonl` / `.gz` line by line (never the whole file as Python objects), writes
`{train,validation,test}.parquet` (+ `.jsonl`), `rejects.jsonl` and `stats.json` into the out folder.
Every input line is accounted for: `input_lines = kept + sum(filtered.values()) + rejected`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import heapq
import html
import io
import re
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from prodtune.io import atomic_path, log, write_json

SPLITS = ("train", "validation", "test")
REQUIRED_FIELDS = ("uid", "title", "content")
SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])


class InputError(OSError):
    """The input file cannot be read at all (missing, not a file, unreadable)."""


@dataclass
class DataConfig:
    """Settings of stage 01. Defaults follow the study (content of at least 100 characters)."""

    input: str = field(default="data/sample/trn_sample.jsonl", metadata={"help": "trn.json, .jsonl or .gz"})
    out_dir: str = field(default="{data_dir}/prepared", metadata={"help": "where splits and stats go"})
    min_content_chars: int = field(default=100, metadata={"help": "drop rows whose cleaned content is shorter"})
    max_content_chars: int = field(default=2000, metadata={"help": "truncate longer content at a word boundary"})
    max_title_chars: int = field(default=400, metadata={"help": "truncate longer titles at a word boundary"})
    sample: int | None = field(default=None, metadata={"help": "keep N products (seeded); null keeps all"})
    seed: int = field(default=3407, metadata={"help": "seed of sampling and splitting"})
    validation_frac: float = field(default=0.1, metadata={"help": "share of products in validation"})
    test_frac: float = field(default=0.1, metadata={"help": "share of products in test"})
    write_jsonl: bool = field(default=True, metadata={"help": "also write {split}.jsonl next to the Parquet"})
    uid_from_text: bool = field(default=False, metadata={"help": "give rows with a null uid a hash of title+content"})

    def __post_init__(self) -> None:
        if self.min_content_chars < 0 or self.max_content_chars < max(1, self.min_content_chars):
            raise ValueError("need 0 <= min_content_chars <= max_content_chars")
        if not (0 <= self.validation_frac < 1 and 0 <= self.test_frac < 1 and self.validation_frac + self.test_frac < 1):
            raise ValueError("validation_frac and test_frac must be in [0, 1) and sum below 1")
        if self.sample is not None and self.sample < 1:
            raise ValueError("sample must be a positive number of products or null")


# ----------------------------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------------------------

_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", re.S)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|h[1-6])\b[^<>]*>", re.I)
# C0/C1 control characters other than whitespace, and zero-width characters.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\ufeff]")


def clean_text(text: str) -> str:
    """Make scraped product text readable while keeping its information.

    Decodes HTML entities (`&#8217;` -> ’, `&amp;` -> &, also double-escaped `&amp;#8217;`), strips
    HTML tags (block tags become a space), drops control and zero-width characters, collapses
    whitespace and applies Unicode NFC. Punctuation, digits, units and accents are kept.

    Args:
        text: raw title or description.

    Returns:
        The cleaned text (may be empty).
    """
    if "&" in text:
        for _ in range(2):  # `&amp;#8217;` is common in the dump: decode twice at most
            new = html.unescape(text)
            if new == text:
                break
            text = new
    if "<" in text:
        text = _BLOCK_TAG.sub(" ", text)
        text = _TAG.sub("", text)
    if not text.isascii():
        text = _CONTROL.sub("", text)
        text = unicodedata.normalize("NFC", text)
    elif not text.isprintable():
        text = _CONTROL.sub("", text)
    return " ".join(text.split())


def truncate_text(text: str, max_chars: int) -> str:
    """Cut `text` to at most `max_chars`, at the last sentence end if one is in the second half, else at a space."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if cut >= max_chars // 2:
        return head[: cut + 1]
    space = head.rfind(" ")
    return head[:space].rstrip() if space > 0 else head


def reference_clean(text: str) -> str:
    """The study's cleaner, kept only to compare against: strips every non-alphanumeric character."""
    return re.sub(r"[^A-Za-z0-9 ]+", "", text).strip()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def open_input(path: str | Path) -> io.BufferedIOBase:
    """Open a `.json`/`.jsonl` file, or a `.gz` one, for binary line reading.

    Raises:
        InputError: when the file is missing, is a folder, or cannot be opened/decompressed.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    try:
        fh = open(p, "rb", buffering=1 << 20)  # noqa: SIM115 - returned to the caller
        magic = fh.peek(2)[:2]
        if magic == b"\x1f\x8b":
            fh.close()
            return gzip.open(p, "rb")  # type: ignore[return-value]
        return fh
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e}") from e


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield `(line_number, raw_bytes)` for each line (1-based, newline stripped), streaming."""
    fh = open_input(path)
    try:
        for n, raw in enumerate(fh, 1):
            yield n, raw.rstrip(b"\r\n")
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        log.warning("%s: input ends early (%s); rows read so far are kept", path, e)
    finally:
        fh.close()


@dataclass
class Reject:
    """One input line that could not be used as a product row."""

    line: int
    reason: str
    raw: bytes

    def to_dict(self, file: str) -> dict[str, Any]:
        try:
            text = self.raw.decode("utf-8")
            return {"file": file, "line": self.line, "reason": self.reason, "raw": text}
        except UnicodeDecodeError:
            return {
                "file": file,
                "line": self.line,
                "reason": self.reason,
                "raw": self.raw.decode("utf-8", errors="replace"),
                "raw_base64": base64.b64encode(self.raw).decode("ascii"),
            }


def parse_line(raw: bytes, uid_from_text: bool = False) -> tuple[str, str, str] | str:
    """Parse one JSON line into `(uid, title, content)` raw strings, or return a reject reason."""
    if not raw.strip():
        return "blank_line"
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bad_utf8"
        return "bad_json"
    if type(obj) is not dict:
        return "not_an_object"
    uid = obj.get("uid")
    title = obj.get("title")
    content = obj.get("content")
    if type(title) is not str or type(content) is not str:
        for name, v in (("title", title), ("content", content)):
            if name not in obj:
                return f"missing_field:{name}"
            if type(v) is not str:
                return f"bad_type:{name}"
    if type(uid) is not str:
        if type(uid) is int and not isinstance(uid, bool):
            uid = str(uid)
        elif uid is None and uid_from_text:
            uid = "h" + hashlib.blake2b(f"{title}\x00{content}".encode(), digest_size=8).hexdigest()
        elif "uid" not in obj:
            return "missing_field:uid"
        else:
            return "bad_type:uid"
    if not uid:
        return "bad_type:uid"
    return uid, title, content


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


def _keys(uid: str, seed: int) -> tuple[int, float]:
    """Seeded, order-independent sample key and split position for one product."""
    d = hashlib.blake2b(uid.encode(), digest_size=16, salt=seed.to_bytes(8, "little", signed=True)[:16]).digest()
    return int.from_bytes(d[:8], "little"), int.from_bytes(d[8:], "little") / 2**64


class _SplitWriter:
    """Buffers rows per split and writes Parquet (+ JSONL) row groups, atomically at close."""

    def __init__(self, out: Path, write_jsonl: bool, batch: int = 50_000):
        self.out, self.write_jsonl, self.batch = out, write_jsonl, batch
        self.buf: dict[str, list[list[str]]] = {s: [[], [], []] for s in SPLITS}
        self.counts = dict.fromkeys(SPLITS, 0)
        self._ctx = {}
        self._pq = {}
        self._jl = {}
        for s in SPLITS:
            ctx = atomic_path(out / f"{s}.parquet")
            tmp = ctx.__enter__()
            self._ctx[s] = [ctx]
            self._pq[s] = pq.ParquetWriter(tmp, SCHEMA, compression="zstd")
            if write_jsonl:
                jctx = atomic_path(out / f"{s}.jsonl")
                self._ctx[s].append(jctx)
                self._jl[s] = open(jctx.__enter__(), "wb")  # noqa: SIM115

    def add(self, split: str, uid: str, title: str, content: str) -> None:
        b = self.buf[split]
        b[0].append(uid)
        b[1].append(title)
        b[2].append(content)
        if len(b[0]) >= self.batch:
            self._flush(split)

    def _flush(self, split: str) -> None:
        uids, titles, contents = self.buf[split]
        if not uids:
            return
        self._pq[split].write_table(pa.table([uids, titles, contents], schema=SCHEMA))
        if self.write_jsonl:
            self._jl[split].write(
                b"".join(orjson.dumps({"uid": u, "title": t, "content": c}) + b"\n" for u, t, c in zip(uids, titles, contents))
            )
        self.counts[split] += len(uids)
        self.buf[split] = [[], [], []]

    def close(self, ok: bool) -> None:
        for s in SPLITS:
            if ok:
                self._flush(s)
            self._pq[s].close()
            if self.write_jsonl:
                self._jl[s].close()
            exc = (None, None, None) if ok else (RuntimeError, RuntimeError("aborted"), None)
            for ctx in reversed(self._ctx[s]):
                try:
                    ctx.__exit__(*exc)
                except RuntimeError:
                    pass


def prepare(cfg: DataConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run stage 01: read `cfg.input`, write cleaned splits, rejects and stats into `out_dir`.

    Args:
        cfg: stage settings.
        out_dir: output folder (defaults to `cfg.out_dir`).
        progress: show a tqdm bar over input bytes.

    Returns:
        The stats dict (also written to `out_dir/stats.json`).

    Raises:
        InputError: only when the input cannot be read at all.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    src = Path(cfg.input)
    out = Path(out_dir or cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size if src.is_file() else 0
    lines = iter_lines(src)  # raises InputError before anything is written

    filtered = dict.fromkeys(
        ["empty_title", "empty_content", "short_content", "duplicate_uid", "duplicate_title_content", "not_sampled"], 0
    )
    rejected: dict[str, int] = {}
    truncated = 0
    seen_uid: set[str] = set()
    seen_pair: set[int] = set()
    n_lines = 0
    min_c, max_c, max_t, seed = cfg.min_content_chars, cfg.max_content_chars, cfg.max_title_chars, cfg.seed
    val_cut, test_cut = cfg.validation_frac, cfg.validation_frac + cfg.test_frac
    sample = cfg.sample
    heap: list[tuple[int, str, str, str]] = []  # max-heap (negated key) of the `sample` smallest keys
    writer = None if sample else _SplitWriter(out, cfg.write_jsonl)
    ok = False
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"prepare {src.name}", disable=not progress, mininterval=1)
    rejects_ctx = atomic_path(out / "rejects.jsonl")
    rejects_fh = open(rejects_ctx.__enter__(), "wb")  # noqa: SIM115
    try:
        done_bytes = 0
        for n_lines, raw in lines:
            done_bytes += len(raw) + 1
            if n_lines % 65536 == 0:
                bar.update(done_bytes - bar.n)
            parsed = parse_line(raw, cfg.uid_from_text)
            if type(parsed) is str:
                rejected[parsed] = rejected.get(parsed, 0) + 1
                rejects_fh.write(orjson.dumps(Reject(n_lines, parsed, raw).to_dict(str(src))) + b"\n")
                continue
            uid, title, content = parsed
            title = clean_text(title)
            if not title:
                filtered["empty_title"] += 1
                continue
            if not content:
                filtered["empty_content"] += 1
                continue
            content = clean_text(content)
            if not content:
                filtered["empty_content"] += 1
                continue
            if len(content) < min_c:
                filtered["short_content"] += 1
                continue
            if len(content) > max_c:
                content = truncate_text(content, max_c)
                truncated += 1
            if len(title) > max_t:
                title = truncate_text(title, max_t)
            if uid in seen_uid:
                filtered["duplicate_uid"] += 1
                continue
            seen_uid.add(uid)
            pair = hash((title, content))
            if pair in seen_pair:
                filtered["duplicate_title_content"] += 1
                continue
            seen_pair.add(pair)
            key, pos = _keys(uid, seed)
            if writer is not None:
                writer.add("validation" if pos < val_cut else "test" if pos < test_cut else "train", uid, title, content)
            elif len(heap) < sample:
                heapq.heappush(heap, (-key, uid, title, content))
            else:
                filtered["not_sampled"] += 1
                if -key > heap[0][0]:
                    heapq.heapreplace(heap, (-key, uid, title, content))
        bar.update(size - bar.n if size else 0)
        if writer is None:
            writer = _SplitWriter(out, cfg.write_jsonl)
            rows = sorted(heap, key=lambda r: _keys(r[1], seed + 1)[0])  # seeded shuffle of the sample
            n_val, n_test = round(len(rows) * cfg.validation_frac), round(len(rows) * cfg.test_frac)
            for i, (_, uid, title, content) in enumerate(rows):
                writer.add("validation" if i < n_val else "test" if i < n_val + n_test else "train", uid, title, content)
        ok = True
    finally:
        bar.close()
        rejects_fh.close()
        if writer is not None:
            writer.close(ok)
        rejects_ctx.__exit__(*((None, None, None) if ok else (RuntimeError, RuntimeError("aborted"), None)))

    kept = sum(writer.counts.values())
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
    assert stats["input_lines"] == kept + sum(filtered.values()) + stats["rejected"], stats
    write_json(out / "stats.json", stats)
    log.info(
        "prepare: %d lines -> %d kept, %d filtered, %d rejected in %.1fs; wrote %s",
        n_lines, kept, sum(filtered.values()), stats["rejected"], stats["seconds"], out,
    )
    return stats


def load_split(data_dir: str | Path, split: str) -> "Any":
    """Load one prepared split as a pandas DataFrame (columns uid, title, content)."""
    import pandas as pd

    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run stage 01 (prodtune prepare) first")
    return pd.read_parquet(path)


def before_after(path: str | Path, n: int = 6, scan_lines: int = 20000) -> "Any":
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


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register `prodtune prepare`."""
    p = sub.add_parser("prepare", help="stage 01: clean, filter, sample and split trn.json")
    p.add_argument("--input", help="trn.json / .jsonl / .gz")
    p.add_argument("--out", help="output folder (default: the profile's data_dir/prepared)")
    p.add_argument("--min-content-chars", type=int)
    p.add_argument("--max-content-chars", type=int)
    p.add_argument("--sample", type=int, help="keep N products")
    p.add_argument("--seed", type=int)
    p.add_argument("--no-jsonl", action="store_true", help="write Parquet only")
    p.add_argument("--uid-from-text", action="store_true", help="hash title+content into a uid where it is null")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    from prodtune.config import stage_config

    cfg = stage_config(
        DataConfig, args.profile, "data", args.set,
        input=args.input, out_dir=args.out, min_content_chars=args.min_content_chars,
        max_content_chars=args.max_content_chars, sample=args.sample, seed=args.seed,
        write_jsonl=False if args.no_jsonl else None, uid_from_text=True if args.uid_from_text else None,
    )
    stats = prepare(cfg)
    print(orjson.dumps({k: stats[k] for k in ("input_lines", "kept", "filtered", "rejected", "splits")}).decode())
    return 0
