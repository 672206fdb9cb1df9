"""Stage 01's reading: blocks of whole lines from a `.json`/`.jsonl`/`.gz` file, parsed by Arrow's JSON reader.

    python -c "from prodtune.data.read import parse_line; print(parse_line(b'{\"uid\": 1, \"title\": \"t\"}'))"

Arrow's reader (explicit string schema, other fields ignored) parses a block at once. A block it cannot take whole
(bad JSON or UTF-8, a missing field, a number where text belongs, a blank line) is retried in smaller pieces, and
a piece that still fails goes line by line through `parse_line` (orjson), which names each bad line and its reason.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json

from prodtune.io import InputError, log

SCHEMA = pa.schema([("uid", pa.string()), ("title", pa.string()), ("content", pa.string())])
REQUIRED_FIELDS = ("uid", "title", "content")
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte-order mark at the start of a file is read as nothing


def open_input(path: str | Path) -> io.BufferedIOBase:
    """Open a `.json`/`.jsonl` file, or a gzip one (told by its first bytes), for binary reading.

    Raises:
        InputError: when the file is missing, is a folder, or cannot be opened.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file")
    if not p.is_file():
        raise InputError(f"{p}: not a file")
    try:
        fh = open(p, "rb", buffering=1 << 20)  # noqa: SIM115 - returned to the caller
        if fh.peek(2)[:2] == b"\x1f\x8b":
            fh.close()
            return gzip.open(p, "rb")  # type: ignore[return-value]
        return fh
    except OSError as e:
        raise InputError(f"{p}: cannot read: {e}") from e


def iter_lines(path: str | Path) -> Iterator[tuple[int, bytes]]:
    """Yield `(line_number, raw_bytes)` for each line (1-based, newline and a leading BOM stripped), streaming."""
    fh = open_input(path)
    try:
        for n, raw in enumerate(fh, 1):
            if n == 1 and raw.startswith(BOM):
                raw = raw[len(BOM) :]
            yield n, raw.rstrip(b"\r\n")
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        log.warning("%s: input ends early (%s); rows read so far are kept", path, e)
    finally:
        fh.close()


def read_blocks(path: str | Path, block_bytes: int) -> Iterator[bytes | memoryview]:
    """Yield chunks of about `block_bytes` holding whole lines (the file's last line may lack its newline).

    Raises:
        InputError: when the file cannot be read or holds nothing (0 bytes, or only a byte-order mark).
    """
    fh = open_input(path)
    seekable = isinstance(fh, io.BufferedReader)  # a plain file: the part line after a block is read again
    rest, first = b"", True
    try:
        while True:
            try:
                buf = fh.read(block_bytes)
            except (EOFError, gzip.BadGzipFile, OSError) as e:
                if first:
                    raise InputError(f"{path}: cannot read: {e}") from e
                log.warning("%s: input ends early (%s); rows read so far are kept", path, e)
                buf = b""
            if first:
                buf = buf[len(BOM) :] if buf.startswith(BOM) else buf
                if not buf:
                    raise InputError(f"{path}: the file is empty")
                first = False
            if not buf:
                if rest:
                    yield rest
                return
            if rest:
                buf = rest + buf
            cut = buf.rfind(b"\n") + 1
            if cut == 0:  # no line ends in this block: read on
                rest = buf
                continue
            if cut < len(buf) and seekable:
                fh.seek(cut - len(buf), io.SEEK_CUR)
                rest = b""
            else:
                rest = buf[cut:]
            yield memoryview(buf)[:cut] if cut < len(buf) else buf
    finally:
        fh.close()


@dataclass
class Reject:
    """One input line that could not be used as a product row."""

    line: int
    reason: str
    raw: bytes

    def to_dict(self, file: str) -> dict[str, Any]:
        """The rejects.jsonl record; bytes that are not UTF-8 are kept in `raw_base64`."""
        try:
            return {"file": file, "line": self.line, "reason": self.reason, "raw": self.raw.decode("utf-8")}
        except UnicodeDecodeError:
            return {"file": file, "line": self.line, "reason": self.reason,
                    "raw": self.raw.decode("utf-8", errors="replace"),
                    "raw_base64": base64.b64encode(self.raw).decode("ascii")}


