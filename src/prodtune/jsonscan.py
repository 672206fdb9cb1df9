"""A one-pass scanner for blocks of well-formed trn.json lines (stage 01's fast path), compiled with numba.

`scan_block` reads a block of lines once: it checks each line's JSON, decodes the `uid`, `title` and `content`
strings into Arrow-ready buffers, and gives each title and content a code for what `data.clean_text` still has to
do (0 nothing, 1 control characters and whitespace only, 3 Python). Rows whose only Python work would be HTML
entities it can finish exactly, or characters NFC leaves alone, are decoded here (code 1). Plain runs of a string
are skipped 8 bytes at a time, numbers in arrays without the generic value path. Measured in one process, in turns,
on 8 MB blocks of the full-size synthetic file: 17.4-17.9 ms per block against 27.4-28.1 ms for Arrow's JSON reader
plus the regex that marks the rows (which leaves all of the decoding to Python).

It is strict on purpose: it accepts only lines that are an object with the three fields as strings (`uid`
non-empty), other fields being strings, numbers, `true`/`false`/`null` or flat arrays of those, and nothing it
cannot decode exactly. For anything else (a bad line, a nested value, an escape in a key, a repeated field, a
lone surrogate, a number of over 18 digits or with a 3-digit exponent) it gives up on the block (stage 01 then
scans it in pieces, and the pieces it refuses go through the exact path: Arrow's reader, then line by line with
the reject reasons). So it never decides a reject and never keeps a row the exact path would not keep with the
same text.

Without numba (it is pinned in requirements.txt) `AVAILABLE` is False: stage 01 uses the exact path for every
block, and `kernels` runs as plain Python (the same files, much slower; tested).
"""

from __future__ import annotations

import html
import html.entities
import threading

import numpy as np
import pyarrow as pa

try:
    import numba
except ImportError:  # pragma: no cover - numba is pinned; a stripped environment still runs stage 01
    numba = None

AVAILABLE = numba is not None

# byte classes for the "needs work" rule (`&[#A-Za-z]|<[A-Za-z!/]|[^ -~]|  |^ | $` on the decoded text)
_BAD, _AMP, _LT, _SP, _AMP_NEXT, _LT_NEXT = 1, 2, 4, 8, 16, 32
_CLS = np.zeros(256, np.uint8)
for _b in range(256):
    if _b < 0x20 or _b > 0x7E:
        _CLS[_b] |= _BAD
for _b in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz":
    _CLS[_b] |= _AMP_NEXT | _LT_NEXT
_CLS[ord("#")] |= _AMP_NEXT
_CLS[ord("!")] |= _LT_NEXT
_CLS[ord("/")] |= _LT_NEXT
_CLS[ord("&")] |= _AMP
_CLS[ord("<")] |= _LT
_CLS[ord(" ")] |= _SP

_KEYS = (b"uid", b"title", b"content")
_SHORTEST = b'{"uid":"x","title":"","content":""}'  # the shortest line `_scan` takes


def _jit(fn):
    return numba.njit(nogil=True, cache=True, boundscheck=False)(fn) if AVAILABLE else fn


if AVAILABLE:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def _r64(typingctx, arr, idx):
        """The little-endian 64-bit word at byte idx of a uint8 array: one unaligned load (numba builds the word
        from 8 byte loads otherwise, ~7x slower here)."""
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
            return builder.load(ptr, align=1)

        return types.uint64(arr, idx), codegen

    @intrinsic
    def _w64(typingctx, arr, idx, val):
        """Store the 64-bit word val little-endian at byte idx of a uint8 array (unaligned)."""
        def codegen(context, builder, signature, args):
            ary = context.make_array(signature.args[0])(context, builder, args[0])
            ptr = builder.bitcast(builder.gep(ary.data, [args[1]]), ir.IntType(64).as_pointer())
            builder.store(args[2], ptr, align=1)
            return context.get_dummy_value()

        return types.void(arr, idx, types.uint64), codegen
else:  # pragma: no cover - numba is pinned
    def _r64(d, j):
        return np.uint64(int.from_bytes(bytes(d[j : j + 8]), "little"))

    def _w64(d, j, w):
        d[j : j + 8] = np.frombuffer(int(w).to_bytes(8, "little"), np.uint8)


@_jit
def _ws(d, i, n):
    while i < n and (d[i] == 32 or d[i] == 9 or d[i] == 13):
        i += 1
    return i


