"""Stage 01: stream, clean, filter, deduplicate, sample and split the AmazonTitles-1.3MM dump.

    prodtune prepare --input data/sample/trn_sample.jsonl --out data/cpu/prepared --sample 300

Reads `trn.json` / `.jsonl` / `.gz` line by line (never the whole file as Python objects), writes
`{train,validation,test}.parquet` (+ `.jsonl` with `--jsonl`), `rejects.jsonl` and `stats.json` into the out folder.
Every input line is accounted for: `input_lines = kept + sum(filtered.values()) + rejected`.
"""

from __future__ import annotations

import base64
import os
import collections
import contextlib
import gzip
import hashlib
import html
import io
import itertools
import mmap
import re
import threading
import time
import unicodedata
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from prodtune import jsonscan, kernels
from prodtune.io import InputError, atomic_path, log, write_json  # (InputError re-exported here)

SPLITS = ("train", "validation", "test")
REQUIRED_FIELDS = ("uid", "title", "content")
SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])


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
    write_jsonl: bool = field(default=False, metadata={
        "help": "also write {split}.jsonl next to the Parquet (a second copy of the text: 0.9 GB for the full dump)"})
    parquet_compression: str = field(default="snappy", metadata={
        "help": "snappy (fast, shrinks text ~2.3x; the Parquet default), lz4, zstd (smallest) or none (largest)"})
    uid_from_text: bool = field(default=False, metadata={"help": "give rows with a null uid a hash of title+content"})
    cleaner: str = field(default="prodtune", metadata={"help": "prodtune (readable text) or study (the study's regex; "
                                                               "only to train the reference recipe in stage 06)"})

    def __post_init__(self) -> None:
        if self.min_content_chars < 0 or self.max_content_chars < max(1, self.min_content_chars):
            raise ValueError("need 0 <= min_content_chars <= max_content_chars")
        if not (0 <= self.validation_frac < 1 and 0 <= self.test_frac < 1 and self.validation_frac + self.test_frac < 1):
            raise ValueError("validation_frac and test_frac must be in [0, 1) and sum below 1")
        if self.parquet_compression not in ("lz4", "snappy", "zstd", "none"):
            raise ValueError(f"parquet_compression must be lz4, snappy, zstd or none, not {self.parquet_compression!r}")
        if self.cleaner not in ("prodtune", "study"):
            raise ValueError(f"cleaner must be 'prodtune' or 'study', not {self.cleaner!r}")
        if self.sample is not None and self.sample < 1:
            raise ValueError("sample must be a positive number of products or null")


# ----------------------------------------------------------------------------------------------
# Cleaning
# ----------------------------------------------------------------------------------------------

_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", re.S)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|h[1-6])\b[^<>]*>", re.I)
# C0/C1 control characters other than whitespace, and zero-width characters.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\ufeff]")


def _decode(text: str) -> str:
    """The steps of `clean_text` that need Python: entities, tags, and for non-ASCII text control characters and NFC.

    What is left is ASCII control characters and whitespace: `clean_text(t)` is `_decode(t)` with those removed and
    whitespace collapsed and stripped as `" ".join(t.split())` does (`clean_array` does that part in Arrow).
    """
    if "&" in text:
        text = html.unescape(text)
        if "&" in text:  # `&amp;#8217;` is common in the dump: decode twice at most (no "&" left: nothing to decode)
            text = html.unescape(text)
    if "<" in text:
        text = _TAG.sub("", _BLOCK_TAG.sub(" ", text))
    if not text.isascii():
        text = unicodedata.normalize("NFC", _CONTROL.sub("", text))
    return text


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
    text = _decode(text)
    if not text.isprintable():  # control characters or whitespace other than " " (NFC never creates spaces)
        return " ".join(_CONTROL.sub("", text).split())
    if "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    while "  " in text:  # only spaces to collapse: str.replace is a C loop, split/join builds a str per word
        text = text.replace("  ", " ")
    return text.strip(" ")


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


