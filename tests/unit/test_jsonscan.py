"""The one-pass block scanner of stage 01 (`prodtune.jsonscan`) against the exact parsers it stands in for."""

from __future__ import annotations

import json
import random
from pathlib import Path

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from prodtune import jsonscan
from prodtune.data import _NEEDS_PYTHON, _NEEDS_WORK, DataConfig, _clean_truncate, clean_text, prepare

pytestmark = pytest.mark.skipif(not jsonscan.AVAILABLE, reason="needs numba")

_CHARS = (list("abcXYZ019 .,;:-") + ["  ", " ", "&", "&amp;", "&#8217;", "&x", "<p>", "<", "</b>", "<!x", '"', "\\",
          "/", "\n", "\t", "\r", "\x00", "\x01", "\x1f", "\x7f", "\x85", "é", "ß", "’", "日本", "😀", "\u2028", "\ufeff"])


def _text(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(_CHARS) for _ in range(rng.randint(0, n)))


def _row(rng: random.Random) -> dict:
    # long contents: the scanner checks 8-byte words at once, and the bytes left over one by one
    row = {"uid": _text(rng, 5) or "u", "title": _text(rng, 12), "content": _text(rng, rng.choice([40, 160]))}
    extras = {"target_ind": [rng.randrange(10**9) for _ in range(rng.randint(0, 4))],
              "target_rel": [rng.choice([1.0, 0.5, -2.5e-3, 7]) for _ in range(rng.randint(0, 3))],
              "n": rng.choice([0, -1, 3.25, 1e10, True, False, None, "x\\y\"z", "é"]), "tags": ["a", "\u00e9\\", 1]}
    for k in rng.sample(sorted(extras), rng.randint(0, len(extras))):
        row[k] = extras[k]
    keys = list(row)
    rng.shuffle(keys)
    return {k: row[k] for k in keys}


def _dump(rng: random.Random, row: dict) -> bytes:
    sep = rng.choice([(", ", ": "), (",", ":"), (" ,  ", " :\t")])
    return json.dumps(row, ensure_ascii=rng.random() < 0.5, separators=sep).encode()


def test_valid_lines_decode_exactly_and_mark_the_rows_that_need_cleaning() -> None:
    rng = random.Random(3)
    rows = [_row(rng) for _ in range(3000)]
    block = b"\n".join(_dump(rng, r) for r in rows) + rng.choice([b"\n", b"", b"\r\n"])
    got = jsonscan.scan_block(block, len(rows), entities=False)
    assert got is not None
    tab, work_t, work_c = got
    assert tab.to_pylist() == [{k: r[k] for k in ("uid", "title", "content")} for r in rows]
    for col, work in (("title", work_t), ("content", work_c)):
        want = pc.match_substring_regex(tab.column(col), _NEEDS_WORK).to_numpy(zero_copy_only=False)
        py = pc.match_substring_regex(tab.column(col), _NEEDS_PYTHON).to_numpy(zero_copy_only=False)
        assert ((work != 0) == want).all() and 0 < want.sum() < len(rows)
        assert ((work == 3) == py).all() and ((work == 1) == (want & ~py)).all() and 0 < (work == 1).sum()
    # with entities decoded: rows left for Python (code 3) come back as they are, and every row cleans as before
    tab2, work_t2, work_c2 = jsonscan.scan_block(block, len(rows))
    for col, work, work2 in (("title", work_t, work_t2), ("content", work_c, work_c2)):
        _assert_cleans_alike(tab.column(col).to_pylist(), tab2.column(col), work2)
        assert ((work2 == 3) <= (work == 3)).all() and ((work2 == 0) == (work == 0)).all()
    assert (work_c2 == 1).sum() > (work_c == 1).sum()


@pytest.mark.parametrize(
    "line",
    [
        b"",  # blank
        b'{"uid": "1", "title": "t"}',  # missing field
        b'{"uid": "1", "title": 5, "content": "c"}',  # not a string
        b'{"uid": 1, "title": "t", "content": "c"}',  # an int uid: the exact path turns it into "1"
        b'{"uid": "", "title": "t", "content": "c"}',  # empty uid
        b'{"uid": "1", "title": "t", "title": "u", "content": "c"}',  # repeated field
        b'{"uid": "1", "title": "t", "content": "c", "x": {"a": 1}}',  # a nested object
        b'{"uid": "1", "title": "t", "content": "c", "x": [[1]]}',  # a nested array
        b'{"ui\\u0064": "1", "title": "t", "content": "c"}',  # an escape in a key
        b'{"uid": "1", "title": "\\ud800", "content": "c"}',  # a lone surrogate
        b'{"uid": "1", "title": "t", "content": "c", "x": 12345678901234567890}',  # over 18 digits
        b'{"uid": "1", "title": "t", "content": "c"} x',  # trailing text
        b'["uid", "title", "content"]',
    ],
)
def test_lines_it_does_not_take_give_the_block_to_the_exact_path(line: bytes) -> None:
    good = b'{"uid": "0", "title": "t", "content": "c"}\n'
    assert jsonscan.scan_block(good, 1) is not None
    assert jsonscan.scan_block(good + line + b"\n", 2) is None


