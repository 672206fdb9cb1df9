"""Stage 01: cleaning rules, every filter, every kind of bad line, accounting, sampling and splitting, reruns."""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
import xxhash

import prodtune.data as data
from prodtune.config import ConfigError
from prodtune.data import (Config, DataConfig, InputError, clean_array, clean_column, clean_text, reference_clean, run,
                           truncate_text)

LONG = "A sturdy description of a product with enough words to pass the length filter. " * 2


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Judith Kerr&#8217;s best&#8211;selling", "Judith Kerr’s best–selling"),
        ("Salt &amp; Pepper", "Salt & Pepper"),
        ("double &amp;#8217; escaped", "double ’ escaped"),
        ("&quot;Quoted&quot; &lt;3", '"Quoted" <3'),
        ("<p>First.</p><p>Second</p>", "First. Second"),
        ("line<br/>break<br>again", "line break again"),
        ("<b>Bold</b> and <i>italic</i>", "Bold and italic"),
        ("size < 5 and > 3", "size < 5 and > 3"),
        ("  many   spaces\tand\nnewlines  ", "many spaces and newlines"),
        ("Cafe\u0301 au lait", "Café au lait"),
        ("zero\u200bwidth\ufeff", "zerowidth"),
        ("ctrl\x00chars\x07", "ctrlchars"),
        ("12.5 cm × 3 in, 750 ml, 20% off, 100°C", "12.5 cm × 3 in, 750 ml, 20% off, 100°C"),
        ("Punctuation! Kept? Yes: (all); 'quotes' - dashes", "Punctuation! Kept? Yes: (all); 'quotes' - dashes"),
        ("", ""),
        ("<!-- comment --><b></b>", ""),
    ],
)
def test_clean_text(raw: str, expected: str) -> None:
    assert clean_text(raw) == expected


def _clean_text_v1(text: str) -> str:
    """clean_text as first written (always split/join non-ASCII rows): the fast version must agree with it."""
    import html
    import unicodedata

    tag = re.compile(r"<!--.*?-->|</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", re.S)
    block_tag = re.compile(r"</?(?:br|p|div|li|ul|ol|tr|h[1-6])\b[^<>]*>", re.I)
    control = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b-\u200d\ufeff]")
    if "&" in text:
        for _ in range(2):
            new = html.unescape(text)
            if new == text:
                break
            text = new
    if "<" in text:
        text = tag.sub("", block_tag.sub(" ", text))
    if not text.isascii():
        text = unicodedata.normalize("NFC", control.sub("", text))
    elif not text.isprintable():
        text = control.sub("", text)
    elif "  " not in text and text[:1] != " " and text[-1:] != " ":
        return text
    return " ".join(text.split())


# pieces that exercise every branch: entities (double-escaped too), tags, controls, zero-width and non-space
# whitespace, combining marks (NFC), precomposed letters, CJK, emoji, singletons that NFC maps (U+212B, U+2000)
_PIECES = ["a", "Z", "7", " ", "  ", "\t", "\n", "\r", "&amp;", "&amp;#8217;", "&#8217;", "&quot;", "&nbsp;", "&lt;b&gt;",
           "&", "&x", "<p>", "</p>", "<br/>", "<b>", "<", ">", "<!-- c -->", "\x00", "\x07", "\x85", "\x9f", "\xa0",
           "\u200b", "\ufeff", "\u2000", "\u2009", "\u3000", "\u2028", "e\u0301", "\u0301", "\u0327", "é", "ß",
           "\u212b", "\u1e9b\u0323", "日本", "😀", "\u00ad", "-", ".", "×", "°"]
# ASCII only: rows that `clean_array` handles without NFC; entities that decode to controls, whitespace or "&"
_ASCII_PIECES = ["a", "Z", "7", " ", "  ", "\t", "\n", "\x0b", "\x1f", "\x7f", "&amp;", "&amp;#8217;", "&#38;#8217;",
                 "&#11;", "&#9;", "&#10;", "&#160;", "&#x85;", "&#8203;", "&#x1F600;", "&#769;", "&amp;amp;", "&quot;",
                 "&lt;p&gt;", "&", "&x", "&#", "<p>", "</p>", "<br>", "<", ">", "-", ".", "#", ";"]