_BLOCK_BYTES = 8 << 20  # raw bytes per block; one block is parsed by Arrow at once
_SUB_BLOCK_BYTES = 256 << 10  # a block with a bad line is retried in pieces this big before going line by line
_JSON_SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
# Rows `clean_text` might change: an entity, a tag, a character outside printable ASCII (controls, non-ASCII,
# whitespace other than " "), or spaces to collapse or strip. Other rows skip cleaning altogether.
_NEEDS_WORK = r"&[#A-Za-z]|<[A-Za-z!/]|[^ -~]|  |^ | $"
# Of those, rows with an entity, a tag or non-ASCII text go through Python (`_decode`); the rest only need control
# characters removed and whitespace collapsed, which Arrow does.
_NEEDS_PYTHON = r"&[#A-Za-z]|<[A-Za-z!/]|[^\x00-\x7f]"
_ASCII_CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # `_CONTROL`'s ASCII part
# Whitespace as `str.split` sees it (`str.isspace`); a run of it, or one such character that is not " ", becomes " ".
_WS = r"\t-\r\x1c-\x1f\x{85}\x{a0}\x{1680}\x{2000}-\x{200a}\x{2028}\x{2029}\x{202f}\x{205f}\x{3000}"
_WS_RUN = rf"[ {_WS}]{{2,}}|[{_WS}]"


def _iter_blocks(path: str | Path, block_bytes: int = _BLOCK_BYTES) -> Iterator[tuple[int, bytes]]:
    """Yield `(first_line_number, chunk)` where each chunk holds whole lines (the last one may lack a newline)."""
    fh = open_input(path)
    line_no, rest = 1, b""
    try:
        while True:
            try:
                buf = fh.read(block_bytes)
            except (EOFError, gzip.BadGzipFile, OSError) as e:
                log.warning("%s: input ends early (%s); rows read so far are kept", path, e)
                buf = b""
            if not buf:
                if rest:
                    yield line_no, rest
                return
            buf = rest + buf
            cut = buf.rfind(b"\n") + 1
            if cut == 0:
                rest = buf
                continue
            chunk, rest = buf[:cut], buf[cut:]
            yield line_no, chunk
            line_no += chunk.count(b"\n")
    finally:
        fh.close()


def _block_specs(path: str | Path, block_bytes: int | None = None) -> Iterator[tuple[int, int] | bytes]:
    """Plain files: `(offset, length)` of blocks of whole lines, found by seeking (workers read them);
    compressed files: the decompressed chunks themselves."""
    block_bytes = block_bytes or _BLOCK_BYTES
    fh = open_input(path)
    if not isinstance(fh, io.BufferedReader):
        fh.close()
        yield from (chunk for _, chunk in _iter_blocks(path, block_bytes))
        return
    with fh:
        size = os.fstat(fh.fileno()).st_size
        start = 0
        while start < size:
            end = min(start + block_bytes, size)
            if end < size:
                fh.seek(end)
                while True:
                    piece = fh.read(1 << 16)
                    if not piece:
                        end = size
                        break
                    nl = piece.find(b"\n")
                    if nl >= 0:
                        end += nl + 1
                        break
                    end += len(piece)
            yield (start, end - start)
            start = end


def _run_block(spec: tuple[int, int] | bytes, fileno: int | None, cfg: DataConfig,
               warming: threading.Lock | None = None) -> "_Block":
    """Worker entry: map a block of the file (read in place, not copied) or take the bytes given, and process it;
    line numbers are block-relative. The map is closed after the block, so its pages do not stay in our RSS.

    `warming`: while the compiled scanner loads (`_warm_up`), one worker at a time takes a block (by the exact
    path) and a core is left to the loading, which is Python and slowed by two busy workers (0.5 vs 0.3 s): the
    exact path costs 3x the scanner's CPU (72 vs 24 ms per block)."""
    if warming is not None and not jsonscan._ready.is_set():
        with warming:
            return _run_block(spec, fileno, cfg)
    if isinstance(spec, bytes):
        return _process_block(1, spec, cfg)
    start, length = spec
    base = start - start % mmap.ALLOCATIONGRANULARITY
    mapped = mmap.mmap(fileno, length + start - base, offset=base, access=mmap.ACCESS_READ)
    chunk = memoryview(mapped)[start - base :]
    try:
        return _process_block(1, chunk, cfg)
    finally:
        # If a view of it is still alive (numba's first compile of `jsonscan` holds its arguments a while), the
        # map is closed when that view goes.
        with contextlib.suppress(BufferError):
            chunk.release()
            mapped.close()


def _n_lines(chunk: bytes | memoryview) -> int:
    # numpy counts 8 MB in ~1 ms without the GIL; bytes.count took 2.5 ms holding it
    a = np.frombuffer(chunk, np.uint8)
    return int(np.count_nonzero(a == 10)) + (1 if len(a) and a[-1] != 10 else 0)