def test_a_line_it_takes_is_one_the_exact_parser_reads_the_same() -> None:
    """Random edits of valid lines (bytes that matter to JSON inserted, deleted or replaced): whenever the scanner
    takes the line, orjson reads it too, with the same three strings."""
    rng = random.Random(5)
    taken = refused = 0
    for _ in range(20000):
        line = bytearray(_dump(rng, _row(rng)))
        for _ in range(rng.randint(1, 3)):
            pos = rng.randrange(len(line) + 1)
            op = rng.random()
            b = rng.choice(b'{}[]",:\\ u0123456789abcdefABCDEF-+.eEtrufalsn\t\x00\x1f')
            if op < 0.4:
                line.insert(pos, b)
            elif op < 0.7 and pos < len(line):
                del line[pos]
            elif pos < len(line):
                line[pos] = b
        raw = bytes(line)
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            continue  # the caller checks UTF-8 before scanning
        if b"\n" in raw:
            continue
        got = jsonscan.scan_block(raw, 1, entities=False)  # (the JSON only: entities are tested below)
        if got is None:
            refused += 1
            continue
        taken += 1
        obj = orjson.loads(raw)
        assert {k: obj[k] for k in ("uid", "title", "content")} == got[0].to_pylist()[0], raw
        assert all(type(obj[k]) is str for k in ("uid", "title", "content")) and obj["uid"]
    assert taken > 1000 and refused > 1000


