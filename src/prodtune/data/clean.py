"""Stage 01's text cleaning: one row (`clean_text`, `truncate_text`, `reference_clean`) or an Arrow column.

    python -c "from prodtune.data import clean_text; print(clean_text('Kerr&#8217;s <b>best</b>'))"

The column versions give the same result row by row as the row versions (tested): rows that need nothing are
not touched, control characters and whitespace are Arrow's regex kernels (they release the GIL), and only rows
with an HTML entity, a tag or non-ASCII text go through Python (`html.unescape`, the tag regexes, NFC).
"""

from __future__ import annotations

import html
import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_TAG = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", re.S)
_BLOCK_TAG = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|h[1-6])\b[^<>]*>", re.I)
# C0/C1 control characters other than whitespace, and zero-width characters.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\ufeff]")

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
_STUDY = r"[^A-Za-z0-9 ]+"


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
    """Cut `text` to at most `max_chars`, at the last sentence end if one is in the second half, else at a space.

    Args:
        text: cleaned text.
        max_chars: the most characters kept.

    Returns:
        `text` itself if it fits, else its cut head.
    """
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    cut = max(head.rfind(". "), head.rfind("! "), head.rfind("? "))
    if cut >= max_chars // 2:
        return head[: cut + 1]
    space = head.rfind(" ")
    return head[:space].rstrip() if space > 0 else head


# A description that opens with a quotation is press praise ("'A wonderful book' The Times 'Gripping' Daily Mail"),
# optionally after a "Praise for ...:" lead-in. A right single quote is left out of the openers: "’Tis" is an apostrophe.
_OPENS_WITH_QUOTE = re.compile(r"""^\s*(?:Praise for\b[^:'"‘“]{0,120}:?\s*)?['"‘“]""")


def opens_with_quote(text: str | None) -> bool:
    """True when a description opens with a quotation (press praise), optionally after "Praise for ...:"."""
    return bool(text) and _OPENS_WITH_QUOTE.match(text) is not None


def reference_clean(text: str) -> str:
    """The study's cleaner, kept only to compare against: strips every non-alphanumeric character."""
    return re.sub(_STUDY, "", text).strip()


def _matches(arr: pa.Array, pattern: str) -> np.ndarray:
    return pc.fill_null(pc.match_substring_regex(arr, pattern), False).to_numpy(zero_copy_only=False)


def _clean_parts(arr: pa.Array) -> tuple[np.ndarray | None, pa.Array | None]:
    """The rows of `arr` (no chunks) that `clean_text` changes, and their cleaned text: `(mask, cleaned)`, or
    `(None, None)` when no row changes. Null rows are left alone."""
    if len(arr) == 0:
        return None, None
    mask = _matches(arr, _NEEDS_WORK)
    if not mask.any():
        return None, None
    sub = arr.filter(pa.array(mask))
    py = _matches(sub, _NEEDS_PYTHON)  # (only on the rows that need work: most rows are plain)
    if py.any():
        py_mask = pa.array(py)
        sub = pc.replace_with_mask(sub, py_mask, pa.array([_decode(t) for t in sub.filter(py_mask).to_pylist()],
                                                          pa.string()))
    sub = pc.replace_substring_regex(sub, _ASCII_CONTROL, "")
    sub = pc.utf8_trim(pc.replace_substring_regex(sub, _WS_RUN, " "), " ")
    return mask, sub


def clean_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`clean_text` over an Arrow string array: the same result row by row; nulls stay null."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    mask, sub = _clean_parts(arr)
    return arr if mask is None else pc.replace_with_mask(arr, pa.array(mask), sub)


def study_clean_array(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`reference_clean` over an Arrow string array: every non-alphanumeric character removed."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    return pc.utf8_trim_whitespace(pc.replace_substring_regex(arr, _STUDY, ""))


def clean_column(arr: pa.Array | pa.ChunkedArray, cleaner: str, max_chars: int) -> tuple[pa.Array, np.ndarray]:
    """Clean a column and cut rows longer than `max_chars` as `truncate_text` does.

    Args:
        arr: a string column (no nulls).
        cleaner: "prodtune" (`clean_text`) or "study" (`reference_clean`).
        max_chars: the most characters a row keeps.

    Returns:
        The new column and each row's cleaned length in characters, before the cut.
    """
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if cleaner == "study":
        arr, mask, sub = study_clean_array(arr), None, None
    else:
        mask, sub = _clean_parts(arr)
    # rows left alone are printable ASCII (the study cleaner leaves only ASCII): their length is their byte count
    length = pc.binary_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    if mask is not None:
        length[mask] = pc.utf8_length(sub).to_numpy(zero_copy_only=False)
    long_ = length > max_chars
    if long_.any():  # long rows join the rows to replace, with their cleaned text cut
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