def parse_line(raw: bytes, uid_from_text: bool = False) -> tuple[str, str, str] | str:
    """Parse one JSON line into `(uid, title, content)` raw strings, or return a reject reason.

    Args:
        raw: the line, without its newline.
        uid_from_text: give a row with a null uid a hash of its title and content.

    Returns:
        The three strings (an int uid becomes its digits), or a reason such as `bad_json`, `missing_field:uid`.
    """
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
    uid, title, content = obj.get("uid"), obj.get("title"), obj.get("content")
    if type(title) is not str or type(content) is not str:
        for name, v in (("title", title), ("content", content)):
            if name not in obj:
                return f"missing_field:{name}"
            if type(v) is not str:
                return f"bad_type:{name}"
    if type(uid) is not str:
        if type(uid) is int:
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


def count_lines(chunk: bytes | memoryview) -> int:
    """Lines in a chunk (a last line without its newline counts); numpy's count releases the GIL."""
    a = np.frombuffer(chunk, np.uint8)
    return int(np.count_nonzero(a == 10)) + (1 if len(a) and a[-1] != 10 else 0)


def _utf8_checked(chunk: bytes | memoryview) -> pa.Buffer:
    """The chunk as an Arrow buffer (not copied), after checking it is UTF-8 (raises `pa.ArrowInvalid` if not):
    Arrow's JSON reader does not check it."""
    buf = pa.py_buffer(chunk)
    offsets = pa.array([0, len(chunk)], pa.int64()).buffers()[1]
    pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, buf]).cast(pa.large_string())
    return buf


def _pieces(chunk: bytes, size: int) -> Iterator[bytes]:
    start = 0
    while start < len(chunk):
        end = chunk.find(b"\n", min(start + size, len(chunk) - 1))
        end = len(chunk) if end < 0 else end + 1
        yield chunk[start:end]
        start = end


def parse_block(chunk: bytes | memoryview, first_line: int, uid_from_text: bool, piece_bytes: int,
                n: int | None = None) -> tuple[pa.Table, list[Reject], int]:
    """Parse a chunk of whole lines into `(table of uid, title, content, rejects, number of lines)`.

    Arrow's reader is exact for well-formed rows. Any line it cannot take as a product row makes it fail or
    return nulls or fewer rows; the chunk is then retried in pieces of `piece_bytes`, and a piece that fails
    goes line by line through `parse_line`. Rejects carry their line number (the chunk's first is `first_line`).
    """
    n = count_lines(chunk) if n is None else n
    try:
        tab = pa_json.read_json(
            pa.BufferReader(_utf8_checked(chunk)),  # read in C, no copy (a Python file is read holding the GIL)
            read_options=pa_json.ReadOptions(block_size=1 << 20, use_threads=False),
            parse_options=pa_json.ParseOptions(explicit_schema=SCHEMA, unexpected_field_behavior="ignore"),
        )
        if (tab.num_rows == n and not any(tab.column(c).null_count for c in REQUIRED_FIELDS)
                and not pc.any(pc.equal(pc.binary_length(tab.column("uid")), 0)).as_py()):
            return tab, [], n
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    chunk = bytes(chunk)  # a bad line somewhere: the slow paths split and search the bytes
    if len(chunk) > piece_bytes:
        tables, rejects, line = [], [], first_line
        for piece in _pieces(chunk, piece_bytes):
            t, r, m = parse_block(piece, line, uid_from_text, len(piece))
            tables.append(t)
            rejects += r
            line += m
        return pa.concat_tables(tables), rejects, n
    uids, titles, contents, rejects = [], [], [], []
    for i, raw in enumerate(chunk.split(b"\n")[:n]):
        parsed = parse_line(raw.rstrip(b"\r"), uid_from_text)
        if type(parsed) is str:
            rejects.append(Reject(first_line + i, parsed, raw))
        else:
            uids.append(parsed[0])
            titles.append(parsed[1])
            contents.append(parsed[2])
    return pa.table([uids, titles, contents], schema=SCHEMA), rejects, n
