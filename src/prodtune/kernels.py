"""Compiled (numba) kernels of stage 01 after parsing: finishing a text column, row keys, deduplication.

- `finish_column`: the part of `data.clean_text` that is not Python's (ASCII control characters removed,
  whitespace runs collapsed to one space, spaces stripped) plus `data.truncate_text`, over an Arrow string
  column in one copy; rows whose entities, tags or non-ASCII text Python decoded (`data._decode`) are taken from
  a second array. Same result row by row as `truncate_text(clean_text(t))` (tests compare them).
- `row_keys`: per kept row, the seeded xxh3-64 of its uid (the exact `xxhash.xxh3_64_intdigest`, for uids of up to
  128 bytes; longer ones are left to the caller) and a 128-bit key of (title, content).
- `jsonl`: rows as JSON lines, byte for byte what orjson writes.
- `Seen`: an open-addressing set of 128-bit keys; `Seen.first_unseen` is the deduplication of stage 01 (by uid,
  then by title and content, in input order).

All kernels release the GIL. Without numba they run as plain Python (correct, slow).
"""

from __future__ import annotations

import threading

import numpy as np
import pyarrow as pa

from prodtune.jsonscan import (_DELS, _HIGH, _ONES, _SPACES, _ZERO, AVAILABLE, _has_zero, _jit, _plain_word, _r64,
                               _w64, _zero_bytes)

_U = np.uint64
_M32 = _U(0xFFFFFFFF)
_P1 = _U(0x9E3779B185EBCA87)
_P2 = _U(0xC2B2AE3D27D4EB4F)
_P3 = _U(0x165667B19E3779F9)
_P4 = _U(0x85EBCA77C2B2AE63)
_P5 = _U(0x27D4EB2F165667C5)
_MX1 = _U(0x165667919E3779F9)
_MX2 = _U(0x9FB21C651E98DF25)
# XXH3's default secret, first 128 bytes (what inputs of up to 128 bytes use)
_SECRET = np.frombuffer(bytes.fromhex(
    "b8fe6c3923a44bbe7c01812cf721ad1cded46de9839097db7240a4a4b7b3671f"
    "cb79e64eccc0e578825ad07dccff7221b8084674f743248ee03590e6813a264c"
    "3c2852bb91c300cb88d0658b1b532ea371644897a20df94e3819ef46a9deacd8"
    "a8fa763fe39c343ff9dcbbc7c70b4f1d8a51e04bcdb45931c89f7ec9d9787364"), np.uint8)
_SEED_A, _SEED_B = _U(0x243F6A8885A308D3), _U(0x13198A2E03707344)  # of the (title, content) key


# ------------------------------------------------------------------------------------------------
# finishing a column: whitespace, control characters, truncation
# ------------------------------------------------------------------------------------------------


@_jit
def _ws_len(d, j, e):
    """Byte length of the non-ASCII whitespace character (`str.isspace`) at d[j] (a lead byte), else 0."""
    c = d[j]
    if c == 0xC2:
        if j + 1 < e and (d[j + 1] == 0x85 or d[j + 1] == 0xA0):
            return 2
    elif c == 0xE1:
        if j + 2 < e and d[j + 1] == 0x9A and d[j + 2] == 0x80:
            return 3
    elif c == 0xE2:
        if j + 2 < e:
            c1, c2 = d[j + 1], d[j + 2]
            if c1 == 0x80 and (c2 <= 0x8A or c2 == 0xA8 or c2 == 0xA9 or c2 == 0xAF):
                return 3
            if c1 == 0x81 and c2 == 0x9F:
                return 3
    elif c == 0xE3:
        if j + 2 < e and d[j + 1] == 0x80 and d[j + 2] == 0x80:
            return 3
    return 0


@_jit
def _plain(w):
    """The 8 bytes of w are printable ASCII (space included) with no two spaces in a row."""
    if (w & _HIGH) != _ZERO or ((w - _SPACES) & ~w & _HIGH) != _ZERO or _has_zero(w ^ _DELS):
        return False
    spaces = _zero_bytes(w ^ _SPACES)
    return (spaces & (spaces << _U(8))) == _ZERO