def test_stage_01_gives_the_same_result_with_and_without_the_scanner(tmp_path: Path, sample_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    def run(out: Path) -> tuple[dict, dict]:
        stats = prepare(DataConfig(input=str(sample_path), out_dir=str(out)), progress=False)
        tables = {s: pa.parquet.read_table(out / f"{s}.parquet") for s in ("train", "validation", "test")}
        tables["rejects"] = (out / "rejects.jsonl").read_bytes()  # line numbers included
        return {k: stats[k] for k in ("input_lines", "kept", "filtered", "rejected_by_reason")}, tables

    import pyarrow.parquet  # noqa: F401

    import prodtune.data as data

    # small blocks: some have bad lines, most do not; a block with one is scanned in pieces, the bad pieces exactly
    monkeypatch.setattr(data, "_BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(data, "_SUB_BLOCK_BYTES", 2 << 10)
    taken = []
    scan = jsonscan.scan_block

    def counted(*a, **kw):
        got = scan(*a, **kw)
        taken.append(got is not None)
        return got

    pieces = []
    scan_pieces = data._scan_pieces

    def counted_pieces(*a, **kw):
        pieces.append(1)
        return scan_pieces(*a, **kw)

    jsonscan.warm_up()  # else the first blocks may take the exact path while it loads
    monkeypatch.setattr(jsonscan, "scan_block", counted)
    monkeypatch.setattr(data, "_scan_pieces", counted_pieces)
    with_scanner = run(tmp_path / "a")
    monkeypatch.setattr(jsonscan, "scan_block", lambda *a, **kw: None)
    monkeypatch.setattr(data, "_SUB_BLOCK_BYTES", 1 << 30)  # every block the exact way, whole
    without = run(tmp_path / "b")
    assert sum(taken) >= 5 and with_scanner[0] == without[0] and with_scanner[0]["rejected_by_reason"]
    assert all(with_scanner[1][s] == without[1][s] for s in ("rejects",))
    assert all(with_scanner[1][s].equals(without[1][s]) for s in ("train", "validation", "test"))
    assert pieces  # blocks with a bad line were scanned in pieces


def test_row_codes_on_ascii_text_where_every_8_byte_word_boundary_matters() -> None:
    # ASCII only (no early exit on a non-ASCII byte): spaces, controls, "&"/"<" and what may follow them, at every
    # offset of a word and across word boundaries
    rng = random.Random(11)
    alphabet = [" ", " ", "a", "b", "&", "<", "#", "!", "/", "\t", "\x01", "\x7f", ";"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(20000)]
    # and one thing at every offset of plain text: a rule broken only across a word boundary is caught
    texts += ["x" * p + piece + "y" * (n - p) for n in range(20) for p in range(n + 1)
              for piece in ("  ", "&a", "&#", "<p", "</", "&", "<", "\x01", "\x7f", "\t", "é", " ")]
    block = b"\n".join(orjson.dumps({"uid": "u", "title": "t", "content": t}) for t in texts)
    tab, _, codes = jsonscan.scan_block(block, len(texts), entities=False)
    content = tab.column("content")
    want = pc.match_substring_regex(content, _NEEDS_WORK).to_numpy(zero_copy_only=False)
    py = pc.match_substring_regex(content, _NEEDS_PYTHON).to_numpy(zero_copy_only=False)
    assert (codes == 3).sum() > 1000 and (codes == 1).sum() > 1000 and (codes == 0).sum() > 100
    assert ((codes == 3) == py).all() and ((codes != 0) == want).all()


def test_a_row_per_line_without_being_told_the_number_of_lines() -> None:
    shortest = b'{"uid":"x","title":"","content":""}'  # the most rows a block can hold
    for k in (1, 2, 999):
        for end in (b"", b"\n", b"\r\n"):
            got = jsonscan.scan_block(b"\n".join([shortest] * k) + end)
            assert got is not None and got[0].num_rows == k and len(got[1]) == len(got[2]) == k
    assert jsonscan.scan_block(shortest + b"\n\n" + shortest) is None  # a blank line: the exact path


# entities `html.unescape` reads in many ways, and text around them
_ENTITY_PIECES = ["&#8217;", "&#8217", "&#x2019;", "&#X2019", "&#x201c;", "&#39;", "&#0;", "&#13;", "&#9;", "&#1;",
                  "&#128;", "&#150;", "&#129;", "&#160;", "&#173;", "&#255;", "&#256;", "&#382;", "&#383;", "&#768;",
                  "&#8192;", "&#8203;", "&#8232;", "&#55296;", "&#1114111;", "&#1114112;", "&#99999999999999999999;",
                  "&#64976;", "&#65534;", "&#65533;", "&#0000000038;", "&#x;", "&#;", "&#", "&#x", "&#xZ;",
                  "&amp;", "&amp", "&ampx;", "&amp;#8217;", "&amp;amp;", "&amp;amp;amp;", "&#38;#8217;", "&#38;lt;",
                  "&lt;", "&gt;", "&lt;b&gt;", "&quot;", "&apos;", "&nbsp;", "&mdash;", "&ndash;", "&copy;",
                  "&hellip;", "&rsquo;", "&eacute;", "&Eacute;", "&euro;", "&trade;", "&nosuch;", "&NotEqualTilde;",
                  "&Mu;", "&ohm;", "&x", "&T", "&", "& ", "&;", "&&amp;", "&\rx;", "&" + "a" * 31 + ";",
                  "&" + "a" * 32 + ";", "&" + "a" * 33 + ";", "a", "b", " ", "  ", ";", "#", "x", "\t", "é", "<", "<p>",
                  # characters NFC leaves alone (decoded in the scan), and ones it does not or that are removed
                  "é", "’", "–", "®", "½", "\xa0", "\u00ad", "ſ", "日本", "e\u0301", "\u0301", "\u2000", "\u200b",
                  "\x85", "😀", "\u212b", "&é;", "&\u00e9x;"]


def test_entities_decoded_in_the_scan_equal_python_decode() -> None:
    rng = random.Random(5)
    texts = ["".join(rng.choice(_ENTITY_PIECES) for _ in range(rng.randint(0, 6))) for _ in range(30000)]
    block = b"\n".join(orjson.dumps({"uid": "u", "title": t, "content": t}) for t in texts)
    tab, work_t, work_c = jsonscan.scan_block(block, len(texts))
    assert (work_t == work_c).all()
    _assert_cleans_alike(texts, tab.column("content"), work_c)
    decoded = sum(a != b for a, b in zip(texts, tab.column("content").to_pylist()))
    assert decoded > 5000 and (work_c == 3).sum() > 5000
    raw = jsonscan.scan_block(block, len(texts), entities=False)[0]
    assert raw.column("content").to_pylist() == texts


def _assert_cleans_alike(raw: list[str], scanned: pa.ChunkedArray, codes) -> None:
    """Rows left for Python are as they were; and stage 01's cleaning (compiled, and with Arrow) gives each row
    what `clean_text` gives its raw text."""
    for r, text, code in zip(raw, scanned.to_pylist(), codes):
        assert code != 3 or text == r
    want = [clean_text(r) for r in raw]
    for compiled in (True, False):
        got, _ = _clean_truncate(scanned, "prodtune", 10**9, codes, compiled=compiled)
        assert got.to_pylist() == want


def test_characters_decoded_in_the_scan_need_no_normalisation() -> None:
    import sys
    import unicodedata

    from prodtune.data import _CONTROL

    # second characters of canonical compositions: a character that is one could merge with the one before it
    seconds = set()
    for cp in range(sys.maxunicode + 1):
        dec = unicodedata.decomposition(chr(cp))
        if dec and not dec.startswith("<") and len(dec.split()) == 2:
            seconds.add(int(dec.split()[1], 16))
    safe = [cp for lo, hi in jsonscan._safe_ranges() for cp in range(lo, hi + 1)]
    assert len(safe) > 250
    for cp in safe:
        c = chr(cp)
        assert unicodedata.normalize("NFC", c) == c and unicodedata.combining(c) == 0, hex(cp)
        assert cp not in seconds and not _CONTROL.search(c), hex(cp)
        for other in ("a", "e", "A", " ", "\u0301", "é"):  # nothing before or after merges with it
            assert unicodedata.normalize("NFC", other + c) == other + c or other == "\u0301"
            assert unicodedata.normalize("NFC", c + other) == c + other or other in ("\u0301",)