def _parse_chunk(chunk: bytes | memoryview, first_line: int, uid_from_text: bool, sub: bool = False,
                 n: int | None = None) -> tuple[list[pa.Table], list[Reject]]:
    """Parse a chunk with Arrow; where it holds a bad line, retry smaller pieces, then go line by line.

    Arrow's reader is exact for well-formed rows (explicit string schema, other fields ignored). Any line it
    cannot take as a product row (bad JSON or UTF-8, a missing field, a number where text belongs, a blank
    line) makes it fail or return nulls or fewer rows; that piece then goes through `parse_line`, which
    names the line and the reason.
    """
    n = _n_lines(chunk) if n is None else n
    try:
        buf = _utf8_checked(chunk)
        tab = pa_json.read_json(
            pa.BufferReader(buf),  # read in C, no copy (a Python file object is read holding the GIL)
            read_options=pa_json.ReadOptions(block_size=1 << 20, use_threads=False),
            parse_options=pa_json.ParseOptions(explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="ignore"),
        )
        if tab.num_rows == n and not any(tab.column(c).null_count for c in REQUIRED_FIELDS) and _uids_nonempty(tab):
            return [tab], []
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    chunk = bytes(chunk)  # a bad line somewhere: the slow paths split and search the bytes
    if not sub and len(chunk) > _SUB_BLOCK_BYTES:
        tables, rejects, line = [], [], first_line
        for start, piece in _split_chunk(chunk, _SUB_BLOCK_BYTES):
            t, r = _parse_chunk(piece, line, uid_from_text, sub=True)
            tables += t
            rejects += r
            line += _n_lines(piece)
        return tables, rejects
    uids, titles, contents, rejects = [], [], [], []
    for i, raw in enumerate(chunk.split(b"\n")[:n]):
        parsed = parse_line(raw.rstrip(b"\r"), uid_from_text)
        if type(parsed) is str:
            rejects.append(Reject(first_line + i, parsed, raw))
        else:
            uids.append(parsed[0])
            titles.append(parsed[1])
            contents.append(parsed[2])
    return [pa.table([uids, titles, contents], schema=_JSON_SCHEMA)], rejects


def _utf8_checked(chunk: bytes | memoryview) -> pa.Buffer:
    """The chunk as an Arrow buffer (not copied), after checking it is UTF-8 (raises `pa.ArrowInvalid` if not):
    neither Arrow's JSON reader nor `jsonscan` checks it."""
    buf = pa.py_buffer(chunk)
    offsets = pa.array([0, len(chunk)], pa.int64()).buffers()[1]
    pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, buf]).cast(pa.large_string())
    return buf


def _uids_nonempty(tab: pa.Table) -> bool:
    return not pc.any(pc.equal(pc.utf8_length(tab.column("uid")), 0)).as_py()


def _split_chunk(chunk: bytes, size: int) -> Iterator[tuple[int, bytes]]:
    start = 0
    while start < len(chunk):
        end = chunk.find(b"\n", min(start + size, len(chunk) - 1))
        end = len(chunk) if end < 0 else end + 1
        yield start, chunk[start:end]
        start = end


def _clean_parts(arr: pa.Array, codes: np.ndarray | None = None) -> tuple[np.ndarray | None, pa.Array | None]:
    """The rows of `arr` (no chunks) that `clean_text` changes, and their cleaned text: `(mask, cleaned)`, or
    `(None, None)` when no row changes. `codes`, if given, are `jsonscan`'s (see `_clean_truncate`). Only rows
    with entities, tags or non-ASCII text go through Python; control characters and whitespace are handled by
    Arrow's regex kernels, which release the GIL."""
    if len(arr) == 0:
        return None, None
    codes = _regex_codes(arr) if codes is None else codes  # (null rows: 0, left alone)
    mask = codes != 0
    if not mask.any():
        return None, None
    sub = arr.filter(pa.array(mask))
    py = pa.array(codes[mask] == 3)  # (rows the scanner decoded already have code 1: not decoded twice)
    if pc.any(py).as_py():
        sub = pc.replace_with_mask(sub, py, pa.array([_decode(t) for t in sub.filter(py).to_pylist()], pa.string()))
    sub = pc.replace_substring_regex(sub, _ASCII_CONTROL, "")
    sub = pc.utf8_trim(pc.replace_substring_regex(sub, _WS_RUN, " "), " ")
    return mask, sub