@_jit
def _squeeze(src, s, e, out, k):
    """Copy src[s:e] to out[k:] with ASCII control characters removed, each whitespace run made one space and
    spaces at both ends dropped; returns the end in `out`. Plain 8-byte words are copied at once."""
    start = k
    pending = False
    j = s
    while j < e:
        if not pending and j + 8 <= e:
            w = _r64(src, j)
            if _plain(w) and (k > start or (w & _U(0xFF)) != _U(32)):
                _w64(out, k, w)  # (a single space inside is kept; one at the end starts a run, as below)
                if (w >> _U(56)) == _U(32):
                    k += 7
                    pending = True
                else:
                    k += 8
                j += 8
                continue
        c = src[j]
        if c < 0x80:
            if c == 32 or c == 9 or c == 10 or c == 13:
                pending = True
                j += 1
                continue
            if c < 32 or c == 127:  # removed before whitespace is collapsed: invisible to a run
                j += 1
                continue
        else:
            w = _ws_len(src, j, e)
            if w:
                pending = True
                j += w
                continue
        if pending:
            if k > start:
                out[k] = 32
                k += 1
            pending = False
        out[k] = c
        k += 1
        j += 1
    return k


@_jit
def _chars(d, s, e):
    """Number of code points of the UTF-8 in d[s:e] (bytes that are not continuation bytes, 10xxxxxx)."""
    n = e - s
    j = s
    while j + 8 <= e:
        w = _r64(d, j)
        cont = w & ~(w << _U(1)) & _HIGH
        n -= np.int64(((cont >> _U(7)) * _ONES) >> _U(56))
        j += 8
    for t in range(j, e):
        n -= (d[t] & 0xC0) == 0x80
    return n


@_jit
def _truncated_end(d, s, e, max_chars):
    """`data.truncate_text` on the text d[s:e] of more than `max_chars` code points: the end of what it keeps."""
    head = s  # end of the first max_chars code points
    seen = 0
    while head < e:
        if (d[head] & 0xC0) != 0x80:
            if seen == max_chars:
                break
            seen += 1
        head += 1
    # the last ". ", "! " or "? " that fits in the head, if it starts in its second half
    p = head - 2
    while p >= s:
        if d[p + 1] == 32 and (d[p] == 46 or d[p] == 33 or d[p] == 63):
            break
        p -= 1
    if p >= s and _chars(d, s, p) >= max_chars // 2:
        return p + 1
    p = head - 1
    while p > s and d[p] != 32:
        p -= 1
    if p <= s:
        return head  # no space after the first character: cut inside the word
    while p > s and d[p - 1] == 32:
        p -= 1  # (rstrip)
    return p


@_jit
def _move(dst, d, src, s, n):
    """dst[d:d+n] = src[s:s+n], 8 bytes at a time, front to back: right also when dst is src and d <= s."""
    if n <= 0 or (d == s and dst.ctypes.data == src.ctypes.data):
        return
    j = 0
    while j + 8 <= n:
        _w64(dst, d + j, _r64(src, s + j))
        j += 8
    while j < n:
        dst[d + j] = src[s + j]
        j += 1