def test_clean_text_agrees_with_the_first_version_and_the_column_versions_with_the_row_ones() -> None:
    import random

    rng = random.Random(7)
    texts = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12))) for _ in range(20000)]
    texts += ["".join(rng.choice(_ASCII_PIECES) for _ in range(rng.randint(0, 12))) for _ in range(20000)]
    texts += [rng.choice(["Plain title", "Plain title with words", "x" * 300]) for _ in range(2000)]
    assert [clean_text(t) for t in texts] == [_clean_text_v1(t) for t in texts]
    arr = pa.array(texts, pa.string())
    assert clean_array(arr).to_pylist() == [clean_text(t) for t in texts]
    sliced = arr.slice(100, 5000)  # Arrow offsets into a shared buffer
    assert clean_array(sliced).to_pylist() == [clean_text(t) for t in texts[100:5100]]
    sliced = arr.slice(30000, 5000)
    assert clean_array(sliced).to_pylist() == [clean_text(t) for t in texts[30000:35000]]
    assert clean_array(pa.array([" a  b", None, "&amp;"])).to_pylist() == ["a b", None, "&"]
    for cleaner, clean in (("prodtune", clean_text), ("study", reference_clean)):
        for limit in (1, 5, 12, 300):
            col, length = clean_column(pa.chunked_array([arr.slice(0, 9000), arr.slice(9000)]), cleaner, limit)
            assert col.to_pylist() == [truncate_text(clean(t), limit) for t in texts], (cleaner, limit)
            assert length.tolist() == [len(clean(t)) for t in texts]


def test_reference_cleaner_destroys_what_ours_keeps() -> None:
    raw = "Kerr&#8217;s 12.5 cm Café"
    assert reference_clean(raw) == "Kerr8217s 125 cm Caf"
    assert clean_text(raw) == "Kerr’s 12.5 cm Café"


@pytest.mark.parametrize(
    "text, limit, expected",
    [
        ("short", 10, "short"),
        ("One sentence. Two sentence. Three", 30, "One sentence. Two sentence."),
        ("word " * 10, 12, "word word"),
    ],
)
def test_truncate_text(text: str, limit: int, expected: str) -> None:
    assert truncate_text(text, limit) == expected


def _write(path: Path, lines: list[bytes | str | dict]) -> Path:
    raw = []
    for line in lines:
        if isinstance(line, dict):
            line = json.dumps(line)
        raw.append(line.encode() if isinstance(line, str) else line)
    path.write_bytes(b"\n".join(raw) + b"\n")
    return path


def _run(tmp_path: Path, lines: list, **cfg) -> tuple[dict, Path]:
    src = _write(tmp_path / "trn.json", lines)
    out = tmp_path / "out"
    stats = run(DataConfig(input=str(src), out_dir=str(out), progress=False, **cfg))
    assert stats["input_lines"] == stats["kept"] + sum(stats["filtered"].values()) + stats["rejected"]
    return stats, out


def _all(out: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(out / f"{s}.parquet") for s in ("train", "validation", "test")])


BAD = [
    (b'{"uid": "1", "title": "Broken", "content": "no brace"', "bad_json"),
    (b'{"uid": "2", "title": "Caf\xe9", "content": "latin-1 bytes"}', "bad_utf8"),
    (b'["a", "list"]', "not_an_object"),
    (b"42", "not_an_object"),
    (b'{"title": "t", "content": "c"}', "missing_field:uid"),
    (b'{"uid": "3", "content": "c"}', "missing_field:title"),
    (b'{"uid": "4", "title": "t"}', "missing_field:content"),
    (b'{"uid": "5", "title": "t", "content": 7}', "bad_type:content"),
    (b'{"uid": "6", "title": ["t"], "content": "c"}', "bad_type:title"),
    (b'{"uid": null, "title": "t", "content": "c"}', "bad_type:uid"),
    (b'{"uid": "", "title": "t", "content": "c"}', "bad_type:uid"),
    (b"", "blank_line"),
]


@pytest.mark.parametrize("line, reason", BAD)
def test_each_bad_line_is_rejected_with_file_line_and_reason(tmp_path: Path, line: bytes, reason: str) -> None:
    good = {"uid": "g1", "title": "Good", "content": LONG}
    stats, out = _run(tmp_path, [good, line, {**good, "uid": "g2", "title": "Good 2"}])
    assert stats["rejected"] == 1 and stats["kept"] == 2
    rej = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert rej == [rej[0]] and rej[0]["line"] == 2 and rej[0]["reason"] == reason
    assert rej[0]["file"].endswith("trn.json")
    if reason == "bad_utf8":
        import base64

        assert base64.b64decode(rej[0]["raw_base64"]) == line  # nothing lost
    else:
        assert rej[0]["raw"] == line.decode()