def clean_array(arr: pa.Array) -> pa.Array:
    """`clean_text` over an Arrow string array, the same result row by row; rows that need nothing are not touched."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    mask, sub = _clean_parts(arr)
    return arr if mask is None else pc.replace_with_mask(arr, pa.array(mask), sub)


def study_clean_array(arr: pa.Array) -> pa.Array:
    """The study's cleaner over an Arrow array (`reference_clean`): every non-alphanumeric character removed."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(arr, r"[^A-Za-z0-9 ]+", ""))


def _clean_truncate(arr: pa.Array | pa.ChunkedArray, cleaner: str, max_chars: int,
                    work: np.ndarray | None = None, compiled: bool | None = None,
                    in_place: bool = False) -> tuple[pa.Array, np.ndarray]:
    """Clean a column and truncate rows longer than `max_chars` (`truncate_text`), copying the text once.

    Returns the new column and each row's cleaned length before truncation. `work`: `jsonscan`'s codes of the
    rows (0 nothing to do; 1 whitespace and control characters only, the scanner having decoded any entities;
    3 Python: `_decode`), or None (then `_NEEDS_WORK` and `_NEEDS_PYTHON` decide).
    `compiled` (default: once `kernels` is loaded): whitespace, control characters and truncation in one compiled
    pass (`kernels.finish_column`, into `arr`'s own buffer if `in_place`: the caller gives `arr` up), else with
    Arrow's kernels and Python; the same result.
    """
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if compiled is None:
        compiled = kernels.ready()
    if compiled:
        if cleaner == "study":
            return kernels.finish_column(study_clean_array(arr), None, None, None, max_chars, in_place=True)
        codes = _regex_codes(arr) if work is None else work
        py_rows = np.flatnonzero(codes == 3)
        py_text = None
        if len(py_rows):
            py_text = pa.array([_decode(t) for t in arr.take(py_rows).to_pylist()], pa.string())
        return kernels.finish_column(arr, codes != 0, py_rows, py_text, max_chars, in_place=in_place)
    if cleaner == "study":
        arr, mask, sub = study_clean_array(arr), None, None
    else:
        mask, sub = _clean_parts(arr, work)
    # rows left alone are printable ASCII (and the study cleaner leaves only ASCII): their length is their byte count
    length = pc.binary_length(arr).to_numpy(zero_copy_only=False).copy()
    if mask is not None:
        length[mask] = pc.utf8_length(sub).to_numpy(zero_copy_only=False)
    long_ = length > max_chars
    if long_.any():  # long rows join the rows to replace, with their cleaned text truncated
        changed = long_ if mask is None else mask | long_
        vals = arr.filter(pa.array(changed))
        if mask is not None:
            vals = pc.replace_with_mask(vals, pa.array(mask[changed]), sub)
        cut = pa.array(long_[changed])
        vals = pc.replace_with_mask(
            vals, cut, pa.array([truncate_text(t, max_chars) for t in vals.filter(cut).to_pylist()], pa.string()))
        mask, sub = changed, vals
    if mask is not None:
        arr = pc.replace_with_mask(arr, pa.array(mask), sub)
    return arr, length


@dataclass
class _Block:
    """One block after parsing, cleaning and the per-row filters, ready for deduplication.

    `table` holds every parsed row (cleaned); `kept` indexes the rows that passed the filters: the text is copied
    once more, when the rows are written.
    """

    table: pa.Table
    kept: np.ndarray
    rejects: list[Reject]
    lines: int
    bytes: int
    filtered: dict[str, int]
    truncated: int