@_jit
def _finish(data, offs, py_data, py_offs, py_of, squeeze, max_chars, out, out_offs, length):
    """Row r: its text (py_data's row py_of[r] if that is >= 0, else data's), squeezed if squeeze[r], its length
    in code points stored in length[r] (rows not squeezed are ASCII: their byte count), truncated to max_chars.
    Runs of rows left as they are are copied at once. `out` may be `data` itself: every write lands at or before
    what is read next (rows only shrink; rows from py_data must not be longer than the row they replace)."""
    k = 0
    out_offs[0] = 0
    run_s = -1  # where in `data` the run of rows left as they are starts (-1: no run), and where it goes in `out`
    run_k = 0
    for r in range(len(squeeze)):
        p = py_of[r]
        s, e = offs[r], offs[r + 1]
        if p < 0 and not squeeze[r] and e - s <= max_chars:
            if run_s < 0:
                run_s, run_k = s, k
            k += e - s
            length[r] = e - s
            out_offs[r + 1] = k
            continue
        if run_s >= 0:
            _move(out, run_k, data, run_s, k - run_k)
            run_s = -1
        src = data
        if p >= 0:
            src, s, e = py_data, py_offs[p], py_offs[p + 1]
        start = k
        if squeeze[r]:
            k = _squeeze(src, s, e, out, k)
            n = _chars(out, start, k)
        else:
            _move(out, k, src, s, e - s)
            k += e - s
            n = e - s
        length[r] = n
        if n > max_chars:
            k = _truncated_end(out, start, k, max_chars)
        out_offs[r + 1] = k
    if run_s >= 0:
        _move(out, run_k, data, run_s, k - run_k)
    return k


# stand-ins for absent buffers, writable like numpy views of Arrow's buffers (numba compiles a kernel per type)
_NO_BYTES, _NO_OFFSETS = np.zeros(8, np.uint8), np.zeros(2, np.int32)