def test_bad_lines_inside_a_large_file_keep_exact_line_numbers(tmp_path: Path) -> None:
    rows: list = [{"uid": f"u{i}", "title": f"Product {i}", "content": LONG + str(i)} for i in range(30000)]
    rows[12345] = b'{"uid": "x", "title": "oops"'
    rows[29999] = b'{"uid": 5.5, "title": "t", "content": "c"}'
    stats, out = _run(tmp_path, rows)
    rej = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rej] == [(12346, "bad_json"), (30000, "bad_type:uid")]
    assert stats["kept"] == 29998


@pytest.mark.parametrize(
    "rows, reason",
    [
        ([{"uid": "a", "title": "   ", "content": LONG}], "empty_title"),
        ([{"uid": "a", "title": "<b></b>", "content": LONG}], "empty_title"),
        ([{"uid": "a", "title": "T", "content": ""}], "empty_content"),
        ([{"uid": "a", "title": "T", "content": " <br/> "}], "empty_content"),
        ([{"uid": "a", "title": "T", "content": "too short"}], "short_content"),
        ([{"uid": "a", "title": "T", "content": LONG}, {"uid": "a", "title": "T2", "content": LONG + "x"}], "duplicate_uid"),
        ([{"uid": "a", "title": "T", "content": LONG}, {"uid": "b", "title": "T", "content": LONG}], "duplicate_title_content"),
        # the duplicate is judged on cleaned text: an entity-escaped copy is the same product text
        ([{"uid": "a", "title": "T & U", "content": LONG}, {"uid": "b", "title": "T &amp; U", "content": LONG}], "duplicate_title_content"),
    ],
)
def test_each_filter_counts(tmp_path: Path, rows: list, reason: str) -> None:
    stats, _ = _run(tmp_path, [*rows, {"uid": "z", "title": "Z", "content": LONG + "z"}])  # (nothing kept: an error)
    assert stats["filtered"][reason] == 1
    assert sum(stats["filtered"].values()) == 1


def test_min_content_parameter_and_truncation(tmp_path: Path) -> None:
    rows = [{"uid": "a", "title": "T", "content": "x" * 50}, {"uid": "b", "title": "T2", "content": "word " * 1000}]
    stats, out = _run(tmp_path, rows, min_content_chars=40, max_content_chars=300)
    assert stats["kept"] == 2 and stats["truncated_content"] == 1
    df = _all(out)
    assert df.content.str.len().max() <= 300


def test_gzip_input_and_jsonl(tmp_path: Path, sample_path: Path) -> None:
    gz = tmp_path / "trn.json.gz"
    gz.write_bytes(gzip.compress(sample_path.read_bytes()))
    stats = run(Config(input=str(gz), out_dir=str(tmp_path / "out"), progress=False))
    assert stats["input_lines"] == len(sample_path.read_bytes().splitlines())
    assert stats["kept"] > 300 and stats["rejected"] >= 12
    assert [p.name for p in (tmp_path / "out").glob("*.jsonl")] == ["rejects.jsonl"]  # Parquet only by default
    plain = run(Config(input=str(sample_path), out_dir=str(tmp_path / "j"), write_jsonl=True, progress=False))
    assert {k: plain[k] for k in ("kept", "filtered", "rejected_by_reason", "splits")} == {
        k: stats[k] for k in ("kept", "filtered", "rejected_by_reason", "splits")}
    for split, n in stats["splits"].items():
        lines = (tmp_path / "j" / f"{split}.jsonl").read_bytes().splitlines()
        assert [json.loads(x) for x in lines] == pd.read_parquet(tmp_path / "j" / f"{split}.parquet").to_dict("records")
        assert len(lines) == n


def test_unreadable_or_empty_input_raises_input_error_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(InputError, match="nope.json: no such file"):
        run(Config(input=str(missing), out_dir=str(tmp_path / "o"), progress=False))
    with pytest.raises(InputError, match="not a file"):
        run(Config(input=str(tmp_path), out_dir=str(tmp_path / "o"), progress=False))
    for name, raw in (("empty.json", b""), ("bom.json", b"\xef\xbb\xbf"), ("empty.json.gz", gzip.compress(b""))):
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(InputError, match=f"{name}: the file is empty"):
            run(Config(input=str(tmp_path / name), out_dir=str(tmp_path / "o"), progress=False))
    assert not (tmp_path / "o").exists()  # nothing written