@_jit
def _hex4(d, i, n):
    """Value of the 4 hex digits at d[i:i+4], or -1."""
    if i + 4 > n:
        return -1
    v = 0
    for j in range(i, i + 4):
        c = d[j]
        if 48 <= c <= 57:
            v = v * 16 + c - 48
        elif 65 <= c <= 70:
            v = v * 16 + c - 55
        elif 97 <= c <= 102:
            v = v * 16 + c - 87
        else:
            return -1
    return v


_ONES = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_QUOTES = np.uint64(0x2222222222222222)
_SLASHES = np.uint64(0x5C5C5C5C5C5C5C5C)
_SPACES = np.uint64(0x2020202020202020)
_ZERO = np.uint64(0)


@_jit
def _plain_word(w):
    """True if none of the 8 bytes of `w` is a quote, a backslash or a control byte (exact: the classic
    has-zero-byte and has-byte-less-than tests)."""
    q = w ^ _QUOTES
    b = w ^ _SLASHES
    return ((((q - _ONES) & ~q) | ((b - _ONES) & ~b) | ((w - _SPACES) & ~w)) & _HIGH) == _ZERO


@_jit
def _string(d, i, n, out, k, d64, tiny):
    """Decode the JSON string whose opening quote is at d[i] into out[k:]; returns (next i, next k) or (-1, k).
    `d64` is `d` read as 64-bit words (plain runs are skipped 8 bytes at a time). With an empty `out` the string
    is only checked (its escapes are decoded into `tiny`, 4 bytes)."""
    i += 1
    n64 = len(d64) * 8
    write = len(out) > 0
    while True:
        # the plain run up to the next quote, backslash or control byte is copied as it is
        start = i
        while i < n and (i & 7) != 0 and d[i] != 34 and d[i] != 92 and d[i] >= 32:
            i += 1
        if (i & 7) == 0:
            while i < n64 and _plain_word(d64[i >> 3]):
                i += 8
        while i < n and d[i] != 34 and d[i] != 92 and d[i] >= 32:
            i += 1
        run = i - start
        if write:
            out[k : k + run] = d[start:i]
        k += run
        if i >= n or d[i] < 32:
            return -1, k
        if d[i] == 34:
            return i + 1, k
        # an escape
        if i + 1 >= n:
            return -1, k
        e = d[i + 1]
        i += 2
        o, p = (out, k) if write else (tiny, 0)
        if e == 34 or e == 92 or e == 47:
            o[p] = e
        elif e == 98:
            o[p] = 8
        elif e == 102:
            o[p] = 12
        elif e == 110:
            o[p] = 10
        elif e == 114:
            o[p] = 13
        elif e == 116:
            o[p] = 9
        elif e == 117:
            cp = _hex4(d, i, n)
            if cp < 0:
                return -1, k
            i += 4
            if 0xD800 <= cp < 0xDC00:  # a surrogate pair
                if i + 6 > n or d[i] != 92 or d[i + 1] != 117:
                    return -1, k
                lo = _hex4(d, i + 2, n)
                if lo < 0xDC00 or lo >= 0xE000:
                    return -1, k
                i += 6
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
            elif 0xDC00 <= cp < 0xE000:
                return -1, k
            if cp < 0x80:
                o[p] = cp
            elif cp < 0x800:
                o[p] = 0xC0 | (cp >> 6)
                o[p + 1] = 0x80 | (cp & 0x3F)
                k += 1
            elif cp < 0x10000:
                o[p] = 0xE0 | (cp >> 12)
                o[p + 1] = 0x80 | ((cp >> 6) & 0x3F)
                o[p + 2] = 0x80 | (cp & 0x3F)
                k += 2
            else:
                o[p] = 0xF0 | (cp >> 18)
                o[p + 1] = 0x80 | ((cp >> 12) & 0x3F)
                o[p + 2] = 0x80 | ((cp >> 6) & 0x3F)
                o[p + 3] = 0x80 | (cp & 0x3F)
                k += 3
        else:
            return -1, k
        k += 1


@_jit
def _skip_string(d, i, n, scratch, d64):
    j, _ = _string(d, i, n, scratch[:0], 0, d64, scratch)
    return j