def _parts(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(data bytes, offsets of its rows: len(arr) + 1 of them) of an Arrow string array, without copying."""
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], np.int32)[arr.offset : arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None and len(bufs[2]) else _NO_BYTES
    return data, offs


def finish_column(arr: pa.Array, squeeze: np.ndarray | None, py_rows: np.ndarray | None, py_text: pa.Array | None,
                  max_chars: int, in_place: bool = False) -> tuple[pa.Array, np.ndarray]:
    """The column `arr` (string, no chunks) with rows `py_rows` replaced by `py_text`, rows where `squeeze` is True
    squeezed (`_squeeze`), and every row truncated like `data.truncate_text(t, max_chars)`.

    Returns the new column (nulls stay null) and each row's length in code points before truncation. Rows neither
    squeezed nor replaced must be ASCII (their length is their byte count). `in_place`: the caller gives `arr` up:
    its buffer is reused when it can be (no fresh memory, and rows before the first change are not copied).
    """
    n = len(arr)
    squeeze = np.zeros(n, np.bool_) if squeeze is None else squeeze
    py_of = np.full(n, -1, np.int64)
    if py_rows is not None and len(py_rows):
        py_of[py_rows] = np.arange(len(py_rows))
        py_data, py_offs = _parts(py_text)
    else:
        py_data, py_offs = _NO_BYTES, _NO_OFFSETS
    validity = None
    if arr.null_count:
        valid = arr.is_valid()
        squeeze = squeeze & valid.to_numpy(zero_copy_only=False)
        validity = valid.buffers()[1]
    data, offs = _parts(arr)
    if py_rows is None or not len(py_rows):
        length = np.diff(offs).astype(np.int64)
        if not squeeze.any() and not (length > max_chars).any():
            return arr, length  # nothing to change: no copy
    size = int(offs[-1] - offs[0]) + len(py_data)
    if size >= 2**31:
        raise ValueError("finish_column: over 2 GB of text in one array (stage 01 works in 8 MB blocks)")
    out_offs = np.empty(n + 1, np.int32)
    length = np.empty(n, np.int64)
    # in place: into arr's own data buffer (arr is given up by the caller), if no Python row grew
    data_buf = arr.buffers()[2]
    if (in_place and data_buf is not None and data_buf.is_mutable and arr.offset == 0 and offs[0] == 0
            and (py_rows is None or not len(py_rows) or (np.diff(py_offs) <= np.diff(offs)[py_rows]).all())):
        buf = data_buf
        _finish(data, offs, py_data, py_offs, py_of, squeeze, max_chars, data, out_offs, length)
    else:
        buf = pa.allocate_buffer(max(size, 1), resizable=True)
        used = _finish(data, offs, py_data, py_offs, py_of, squeeze, max_chars, np.frombuffer(buf, np.uint8),
                       out_offs, length)
        buf.resize(used)
    res = pa.Array.from_buffers(pa.string(), n, [validity, pa.py_buffer(out_offs), buf],
                                null_count=arr.null_count)
    return res, length


# ------------------------------------------------------------------------------------------------
# row keys: xxh3-64 of the uid, a 128-bit key of (title, content)
# ------------------------------------------------------------------------------------------------


@_jit
def _r32(d, j):
    return _U(d[j]) | (_U(d[j + 1]) << _U(8)) | (_U(d[j + 2]) << _U(16)) | (_U(d[j + 3]) << _U(24))


@_jit
def _rotl(x, r):
    return (x << _U(r)) | (x >> _U(64 - r))


@_jit
def _swap64(x):
    r = _U(0)
    for _ in range(8):
        r = (r << _U(8)) | (x & _U(0xFF))
        x >>= _U(8)
    return r


@_jit
def _mul_fold(a, b):
    """The 128-bit product of a and b, its two halves xor-ed (XXH3_mul128_fold64)."""
    a_lo, a_hi, b_lo, b_hi = a & _M32, a >> _U(32), b & _M32, b >> _U(32)
    lo_lo, hi_lo, lo_hi, hi_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi, a_hi * b_hi
    cross = (lo_lo >> _U(32)) + (hi_lo & _M32) + lo_hi
    upper = (hi_lo >> _U(32)) + (cross >> _U(32)) + hi_hi
    lower = (cross << _U(32)) | (lo_lo & _M32)
    return lower ^ upper


@_jit
def _avalanche3(h):
    h ^= h >> _U(37)
    h *= _MX1
    return h ^ (h >> _U(32))


@_jit
def _avalanche64(h):
    h ^= h >> _U(33)
    h *= _P2
    h ^= h >> _U(29)
    h *= _P3
    return h ^ (h >> _U(32))


@_jit
def _mix16(d, j, sec, o, seed):
    return _mul_fold(_r64(d, j) ^ (_r64(sec, o) + seed), _r64(d, j + 8) ^ (_r64(sec, o + 8) - seed))


@_jit
def _xxh3(d, s, e, seed, sec):
    """XXH3-64 with a seed of d[s:e], for up to 128 bytes (xxhash's `xxh3_64_intdigest`)."""
    n = e - s
    ln = _U(n)
    if n == 0:
        return _avalanche64(seed ^ (_r64(sec, 56) ^ _r64(sec, 64)))
    if n <= 3:
        combined = (_U(d[s]) << _U(16)) | (_U(d[s + (n >> 1)]) << _U(24)) | _U(d[e - 1]) | (ln << _U(8))
        bitflip = (_r32(sec, 0) ^ _r32(sec, 4)) + seed
        return _avalanche64(combined ^ bitflip)
    if n <= 8:
        s32 = seed & _M32
        swapped = (((s32 & _U(0xFF)) << _U(24)) | ((s32 & _U(0xFF00)) << _U(8)) | ((s32 >> _U(8)) & _U(0xFF00))
                   | (s32 >> _U(24)))
        seed = seed ^ (swapped << _U(32))
        bitflip = (_r64(sec, 8) ^ _r64(sec, 16)) - seed
        keyed = (_r32(d, e - 4) + (_r32(d, s) << _U(32))) ^ bitflip
        keyed ^= _rotl(keyed, 49) ^ _rotl(keyed, 24)
        keyed *= _MX2
        keyed ^= (keyed >> _U(35)) + ln
        keyed *= _MX2
        return keyed ^ (keyed >> _U(28))
    if n <= 16:
        lo = _r64(d, s) ^ ((_r64(sec, 24) ^ _r64(sec, 32)) + seed)
        hi = _r64(d, e - 8) ^ ((_r64(sec, 40) ^ _r64(sec, 48)) - seed)
        return _avalanche3(ln + _swap64(lo) + hi + _mul_fold(lo, hi))
    acc = ln * _P1
    if n > 32:
        if n > 64:
            if n > 96:
                acc += _mix16(d, s + 48, sec, 96, seed)
                acc += _mix16(d, e - 64, sec, 112, seed)
            acc += _mix16(d, s + 32, sec, 64, seed)
            acc += _mix16(d, e - 48, sec, 80, seed)
        acc += _mix16(d, s + 16, sec, 32, seed)
        acc += _mix16(d, e - 32, sec, 48, seed)
    acc += _mix16(d, s, sec, 0, seed)
    acc += _mix16(d, e - 16, sec, 16, seed)
    return _avalanche3(acc)


@_jit
def _round(v, w):
    return _rotl(v + w * _P2, 31) * _P1


@_jit
def _acc4(d, s, e, v1, v2, v3, v4):
    """xxh64's rounds over d[s:e] in 32-byte stripes (four independent accumulators), the rest word by word."""
    j = s
    while j + 32 <= e:
        v1 = _round(v1, _r64(d, j))
        v2 = _round(v2, _r64(d, j + 8))
        v3 = _round(v3, _r64(d, j + 16))
        v4 = _round(v4, _r64(d, j + 24))
        j += 32
    if j + 8 <= e:
        v1 = _round(v1, _r64(d, j))
        j += 8
        if j + 8 <= e:
            v2 = _round(v2, _r64(d, j))
            j += 8
            if j + 8 <= e:
                v3 = _round(v3, _r64(d, j))
                j += 8
    if j < e:  # under 8 bytes left: a zero-padded word (the lengths, mixed in at the end, tell the cases apart)
        w = _U(0)
        for t in range(e - 1, j - 1, -1):
            w = (w << _U(8)) | _U(d[t])
        v4 = _round(v4, w ^ _P5)
    return v1, v2, v3, v4


@_jit
def _pair_key(t_data, ts, te, c_data, cs, ce):
    """A 128-bit key of (title, content) for equality tests: two 64-bit finalisations of the 256-bit state of
    xxh64-style rounds over the title, then the content, with both lengths. Not a published hash."""
    v1, v2, v3, v4 = _SEED_A + _P1 + _P2, _SEED_A + _P2, _SEED_A, _SEED_A - _P1
    v1, v2, v3, v4 = _acc4(t_data, ts, te, v1, v2, v3, v4)
    v1, v2, v3, v4 = _acc4(c_data, cs, ce, v1, v2, v3, v4)
    lt, lc = _U(te - ts), _U(ce - cs)
    a = _avalanche64(_rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18) + lt * _P5 + lc)
    b = _avalanche64((v1 * _P3) ^ (v2 * _P4) ^ _rotl(v3 * _P5, 23) ^ _rotl(v4 * _P2, 41) ^ (lc * _P1 + lt + _SEED_B))
    return a, b


@_jit
def _row_keys(rows, u_data, u_offs, t_data, t_offs, c_data, c_offs, seed, sec, k_sample, k_split, pair_a, pair_b,
              long_uid):
    for i in range(len(rows)):
        r = rows[i]
        s, e = u_offs[r], u_offs[r + 1]
        if e - s <= 128:
            k_sample[i] = _xxh3(u_data, s, e, seed, sec)
            k_split[i] = _xxh3(u_data, s, e, seed + _U(1), sec)
        else:
            long_uid[i] = True
        pair_a[i], pair_b[i] = _pair_key(t_data, t_offs[r], t_offs[r + 1], c_data, c_offs[r], c_offs[r + 1])


def row_keys(rows: np.ndarray, uid: pa.Array, title: pa.Array, content: pa.Array, seed: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For the rows `rows` of the three columns: `(xxh3_64(uid, seed), xxh3_64(uid, seed + 1), pair key a, b)`,
    the first two equal to `xxhash.xxh3_64_intdigest` (uids over 128 bytes are hashed by xxhash here)."""
    m = len(rows)
    out = [np.empty(m, np.uint64) for _ in range(4)]
    long_uid = np.zeros(m, np.bool_)
    _row_keys(rows.astype(np.int64, copy=False), *_parts(uid), *_parts(title), *_parts(content), _U(seed), _SECRET,
              *out, long_uid)
    if long_uid.any():
        import xxhash

        for i in np.flatnonzero(long_uid):
            raw = uid[int(rows[i])].as_buffer().to_pybytes()
            out[0][i] = xxhash.xxh3_64_intdigest(raw, seed)
            out[1][i] = xxhash.xxh3_64_intdigest(raw, seed + 1)
    return out[0], out[1], out[2], out[3]


# ------------------------------------------------------------------------------------------------
# JSON lines
# ------------------------------------------------------------------------------------------------

_HEX = np.frombuffer(b"0123456789abcdef", np.uint8)
_SHORT_ESCAPES = np.zeros(32, np.uint8)  # control bytes JSON writes as \b, \t, \n, \f, \r (orjson does too)
for _c, _e in zip(b"\b\t\n\f\r", b"btnfr"):
    _SHORT_ESCAPES[_c] = _e
_JSONL_PARTS = [np.frombuffer(x, np.uint8) for x in (b'{"uid":"', b'","title":"', b'","content":"', b'"}\n')]


@_jit
def _put(out, k, part):
    for t in range(len(part)):
        out[k + t] = part[t]
    return k + len(part)


@_jit
def _escape(d, s, e, out, k, short):
    r"""d[s:e] as the inside of a JSON string, written as orjson writes it: `"`, `\` and control bytes escaped
    (`\n`-style where JSON has one, else `\u00xx`), everything else (UTF-8 included) as it is."""
    j = s
    while j < e:
        if j + 8 <= e:
            w = _r64(d, j)
            if _plain_word(w):
                _w64(out, k, w)
                k += 8
                j += 8
                continue
        c = d[j]
        if c == 34 or c == 92:
            out[k] = 92
            out[k + 1] = c
            k += 2
        elif c < 32:
            out[k] = 92
            if short[c]:
                out[k + 1] = short[c]
                k += 2
            else:
                out[k + 1] = 117  # u00xx
                out[k + 2] = 48
                out[k + 3] = 48
                out[k + 4] = _HEX[c >> 4]
                out[k + 5] = _HEX[c & 15]
                k += 6
        else:
            out[k] = c
            k += 1
        j += 1
    return k


@_jit
def _jsonl(u_data, u_offs, t_data, t_offs, c_data, c_offs, out, p0, p1, p2, p3, short):
    k = 0
    for r in range(len(u_offs) - 1):
        k = _put(out, k, p0)
        k = _escape(u_data, u_offs[r], u_offs[r + 1], out, k, short)
        k = _put(out, k, p1)
        k = _escape(t_data, t_offs[r], t_offs[r + 1], out, k, short)
        k = _put(out, k, p2)
        k = _escape(c_data, c_offs[r], c_offs[r + 1], out, k, short)
        k = _put(out, k, p3)
    return k


def jsonl(uid: pa.Array, title: pa.Array, content: pa.Array) -> memoryview:
    r"""The rows as JSON lines `{"uid":...,"title":...,"content":...}`, byte for byte what
    `orjson.dumps({"uid": u, "title": t, "content": c}) + b"\n"` gives (no nulls)."""
    parts = [_parts(a) for a in (uid, title, content)]
    n = len(uid)
    size = 6 * sum(int(o[-1] - o[0]) for _, o in parts) + 40 * n + 8  # every byte escaped as \u00xx at worst
    out = np.empty(size, np.uint8)
    k = _jsonl(*parts[0], *parts[1], *parts[2], out, *_JSONL_PARTS, _SHORT_ESCAPES)
    return memoryview(out)[:k]


# ------------------------------------------------------------------------------------------------
# deduplication: a set of 128-bit keys
# ------------------------------------------------------------------------------------------------


@_jit
def _add(table, a, b):
    """Add the key (a, b) to the table (rows of two words, (0, 0) empty); True if it was there already. Linear
    probing from a's low bits (a is a hash). A key (0, 0) is taken as (0, 1)."""
    if a == _U(0) and b == _U(0):
        b = _U(1)
    mask = len(table) - 1
    i = np.int64(a & _U(mask))
    while True:
        x, y = table[i, 0], table[i, 1]
        if x == a and y == b:
            return True
        if x == _U(0) and y == _U(0):
            table[i, 0] = a
            table[i, 1] = b
            return False
        i = (i + 1) & mask


@_jit
def _rehash(table, new):
    for i in range(len(table)):
        if table[i, 0] != _U(0) or table[i, 1] != _U(0):
            _add(new, table[i, 0], table[i, 1])


@_jit
def _first_unseen(ua, ub, pa_, pb, uids, pairs, keep):
    dup_uid = dup_pair = 0
    for i in range(len(ua)):
        if _add(uids, ua[i], ub[i]):
            keep[i] = False
            dup_uid += 1
        elif _add(pairs, pa_[i], pb[i]):
            keep[i] = False
            dup_pair += 1
        else:
            keep[i] = True
    return dup_uid, dup_pair


class Seen:
    """The uids and (title, content) keys met so far; `first_unseen` deduplicates one block of rows after another.
    Each set is one array of 16-byte slots (a lookup touches one cache line)."""

    def __init__(self, capacity: int = 1 << 16):
        self._tables = [np.zeros((capacity, 2), np.uint64), np.zeros((capacity, 2), np.uint64)]
        self._count = [0, 0]

    def _reserve(self, which: int, extra: int) -> None:
        table = self._tables[which]
        need = self._count[which] + extra
        cap = len(table)
        while need * 10 > cap * 6:  # load factor at most 0.6
            cap *= 2
        if cap != len(table):
            new = np.zeros((cap, 2), np.uint64)
            _rehash(table, new)
            self._tables[which] = new

    def first_unseen(self, uid_a: np.ndarray, uid_b: np.ndarray, pair_a: np.ndarray, pair_b: np.ndarray
                     ) -> tuple[np.ndarray, int, int]:
        """Rows in order: a row is a duplicate if its uid key was met (before, or earlier in these rows), else if
        its pair key was met among rows kept so far. Returns (keep mask, duplicate uids, duplicate pairs)."""
        self._reserve(0, len(uid_a))
        self._reserve(1, len(uid_a))
        keep = np.empty(len(uid_a), np.bool_)
        dup_uid, dup_pair = _first_unseen(uid_a, uid_b, pair_a, pair_b, *self._tables, keep)
        self._count[0] += len(uid_a) - dup_uid
        self._count[1] += len(uid_a) - dup_uid - dup_pair
        return keep, int(dup_uid), int(dup_pair)


_ready = threading.Event()
_lock = threading.Lock()


def ready() -> bool:
    """True once `warm_up` has run (the kernels are loaded)."""
    return _ready.is_set()


def warm_up() -> None:
    """Run each kernel once: numba loads them from its cache (or compiles them, on a machine's first run)."""
    if _ready.is_set():
        return
    with _lock:
        if not _ready.is_set():
            _warm_up()
            _ready.set()


def _warm_up() -> None:
    arr = pa.array(["a  b\t", "x" * 30, "é"], pa.string())
    finish_column(arr, np.array([True, False, True]), np.array([2]), pa.array(["e"]), 10)
    finish_column(arr, np.array([True, False, False]), None, None, 10)
    finish_column(pa.array(["a  b", "c"]), np.array([True, False]), None, None, 10, in_place=True)
    row_keys(np.arange(3), arr, arr, arr, 1)
    Seen(8).first_unseen(*(np.arange(3, dtype=np.uint64),) * 4)
    jsonl(arr, arr, arr)


__all__ = ["AVAILABLE", "Seen", "finish_column", "jsonl", "ready", "row_keys", "warm_up"]