@pytest.mark.parametrize("gz", [False, True])
def test_a_byte_order_mark_is_read_as_nothing(tmp_path: Path, gz: bool) -> None:
    rows = [{"uid": f"u{i}", "title": f"P{i}", "content": LONG + str(i)} for i in range(3)]
    # (a bad line sends the block line by line: orjson, like Arrow, must not see the mark)
    raw = b"\xef\xbb\xbf" + b"".join(json.dumps(r).encode() + b"\n" for r in rows) + b"{bad\n"
    src = tmp_path / ("trn.json.gz" if gz else "trn.json")
    src.write_bytes(gzip.compress(raw) if gz else raw)
    stats = run(Config(input=str(src), out_dir=str(tmp_path / "out"), progress=False))
    assert stats["rejected_by_reason"] == {"bad_json": 1} and stats["kept"] == 3
    assert json.loads((tmp_path / "out" / "rejects.jsonl").read_text())["line"] == 4
    assert sorted(_all(tmp_path / "out").uid) == ["u0", "u1", "u2"]
    assert data.before_after(src).empty  # the notebook's reader skips it too (no error on line 1)


def test_most_lines_rejected_for_one_reason_warns_with_the_fix(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"uid": None, "title": f"P{i}", "content": LONG + str(i)} for i in range(8)]
    rows += [{"uid": f"u{i}", "title": f"Q{i}", "content": LONG + str(i)} for i in range(2)]
    with caplog.at_level(logging.WARNING, logger="prodtune"):
        stats, _ = _run(tmp_path, rows)
    assert stats["kept"] == 2 and stats["rejected_by_reason"] == {"bad_type:uid": 8}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "8 of 10 lines" in warnings[0] and "bad_type:uid" in warnings[0]
    assert "--uid_from_text / data.uid_from_text=true" in warnings[0]
    caplog.clear()
    (tmp_path / "fixed").mkdir()
    with caplog.at_level(logging.WARNING, logger="prodtune"):
        stats, _ = _run(tmp_path / "fixed", rows, uid_from_text=True)
    assert stats["kept"] == 10 and not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_nothing_kept_raises_input_error_with_the_fix_and_leaves_old_outputs(tmp_path: Path) -> None:
    good = [{"uid": f"u{i}", "title": f"P{i}", "content": LONG + str(i)} for i in range(5)]
    _, out = _run(tmp_path, good)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _write(tmp_path / "trn.json", [{**r, "uid": None} for r in good])
    with pytest.raises(InputError, match=r"trn.json: no row kept of 5 lines.*bad_type:uid.*--uid_from_text"):
        run(Config(input=str(tmp_path / "trn.json"), out_dir=str(out), progress=False))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no partial file, no temporary file left
    (tmp_path / "short").mkdir()
    with pytest.raises(InputError, match="no row kept of 2 lines.*short_content.*min_content_chars"):
        _run(tmp_path / "short", [{"uid": "a", "title": "T", "content": "x"}, {"uid": "b", "title": "U", "content": "y"}])


def test_a_rerun_of_the_same_config_reuses_the_outputs(tmp_path: Path) -> None:
    import dataclasses

    rows = [{"uid": f"u{i}", "title": f"P{i}", "content": LONG + str(i)} for i in range(20)]
    first, out = _run(tmp_path, rows)

    def inodes() -> dict[str, int]:  # every write is a new file renamed into place
        return {p.name: p.stat().st_ino for p in out.iterdir()}

    before = inodes()
    cfg = Config(input=str(tmp_path / "trn.json"), out_dir=str(out), progress=False)
    assert run(cfg) == first and inodes() == before  # reused
    run(dataclasses.replace(cfg, force=True))
    assert inodes()["train.parquet"] != before["train.parquet"]  # force: written again
    (out / "test.parquet").unlink()  # an output missing: run again
    assert run(cfg)["kept"] == 20 and (out / "test.parquet").is_file()
    assert run(dataclasses.replace(cfg, min_content_chars=50))["config"]["min_content_chars"] == 50  # another config
    (tmp_path / "trn.json").write_bytes((tmp_path / "trn.json").read_bytes())  # the input is newer: run again
    again = inodes()
    assert run(cfg)["config"]["min_content_chars"] == 100 and inodes()["train.parquet"] != again["train.parquet"]