@_jit
def _number(d, i, n):
    """End of the JSON number at d[i], or -1 (also for more than 18 digits or an exponent of more than 2)."""
    if i < n and d[i] == 45:
        i += 1
    start = i
    if i < n and d[i] == 48:
        i += 1
    elif i < n and 49 <= d[i] <= 57:
        while i < n and 48 <= d[i] <= 57:
            i += 1
    else:
        return -1
    digits = i - start
    if i < n and d[i] == 46:
        i += 1
        s = i
        while i < n and 48 <= d[i] <= 57:
            i += 1
        if i == s:
            return -1
        digits += i - s
    if i < n and (d[i] == 101 or d[i] == 69):
        i += 1
        if i < n and (d[i] == 43 or d[i] == 45):
            i += 1
        s = i
        while i < n and 48 <= d[i] <= 57:
            i += 1
        if i == s or i - s > 2:
            return -1  # no exponent digits, or an exponent that may not fit a double (orjson refuses infinity)
    if digits > 18:
        return -1
    return i


@_jit
def _literal(d, i, n):
    """End of `true`, `false` or `null` at d[i], or -1."""
    if i + 4 <= n and d[i] == 116 and d[i + 1] == 114 and d[i + 2] == 117 and d[i + 3] == 101:
        return i + 4
    if i + 4 <= n and d[i] == 110 and d[i + 1] == 117 and d[i + 2] == 108 and d[i + 3] == 108:
        return i + 4
    if i + 5 <= n and d[i] == 102 and d[i + 1] == 97 and d[i + 2] == 108 and d[i + 3] == 115 and d[i + 4] == 101:
        return i + 5
    return -1


@_jit
def _scalar(d, i, n, scratch, d64):
    if i >= n:
        return -1
    c = d[i]
    if c == 34:
        return _skip_string(d, i, n, scratch, d64)
    if c == 45 or 48 <= c <= 57:
        return _number(d, i, n)
    return _literal(d, i, n)


@_jit
def _value(d, i, n, scratch, d64):
    """End of a value of a field we do not keep: a scalar or a flat array of scalars; -1 for anything else."""
    if i < n and d[i] == 91:
        i = _ws(d, i + 1, n)
        if i < n and d[i] == 93:
            return i + 1
        while True:
            if i < n and (d[i] == 45 or 48 <= d[i] <= 57):
                i = _number(d, i, n)  # (called here, not through `_scalar`: arrays of numbers are common)
            else:
                i = _scalar(d, i, n, scratch, d64)
            if i < 0:
                return -1
            i = _ws(d, i, n)
            if i >= n:
                return -1
            if d[i] == 93:
                return i + 1
            if d[i] != 44:
                return -1
            i = _ws(d, i + 1, n)
    return _scalar(d, i, n, scratch, d64)


@_jit
def _key(d, i, n):
    """Which field the key at d[i] (its opening quote) names: (0 uid, 1 title, 2 content, 3 other, -1 bad), end."""
    j = i + 1
    while j < n and d[j] != 34 and d[j] != 92 and d[j] >= 32:
        j += 1
    if j >= n or d[j] != 34:
        return -1, j  # an escape or a control byte in a key: the exact path decides
    m = j - i - 1
    if m == 3 and d[i + 1] == 117 and d[i + 2] == 105 and d[i + 3] == 100:
        return 0, j + 1
    if m == 5 and d[i + 1] == 116 and d[i + 2] == 105 and d[i + 3] == 116 and d[i + 4] == 108 and d[i + 5] == 101:
        return 1, j + 1
    if (m == 7 and d[i + 1] == 99 and d[i + 2] == 111 and d[i + 3] == 110 and d[i + 4] == 116 and d[i + 5] == 101
            and d[i + 6] == 110 and d[i + 7] == 116):
        return 2, j + 1
    return 3, j + 1


_AMPS = np.uint64(0x2626262626262626)
_LTS = np.uint64(0x3C3C3C3C3C3C3C3C)
_DELS = np.uint64(0x7F7F7F7F7F7F7F7F)


@_jit
def _has_zero(x):
    """True if a byte of x is 0 (exact)."""
    return ((x - _ONES) & ~x & _HIGH) != _ZERO


@_jit
def _zero_bytes(x):
    """0x80 in exactly the bytes of x that are 0."""
    return ~(((x & _DELS) + _DELS) | x | _DELS)