def _process_block(first_line: int, chunk: bytes | memoryview, cfg: DataConfig) -> _Block:
    fast = None
    with contextlib.suppress(pa.ArrowInvalid):
        # one pass, a row per line; None: a line it does not take, or the scanner is still loading (`warm_up`)
        fast = jsonscan.scan_block(_utf8_checked(chunk), wait=False, entities=cfg.cleaner == "prodtune")
    if fast is not None:
        (tab, work_t, work_c), rejects = fast, []
        n_lines = tab.num_rows
    elif jsonscan._ready.is_set() and len(chunk) > _SUB_BLOCK_BYTES:
        # the scanner refused a line: pieces of the block it takes go its way, the rest the exact way
        tab, work_t, work_c, rejects, n_lines = _scan_pieces(bytes(chunk), first_line, cfg)
    else:
        n_lines = _n_lines(chunk)
        tables, rejects = _parse_chunk(chunk, first_line, cfg.uid_from_text, n=n_lines)
        tab = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        work_t = work_c = None
    compiled = kernels.ready()
    # (in place: the parsed columns are not used again)
    title, title_len = _clean_truncate(tab.column("title"), cfg.cleaner, cfg.max_title_chars, work_t, compiled, True)
    content, content_len = _clean_truncate(tab.column("content"), cfg.cleaner, cfg.max_content_chars, work_c,
                                           compiled, True)
    empty_title = title_len == 0
    empty_content = ~empty_title & (content_len == 0)  # empty before or after cleaning
    rest = ~empty_title & ~empty_content
    short = rest & (content_len < cfg.min_content_chars)
    keep = rest & ~short
    filtered = {"empty_title": int(empty_title.sum()), "empty_content": int(empty_content.sum()),
                "short_content": int(short.sum())}
    tab = pa.table([tab.column("uid").combine_chunks(), title, content], schema=_JSON_SCHEMA)
    return _Block(tab, np.flatnonzero(keep), rejects, n_lines, len(chunk), filtered,
                  truncated=int((keep & (content_len > cfg.max_content_chars)).sum()))


def _scan_pieces(chunk: bytes, first_line: int, cfg: DataConfig
                 ) -> tuple[pa.Table, np.ndarray, np.ndarray, list[Reject], int]:
    """A block with a line the scanner does not take, in pieces of `_SUB_BLOCK_BYTES`: each piece the scanner takes
    is scanned, the others take the exact path (their rows' codes then come from `_NEEDS_WORK`/`_NEEDS_PYTHON`).
    Returns (table, title codes, content codes, rejects, lines)."""
    tables, codes_t, codes_c, rejects, line = [], [], [], [], first_line
    for _, piece in _split_chunk(chunk, _SUB_BLOCK_BYTES):
        got = None
        with contextlib.suppress(pa.ArrowInvalid):
            got = jsonscan.scan_block(_utf8_checked(piece), entities=cfg.cleaner == "prodtune")
        if got is not None:
            tab, t, c = got
            n = tab.num_rows
        else:
            n = _n_lines(piece)
            parts, rej = _parse_chunk(piece, line, cfg.uid_from_text, sub=True, n=n)
            tab = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
            t, c = _regex_codes(tab.column("title")), _regex_codes(tab.column("content"))
            rejects += rej
        tables.append(tab)
        codes_t.append(t)
        codes_c.append(c)
        line += n
    return pa.concat_tables(tables), np.concatenate(codes_t), np.concatenate(codes_c), rejects, line - first_line