@pytest.mark.parametrize("field, value", [("min_content_chars", -1), ("max_content_chars", 0), ("max_title_chars", 0),
                                          ("validation_frac", 1.0), ("test_frac", -0.1), ("parquet_compression", "gz"),
                                          ("cleaner", "regex"), ("sample", 0), ("seed", -1)])
def test_bad_values_raise_config_error_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=f"data.{field}="):
        Config(**{field: value})


def test_split_and_sample_are_xxh3_of_the_uid(tmp_path: Path) -> None:
    rows = [{"uid": f"u{i}", "title": f"P{i}", "content": LONG + str(i)} for i in range(300)]
    _, out = _run(tmp_path, rows, seed=5)
    pos = {r["uid"]: xxhash.xxh3_64_intdigest(r["uid"].encode(), 6) / 2**64 for r in rows}
    want = {u: "validation" if p < 0.1 else "test" if p < 0.2 else "train" for u, p in pos.items()}
    got = {u: s for s in data.SPLITS for u in pd.read_parquet(out / f"{s}.parquet").uid}
    assert got == want
    for s in data.SPLITS:  # input order inside each split
        uids = pd.read_parquet(out / f"{s}.parquet").uid.tolist()
        assert uids == sorted(uids, key=lambda u: int(u[1:]))
    (tmp_path / "sampled").mkdir()
    stats, out = _run(tmp_path / "sampled", rows, seed=5, sample=30)
    smallest = sorted(pos, key=lambda u: xxhash.xxh3_64_intdigest(u.encode(), 5))[:30]
    assert sorted(_all(out).uid) == sorted(smallest) and stats["filtered"]["not_sampled"] == 270


def test_sample_is_seeded_and_splits_are_disjoint_and_exact(tmp_path: Path, sample_path: Path) -> None:
    def sampled(seed: int, name: str) -> pd.DataFrame:
        out = tmp_path / name
        stats = run(DataConfig(input=str(sample_path), out_dir=str(out), sample=200, seed=seed, progress=False))
        assert stats["splits"] == {"train": 160, "validation": 20, "test": 20}
        assert stats["filtered"]["not_sampled"] > 0
        return pd.concat([pd.read_parquet(out / f"{s}.parquet").assign(split=s) for s in ("train", "validation", "test")])

    a, b, c = sampled(1, "a"), sampled(1, "b"), sampled(2, "c")
    assert a.reset_index(drop=True).equals(b.reset_index(drop=True))
    assert set(a.uid) != set(c.uid)
    assert a.uid.is_unique and a.groupby("uid").split.nunique().max() == 1


def test_split_of_a_product_does_not_depend_on_file_order(tmp_path: Path) -> None:
    rows = [{"uid": f"u{i}", "title": f"P{i}", "content": LONG + str(i)} for i in range(400)]
    _, out1 = _run(tmp_path / "a" if (tmp_path / "a").mkdir() is None else tmp_path, rows)
    (tmp_path / "b").mkdir()
    src = _write(tmp_path / "b" / "trn.json", rows[::-1])
    run(DataConfig(input=str(src), out_dir=str(tmp_path / "b" / "out"), progress=False))

    def splits(out: Path) -> dict:
        return {u: s for s in ("train", "validation", "test") for u in pd.read_parquet(out / f"{s}.parquet").uid}

    assert splits(out1) == splits(tmp_path / "b" / "out")


def test_outputs_load_with_datasets(prepared_dir: Path) -> None:
    from datasets import load_dataset

    ds = load_dataset("parquet", data_files={s: str(prepared_dir / f"{s}.parquet") for s in ("train", "validation", "test")})
    assert set(ds["train"].column_names) >= {"uid", "title", "content"}
    js = load_dataset("json", data_files=str(prepared_dir / "test.jsonl"))["train"]
    assert js.num_rows == ds["test"].num_rows


def test_outputs_get_the_mode_of_a_plain_write(tmp_path: Path) -> None:
    """Atomic writes go through mkstemp (0600); the finished files must be readable like any other (0666 - umask)."""
    import os

    rows = [{"uid": f"u{i}", "title": f"P{i}", "content": LONG + str(i)} for i in range(5)]
    old = os.umask(0o022)
    try:
        _, out = _run(tmp_path, rows)
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(old)
    want = (tmp_path / "plain").stat().st_mode & 0o777
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes and all(m == want for m in modes.values()), modes