@_jit
def _flags(out, s, e, cls):
    """What `clean_text` needs for the decoded text out[s:e]: 0 nothing, 1 only control characters removed and
    spaces collapsed or stripped (`data._NEEDS_WORK` but not `data._NEEDS_PYTHON`), 3 Python (`_NEEDS_PYTHON`:
    an entity, a tag or non-ASCII text). Plain 8-byte words are checked at once."""
    if e == s:
        return 0
    work = out[s] == 32 or out[e - 1] == 32
    j = s
    prev_space = False
    while j + 8 <= e:
        w = _r64(out, j)
        if (w & _HIGH) != _ZERO:
            return 3
        if _has_zero(w ^ _AMPS) or _has_zero(w ^ _LTS):
            for t in range(j, j + 8):
                if t + 1 < e and ((out[t] == 38 and cls[out[t + 1]] & _AMP_NEXT)
                                  or (out[t] == 60 and cls[out[t + 1]] & _LT_NEXT)):
                    return 3
        if not work:  # (`kernels._plain`'s test, split: the high bits are known clear here; measured 5% faster)
            spaces = _zero_bytes(w ^ _SPACES)
            if ((w - _SPACES) & ~w & _HIGH) != _ZERO or _has_zero(w ^ _DELS):
                work = True  # a control character
            elif (spaces & (spaces << np.uint64(8))) != _ZERO or (prev_space and (spaces & np.uint64(0x80))):
                work = True  # two spaces
            prev_space = (w >> np.uint64(56)) == np.uint64(32)
        j += 8
    prev = cls[out[j - 1]] if j > s else 0
    for t in range(j, e):
        c = cls[out[t]]
        if (c & _BAD and out[t] > 0x7F) or (prev & _AMP and c & _AMP_NEXT) or (prev & _LT and c & _LT_NEXT):
            return 3
        if c & _BAD or (prev & _SP and c & _SP):
            work = True
        prev = c
    return 1 if work else 0


# ------------------------------------------------------------------------------------------------
# HTML entities and safe non-ASCII text (what `data._decode` does, where it needs no Python)
# ------------------------------------------------------------------------------------------------


def _safe_ranges() -> np.ndarray:
    """(lo, hi) code point ranges a decoded entity may give without Python's help: starters that NFC leaves as they
    are and that never compose with the character before them, and that `data._CONTROL` does not remove (checked
    code point by code point in the tests): Latin-1 and Latin Extended-A letters and signs, general punctuation
    (dashes, quotes, bullets, ellipsis, per mille, primes), euro, trade mark, U+FFFD."""
    return np.array([(0xA0, 0x17F), (0x2010, 0x2027), (0x2030, 0x205E), (0x20AC, 0x20AC), (0x2122, 0x2122),
                     (0xFFFD, 0xFFFD)], np.int64)


def _charref_low() -> np.ndarray:
    """What `html.unescape` makes of `&#N;` for N < 256: a code point, or -2 for nothing (N removed)."""
    out = np.empty(256, np.int64)
    for n in range(256):
        r = html.unescape(f"&#{n};")
        out[n] = ord(r) if r else -2
    return out


def _named_table() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """HTML5 named entities written with ";" whose value is one ASCII or safe character: (name bytes, name offsets,
    code points, hash slots)."""
    ranges = _safe_ranges()
    names, cps = [], []
    for name, value in sorted(html.entities.html5.items()):
        if name.endswith(";") and len(value) == 1 and name.isascii() and len(name) <= 33:
            cp = ord(value)
            if cp < 0x80 or any(lo <= cp <= hi for lo, hi in ranges):
                names.append(name.encode())
                cps.append(cp)
    offs = np.zeros(len(names) + 1, np.int64)
    offs[1:] = np.cumsum([len(x) for x in names])
    slots = np.full(4096, -1, np.int64)
    for i, name in enumerate(names):
        h = _fnv_py(name) & (len(slots) - 1)
        while slots[h] >= 0:
            h = (h + 1) & (len(slots) - 1)
        slots[h] = i
    return np.frombuffer(b"".join(names), np.uint8).copy(), offs, np.array(cps, np.int64), slots