def _regex_codes(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """`jsonscan`'s codes of rows it did not scan: 3 if `_NEEDS_PYTHON`, else 1 if `_NEEDS_WORK`, else 0."""
    if len(arr) == 0:
        return np.zeros(0, np.uint8)
    work = pc.fill_null(pc.match_substring_regex(arr, _NEEDS_WORK), False).to_numpy(zero_copy_only=False)
    py = pc.fill_null(pc.match_substring_regex(arr, _NEEDS_PYTHON), False).to_numpy(zero_copy_only=False)
    return np.where(py, 3, np.where(work, 1, 0)).astype(np.uint8)


def _warm_up() -> None:
    """Load the compiled scanner, then the other kernels (stage 01 runs this in a thread while it starts)."""
    jsonscan.warm_up()
    kernels.warm_up()


class _SplitWriter:
    """Writes each split as Parquet (+ JSONL) row groups into temporary files, renamed into place at close."""

    def __init__(self, out: Path, write_jsonl: bool, compression: str = "snappy"):
        self.out, self.write_jsonl = out, write_jsonl
        self.counts = dict.fromkeys(SPLITS, 0)
        self._stack = contextlib.ExitStack()
        self._pq, self._jl = {}, {}
        for s in SPLITS:
            tmp = self._stack.enter_context(atomic_path(out / f"{s}.parquet"))
            # Long unique strings: dictionary encoding only costs time. Snappy wrote the full-size file's splits
            # faster than lz4 (1.6 vs 2.1 s) and smaller (348 vs 392 MiB; zstd 243 MiB in 2.9 s, none 801 MiB in 0.4 s).
            self._pq[s] = self._stack.enter_context(
                pq.ParquetWriter(tmp, SCHEMA, compression=compression, use_dictionary=["uid"], write_statistics=["uid"])
            )
            if write_jsonl:
                jtmp = self._stack.enter_context(atomic_path(out / f"{s}.jsonl"))
                self._jl[s] = self._stack.enter_context(open(jtmp, "wb"))

    def write(self, split: str, tab: pa.Table) -> None:
        if tab.num_rows == 0:
            return
        self._pq[split].write_table(tab)
        if self.write_jsonl:
            cols = [tab.column(c).combine_chunks() for c in ("uid", "title", "content")]
            if kernels.ready() and not any(c.null_count for c in cols):
                self._jl[split].write(kernels.jsonl(*cols))  # what orjson writes, without a Python object per row
            else:
                self._jl[split].write(b"".join(orjson.dumps({"uid": u, "title": t, "content": c}) + b"\n"
                                               for u, t, c in zip(*(c.to_pylist() for c in cols))))
        self.counts[split] += tab.num_rows

    def close(self, ok: bool) -> None:
        """Finish the files; on failure (`ok=False`) the temporary files are removed and old outputs stay."""
        if ok:
            self._stack.close()
        else:
            self._stack.__exit__(RuntimeError, RuntimeError("prepare aborted"), None)


def _pool(size: int) -> Executor:
    """Two worker threads: Arrow's parsing, regexes and Parquet encoding release the GIL (measured: two worker
    processes were slower here, the pickling of blocks costing more than the GIL)."""
    return ThreadPoolExecutor(2 if size > _BLOCK_BYTES else 1)


def _split_of(pos: np.ndarray, val_cut: float, test_cut: float) -> np.ndarray:
    return np.where(pos < val_cut, 1, np.where(pos < test_cut, 2, 0))


def prepare(cfg: DataConfig, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run stage 01: read `cfg.input`, write cleaned splits, rejects and stats into `out_dir`.

    Blocks of the input (8 MB) are parsed and cleaned in two threads: `jsonscan` reads a block of plain
    lines in one compiled pass, decoding the entities it can (a block with another line: in pieces, the
    refused pieces by Arrow's JSON reader, then line by line for the reject reasons); only rows with tags,
    other entities or characters NFC may change go through Python (`_decode`); whitespace, control characters
    and truncation are one compiled pass (`kernels.finish_column`). The main thread deduplicates in input
    order (`kernels.row_keys`, `kernels.Seen`), so the result is the same as cleaning line by line, and writes
    the splits. Sampling and splitting use seeded hashes of the uid (xxh3-64): a product's split does not
    depend on the order of the file or on the other products.

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
    specs = _block_specs(src)
    first = next(specs, None)  # raises InputError before anything is written
    out.mkdir(parents=True, exist_ok=True)
    size = src.stat().st_size
    filtered = dict.fromkeys(
        ["empty_title", "empty_content", "short_content", "duplicate_uid", "duplicate_title_content", "not_sampled"], 0
    )
    rejected: dict[str, int] = {}
    truncated = n_lines = 0
    seen = kernels.Seen()
    val_cut, test_cut = cfg.validation_frac, cfg.validation_frac + cfg.test_frac
    held: tuple[pa.Table, np.ndarray, np.ndarray] | None = None  # with --sample: candidates so far, their keys
    # Large inputs: load the compiled scanner meanwhile (small ones are done before it would be ready)
    warm = threading.Thread(target=_warm_up, name="prodtune-kernels-warm-up", daemon=True)
    warming = None
    if size > 4 * _BLOCK_BYTES:
        warm.start()
        warming = threading.Lock()
    writer = _SplitWriter(out, cfg.write_jsonl, cfg.parquet_compression)
    rejects_ctx = atomic_path(out / "rejects.jsonl")
    rejects_tmp = rejects_ctx.__enter__()
    ok = False
    bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"prepare {src.name}", disable=not progress, mininterval=1)
    try:
        # plain files: workers map their blocks of it (`_run_block`)
        with open(rejects_tmp, "wb") as rejects_fh, _pool(size) as pool, open(src, "rb") as plain:
            pending: collections.deque = collections.deque()
            for spec in itertools.chain([first] if first is not None else [], specs, [None]):
                if spec is not None:
                    pending.append(pool.submit(_run_block, spec, plain.fileno(), cfg, warming))
                while pending and (spec is None or len(pending) > 4):
                    b = pending.popleft().result()
                    for r in b.rejects:
                        r.line += n_lines
                        rejected[r.reason] = rejected.get(r.reason, 0) + 1
                        rejects_fh.write(orjson.dumps(r.to_dict(str(src))) + b"\n")
                    n_lines += b.lines
                    bar.update(b.bytes)
                    truncated += b.truncated
                    for k, v in b.filtered.items():
                        filtered[k] += v
                    if len(b.kept) == 0:
                        continue
                    # Dedup in input order: a row goes if its uid was seen, else if its (title, content) was seen.
                    kernels.warm_up()  # (loaded meanwhile by `warm`; the workers go on while this waits)
                    rows = b.kept
                    k_sample, k_split, pair_a, pair_b = kernels.row_keys(
                        rows, *(b.table.column(c).chunk(0) for c in ("uid", "title", "content")), cfg.seed)
                    # the uid's key: its two seeded 64-bit hashes (the sampling and split keys)
                    mask, dup_uid, dup_pair = seen.first_unseen(k_sample, k_split, pair_a, pair_b)
                    if dup_uid or dup_pair:
                        filtered["duplicate_uid"] += dup_uid
                        filtered["duplicate_title_content"] += dup_pair
                        rows, k_sample, k_split = rows[mask], k_sample[mask], k_split[mask]
                    if cfg.sample:
                        tab = b.table.take(rows)
                        if held is not None:
                            tab = pa.concat_tables([held[0], tab])
                            k_sample, k_split = np.concatenate([held[1], k_sample]), np.concatenate([held[2], k_split])
                        if tab.num_rows > cfg.sample:
                            idx = np.sort(np.argsort(k_sample, kind="stable")[: cfg.sample])
                            filtered["not_sampled"] += tab.num_rows - cfg.sample
                            tab, k_sample, k_split = tab.take(idx), k_sample[idx], k_split[idx]
                        held = (tab, k_sample, k_split)
                    else:  # the one copy of the kept text: straight from the block into each split
                        which = _split_of(k_split / np.float64(2**64), val_cut, test_cut)
                        for j, s in enumerate(SPLITS):
                            writer.write(s, b.table.take(rows[which == j]))
        if cfg.sample and held is not None:
            tab, _, k_split = held
            order = np.argsort(k_split, kind="stable")  # a seeded shuffle of the sample
            n_val, n_test = round(len(order) * cfg.validation_frac), round(len(order) * cfg.test_frac)
            parts = {"validation": order[:n_val], "test": order[n_val : n_val + n_test], "train": order[n_val + n_test :]}
            for s in SPLITS:
                writer.write(s, tab.take(np.sort(parts[s])))
        ok = True
    finally:
        bar.close()
        if warm.is_alive():
            warm.join()  # not left compiling when the interpreter exits (a machine's first run: ~20 s)
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
    if stats["input_lines"] != kept + sum(filtered.values()) + stats["rejected"]:
        raise RuntimeError(f"row accounting is off (a bug): {stats}")
    write_json(out / "stats.json", stats)
    log.info(
        "prepare: %d lines -> %d kept, %d filtered, %d rejected in %.1fs; wrote %s",
        n_lines, kept, sum(filtered.values()), stats["rejected"], stats["seconds"], out,
    )
    return stats


def load_split(data_dir: str | Path, split: str) -> "Any":
    """Load one prepared split as a pandas DataFrame (columns uid, title, content)."""
    path = Path(data_dir) / f"{split}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run stage 01 (prodtune prepare / notebook 01) first")
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
    p.add_argument("--jsonl", action="store_true", help="also write {split}.jsonl (default: Parquet only)")
    p.add_argument("--no-jsonl", action="store_true", help="write Parquet only (the default)")
    p.add_argument("--uid-from-text", action="store_true", help="hash title+content into a uid where it is null")
    p.set_defaults(func=_cli)


def _cli(args: Any) -> int:
    from prodtune.config import stage_config

    cfg = stage_config(
        DataConfig, args.profile, "data", args.set,
        input=args.input, out_dir=args.out, min_content_chars=args.min_content_chars,
        max_content_chars=args.max_content_chars, sample=args.sample, seed=args.seed,
        write_jsonl=False if args.no_jsonl else True if args.jsonl else None,
        uid_from_text=True if args.uid_from_text else None,
    )
    stats = prepare(cfg)
    print(orjson.dumps({k: stats[k] for k in ("input_lines", "kept", "filtered", "rejected", "splits")}).decode())
    return 0