def test_parallel_blocks_give_the_same_result_as_one_block(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small blocks force two worker threads, retries in pieces, duplicates and line numbers across blocks, and a
    line longer than a block."""
    rows: list = [{"uid": f"u{i % 2900}", "title": f"Product {i % 2500}", "content": LONG + str(i % 2500) + (" &amp; more" if i % 7 == 0 else "")}
                  for i in range(3000)]
    rows[1500] = b'{"uid": "x", "title": "oops"'
    rows[2999] = b'{"uid": 1.5, "title": "t", "content": "c"}'
    rows[2000] = {"uid": "long", "title": "Long", "content": "word " * 8000}  # 40 KB: over two 16 KB blocks
    src = _write(tmp_path / "trn.json", rows)
    one = run(DataConfig(input=str(src), out_dir=str(tmp_path / "one"), progress=False))
    monkeypatch.setattr(data, "_BLOCK_BYTES", 16 << 10)
    monkeypatch.setattr(data, "_PIECE_BYTES", 4 << 10)
    many = run(DataConfig(input=str(src), out_dir=str(tmp_path / "many"), progress=False))
    for k in ("input_lines", "kept", "filtered", "rejected_by_reason", "splits"):
        assert one[k] == many[k], k
    assert (tmp_path / "one" / "rejects.jsonl").read_bytes() == (tmp_path / "many" / "rejects.jsonl").read_bytes()
    for s in ("train", "validation", "test"):
        assert pd.read_parquet(tmp_path / "one" / f"{s}.parquet").equals(pd.read_parquet(tmp_path / "many" / f"{s}.parquet"))
    assert one["filtered"]["duplicate_uid"] == 99 and one["filtered"]["duplicate_title_content"] > 200


@pytest.mark.parametrize("cleaner", ["prodtune", "study"])
def test_each_cleaner_on_a_block_arrow_reads_in_several_chunks(tmp_path: Path, cleaner: str) -> None:
    """A 2 MB block comes back from Arrow's JSON reader as several chunks; both cleaners, the filters and the
    truncation must handle that (the study cleaner once returned a chunked array that truncation could not take)."""
    long = "Steel bottle &amp; cap, 750&#8201;ml. " * 120  # ~4,500 characters: cut at 2,000
    rows = [{"uid": f"u{i}", "title": f"Bottle {i} <b>new</b>", "content": long + str(i) if i % 3 else "short"} for i in range(600)]
    stats, out = _run(tmp_path, rows, cleaner=cleaner, max_content_chars=2000)
    clean = clean_text if cleaner == "prodtune" else reference_clean
    want = {f"u{i}": truncate_text(clean(long + str(i)), 2000) for i in range(600) if i % 3}
    got = _all(out).set_index("uid")["content"].to_dict()
    assert stats["kept"] == len(want) == 400 and stats["filtered"]["short_content"] == 200
    assert stats["truncated_content"] == 400
    assert got == want


def test_dedup_matches_a_plain_loop_in_input_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many duplicates of both kinds, within and across blocks: the kept rows and the counts are those of the
    obvious loop (a row goes if its uid was seen, else if its (title, content) was seen among rows kept so far)."""
    import random

    rng = random.Random(11)
    rows = [{"uid": f"u{rng.randrange(700)}", "title": f"T{rng.randrange(40)}", "content": LONG + str(rng.randrange(25))}
            for _ in range(1500)]
    # the pair of a row dropped for its uid is not recorded: pairs of kept rows only
    seen_u, seen_p, want, dup_u, dup_p = set(), set(), [], 0, 0
    for r in rows:
        if r["uid"] in seen_u:
            dup_u += 1
        else:
            seen_u.add(r["uid"])
            if (r["title"], r["content"]) in seen_p:
                dup_p += 1
            else:
                seen_p.add((r["title"], r["content"]))
                want.append(r["uid"])
    monkeypatch.setattr(data, "_BLOCK_BYTES", 24 << 10)
    stats, out = _run(tmp_path, rows)
    assert stats["filtered"]["duplicate_uid"] == dup_u and stats["filtered"]["duplicate_title_content"] == dup_p
    assert sorted(_all(out)["uid"]) == sorted(want) and dup_u > 500 and dup_p > 100