def _fnv_py(b: bytes) -> int:
    h = 0xCBF29CE484222325
    for c in b:
        h = ((h ^ c) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


@_jit
def _fnv(d, s, e):
    h = np.uint64(0xCBF29CE484222325)
    for j in range(s, e):
        h = (h ^ np.uint64(d[j])) * np.uint64(0x100000001B3)
    return h


@_jit
def _hexval(c):
    if 48 <= c <= 57:
        return c - 48
    if 65 <= c <= 70:
        return c - 55
    if 97 <= c <= 102:
        return c - 87
    return -1


@_jit
def _safe(cp, ranges):
    for t in range(len(ranges)):
        if ranges[t, 0] <= cp <= ranges[t, 1]:
            return True
    return False


@_jit
def _emit(dst, k, cp, ranges):
    """Write code point cp (ASCII or safe) as UTF-8 at dst[k]; the new k, or -1 if cp is neither."""
    if cp < 0x80:
        dst[k] = cp
        return k + 1
    if not _safe(cp, ranges):
        return -1
    if cp < 0x800:
        dst[k] = 0xC0 | (cp >> 6)
        dst[k + 1] = 0x80 | (cp & 0x3F)
        return k + 2
    dst[k] = 0xE0 | (cp >> 12)
    dst[k + 1] = 0x80 | ((cp >> 6) & 0x3F)
    dst[k + 2] = 0x80 | (cp & 0x3F)
    return k + 3


@_jit
def _unescape(src, s, e, dst, k, low, ranges, nm_bytes, nm_offs, nm_cp, nm_slots):
    """`html.unescape` of the text src[s:e] into dst[k:] for the entities it can finish here: numeric ones,
    and named ones written with ";" (HTML5's list), that give an ASCII or safe character (`_safe_ranges`). Returns
    the end in dst, or -1 for anything else (the row then goes through Python)."""
    j = s
    while j < e:
        c = src[j]
        if c != 38 or j + 1 >= e:
            dst[k] = c
            k += 1
            j += 1
            continue
        c1 = src[j + 1]
        t = j + 2
        if c1 == 35:  # &#
            v = 0
            if t < e and 48 <= src[t] <= 57:
                while t < e and 48 <= src[t] <= 57:
                    v = min(v * 10 + src[t] - 48, 0x110000)
                    t += 1
            elif t + 1 < e and (src[t] == 120 or src[t] == 88) and _hexval(src[t + 1]) >= 0:
                t += 1
                while t < e and _hexval(src[t]) >= 0:
                    v = min(v * 16 + _hexval(src[t]), 0x110000)
                    t += 1
            else:  # no entity here: "&" stays
                dst[k] = 38
                k += 1
                j += 1
                continue
            if t < e and src[t] == 59:
                t += 1
            if v < 256:
                cp = low[v]
            elif 0xD800 <= v <= 0xDFFF or v > 0x10FFFF:
                cp = 0xFFFD
            elif 0xFDD0 <= v <= 0xFDEF or (v & 0xFFFF) >= 0xFFFE:
                cp = -2
            else:
                cp = v
            if cp != -2:
                k = _emit(dst, k, cp, ranges)
                if k < 0:
                    return -1
            j = t
            continue
        if c1 == 9 or c1 == 10 or c1 == 12 or c1 == 32 or c1 == 60 or c1 == 38 or c1 == 59:
            dst[k] = 38  # no entity here: "&" stays
            k += 1
            j += 1
            continue
        # a name: up to 32 characters other than \t \n \f space < & # ; and then ";" (else Python decides)
        t = j + 1
        while t < e and t - j <= 32:
            b = src[t]
            if b == 9 or b == 10 or b == 12 or b == 32 or b == 60 or b == 38 or b == 35 or b == 59:
                break
            t += 1
        if t >= e or src[t] != 59 or t - j > 32:
            return -1
        h = np.int64(_fnv(src, j + 1, t + 1) & np.uint64(len(nm_slots) - 1))
        found = -1
        while nm_slots[h] >= 0:
            i = nm_slots[h]
            a, b = nm_offs[i], nm_offs[i + 1]
            if b - a == t + 1 - (j + 1):
                same = True
                for q in range(b - a):
                    if nm_bytes[a + q] != src[j + 1 + q]:
                        same = False
                        break
                if same:
                    found = i
                    break
            h = (h + 1) & (len(nm_slots) - 1)
        if found < 0:
            return -1
        k = _emit(dst, k, nm_cp[found], ranges)
        if k < 0:
            return -1
        j = t + 1
    return k


@_jit
def _entities(out, s, e, tmp, low, ranges, nm_bytes, nm_offs, nm_cp, nm_slots):
    """`data._decode` of the row out[s:e] if it has no "<", no character outside ASCII and the safe ranges
    (`_safe_ranges`: for those NFC changes nothing) and only entities `_unescape` finishes: decoded in place, the
    new end returned; else -1 and the row is left as it was. (Its UTF-8 is valid: checked before the scan.)"""
    j = s
    while j < e:
        c = out[j]
        if c < 0x80:
            if c == 60:
                return -1
            j += 1
        elif c < 0xE0:  # 2 bytes
            if not _safe(((np.int64(c) & 0x1F) << 6) | (out[j + 1] & 0x3F), ranges):
                return -1
            j += 2
        elif c < 0xF0:  # 3 bytes
            if not _safe(((np.int64(c) & 0x0F) << 12) | ((np.int64(out[j + 1]) & 0x3F) << 6) | (out[j + 2] & 0x3F),
                         ranges):
                return -1
            j += 3
        else:  # 4 bytes: outside the safe ranges
            return -1
    k1 = _unescape(out, s, e, tmp, 0, low, ranges, nm_bytes, nm_offs, nm_cp, nm_slots)
    if k1 < 0:
        return -1
    src, a, b = tmp, 0, k1
    for j in range(k1):
        if tmp[j] == 38:  # "&" left: `_decode` unescapes a second time (`&amp;#8217;`)
            k2 = _unescape(tmp, 0, k1, tmp, k1, low, ranges, nm_bytes, nm_offs, nm_cp, nm_slots)
            if k2 < 0:
                return -1
            src, a, b = tmp, k1, k2
            break
    for j in range(a, b):
        if src[j] == 60:
            return -1  # "<" made from "&lt;": the tag rule applies, Python decides
    out[s : s + b - a] = src[a:b]
    return s + b - a


@_jit
def _code(out, s, e, cls, entities, tmp, low, ranges, nm_bytes, nm_offs, nm_cp, nm_slots):
    """(end, code) of the decoded text out[s:e]: its `_flags` code; a row whose only Python work is entities or
    characters `_entities` finishes is decoded in place (a new end) and gets code 1."""
    code = _flags(out, s, e, cls)
    if code == 3 and entities:
        end = _entities(out, s, e, tmp, low, ranges, nm_bytes, nm_offs, nm_cp, nm_slots)
        if end >= 0:
            return end, 1
    return e, code


_LOW = _charref_low()
_RANGES = _safe_ranges()
_NM_BYTES, _NM_OFFS, _NM_CP, _NM_SLOTS = _named_table()


@_jit
def _scan(d, d64, out_u, out_t, out_c, off_u, off_t, off_c, work_t, work_c, cls, scratch, entities, tmp, low,
          ranges, nm_bytes, nm_offs, nm_cp, nm_slots):
    """Scan block `d`; fill the three columns. Returns the number of rows, or -1 to give the block up."""
    n = len(d)
    i = 0
    row = 0
    ku = kt = kc = 0
    off_u[0] = off_t[0] = off_c[0] = 0
    while i < n:
        i = _ws(d, i, n)
        if i >= n or d[i] != 123:
            return -1  # a blank line or not an object
        i = _ws(d, i + 1, n)
        seen = 0
        while True:
            if i >= n or d[i] != 34:
                return -1
            which, i = _key(d, i, n)
            if which < 0:
                return -1
            i = _ws(d, i, n)
            if i >= n or d[i] != 58:
                return -1
            i = _ws(d, i + 1, n)
            if which < 3:
                if seen & (1 << which) or i >= n or d[i] != 34:
                    return -1  # repeated, or not a string: the exact path names the reason
                seen |= 1 << which
                if which == 0:
                    i, ku = _string(d, i, n, out_u, ku, d64, scratch)
                elif which == 1:
                    i, kt = _string(d, i, n, out_t, kt, d64, scratch)
                else:
                    i, kc = _string(d, i, n, out_c, kc, d64, scratch)
            else:
                i = _value(d, i, n, scratch, d64)
            if i < 0:
                return -1
            i = _ws(d, i, n)
            if i >= n:
                return -1
            if d[i] == 44:
                i = _ws(d, i + 1, n)
                continue
            if d[i] == 125:
                i += 1
                break
            return -1
        i = _ws(d, i, n)
        if i < n:
            if d[i] != 10:
                return -1
            i += 1
        if seen != 7 or ku == off_u[row] or row == len(work_t):
            return -1  # a field is missing, the uid is empty, or more rows than the caller said
        kt, work_t[row] = _code(out_t, off_t[row], kt, cls, entities, tmp, low, ranges, nm_bytes, nm_offs, nm_cp,
                                nm_slots)
        kc, work_c[row] = _code(out_c, off_c[row], kc, cls, entities, tmp, low, ranges, nm_bytes, nm_offs, nm_cp,
                                nm_slots)
        off_u[row + 1] = ku
        off_t[row + 1] = kt
        off_c[row + 1] = kc
        row += 1
    return row


_ready = threading.Event()
_lock = threading.Lock()


def warm_up() -> None:
    """Load the compiled scanner: numba's first call in a process costs ~0.3-0.5 s (LLVM start-up, reading the
    on-disk cache; the very first run on a machine compiles, 11.4 s measured). Stage 01 runs this in a thread while
    its workers start on the exact path."""
    if not AVAILABLE or _ready.is_set():
        return
    with _lock:
        if not _ready.is_set():
            line = b'{"uid": "u", "title": "t", "content": "c", "x": [1, -2.5e3, "s"]}\n'
            _scan_loaded(np.frombuffer(line, np.uint8), 1)
            _ready.set()


def scan_block(chunk, n_lines: int | None = None, wait: bool = True, entities: bool = True
               ) -> tuple[pa.Table, np.ndarray, np.ndarray] | None:
    """Parse a block of lines: `(table of uid, title, content, title codes, content codes)` (codes: see `_flags`),
    or None when a line is not of the plain form described above (the caller then takes the exact path). Each row
    is one line: the table has as many rows as the block has lines. `n_lines`, if given, must be that number.

    The UTF-8 of the block must already be checked (bytes outside escapes are copied as they are). With
    `wait=False` it also returns None while the scanner is not loaded yet (`warm_up`). With `entities` (for
    `data.clean_text`; not for the study's cleaner, which needs the raw text), rows of ASCII text whose only Python
    work would be HTML entities that `_unescape` handles, or characters NFC leaves as they are, come back decoded,
    with code 1.
    """
    if not AVAILABLE or n_lines == 0 or len(chunk) == 0:
        return None
    if not _ready.is_set():
        if not wait:
            return None
        warm_up()
    return _scan_loaded(np.frombuffer(chunk, np.uint8), n_lines, entities)


def _scan_loaded(d: np.ndarray, n_lines: int | None, entities: bool = True
                 ) -> tuple[pa.Table, np.ndarray, np.ndarray] | None:
    n = len(d)
    if n >= 2**31:
        return None
    # the most rows the block can hold (a line it takes has at least `{"uid":"x","title":"","content":""}`)
    cap = n_lines if n_lines is not None else n // len(_SHORTEST) + 1
    # Buffers from Arrow's allocator, which reuses freed memory: fresh pages from the OS cost more than the scan
    bufs = [pa.allocate_buffer(n, resizable=True) for _ in range(3)]
    obufs = [pa.allocate_buffer(4 * (cap + 1)) for _ in range(3)]
    outs = [np.frombuffer(b, np.uint8) for b in bufs]
    offs = [np.frombuffer(b, np.int32) for b in obufs]
    work_t, work_c = np.empty(cap, np.uint8), np.empty(cap, np.uint8)
    scratch = np.empty(4, np.uint8)  # strings of fields we do not keep are checked, not kept
    # 64-bit words from the start of `d` (x86 reads them unaligned if the block does not start on 8 bytes)
    d64 = d[: n - n % 8].view(np.uint64)
    tmp = np.empty(2 * n, np.uint8)  # entity decoding's two passes (touched only as far as a row needs)
    rows = _scan(d, d64, *outs, *offs, work_t, work_c, _CLS, scratch, entities, tmp, _LOW, _RANGES, _NM_BYTES,
                 _NM_OFFS, _NM_CP, _NM_SLOTS)
    if rows < 0 or (n_lines is not None and rows != n_lines):
        return None
    for b, o in zip(bufs, offs):
        b.resize(int(o[rows]))
    cols = [pa.Array.from_buffers(pa.string(), rows, [None, ob, b]) for b, ob in zip(bufs, obufs)]
    return pa.table(cols, names=["uid", "title", "content"]), work_t[:rows], work_c[:rows]
