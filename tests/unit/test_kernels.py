"""The compiled kernels of stage 01 (`prodtune.kernels`) against the Python and library code they stand in for."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xxhash

from prodtune import kernels
from prodtune.data import DataConfig, _clean_truncate, clean_text, prepare, study_clean_array, truncate_text

from test_data import _ASCII_PIECES, _PIECES

pytestmark = pytest.mark.skipif(not kernels.AVAILABLE, reason="needs numba")


def _texts(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    long_pieces = _ASCII_PIECES + [". ", "! ", "? ", "word ", "é", " ", "longerword"]
    out = ["".join(rng.choice(_PIECES) for _ in range(rng.randint(0, 12))) for _ in range(n)]
    out += ["".join(rng.choice(_ASCII_PIECES) for _ in range(rng.randint(0, 12))) for _ in range(n)]
    out += ["".join(rng.choice(long_pieces) for _ in range(rng.randint(0, 60))) for _ in range(n)]
    return out


@pytest.mark.parametrize("max_chars", [10**6, 40, 9, 2, 1])
def test_compiled_cleaning_and_truncation_equal_the_python_functions(max_chars: int) -> None:
    texts = _texts(5, 6000)
    arr = pa.array(texts, pa.string())
    for a, base in ((arr, texts), (arr.slice(1001, 7000), texts[1001:8001])):  # a slice: offsets into a shared buffer
        want_clean = [clean_text(t) for t in base]
        want = [truncate_text(t, max_chars) for t in want_clean]
        for compiled in (True, False):
            got, length = _clean_truncate(a, "prodtune", max_chars, None, compiled=compiled)
            assert got.to_pylist() == want
            assert length.tolist() == [len(t) for t in want_clean]
        # in place: into a fresh array's own buffer (given up)
        got, length = _clean_truncate(pa.array(base, pa.string()), "prodtune", max_chars, None, True, in_place=True)
        assert got.to_pylist() == want and length.tolist() == [len(t) for t in want_clean]
    # the study's cleaner: both paths truncate alike
    study = study_clean_array(arr).to_pylist()
    got, length = _clean_truncate(arr, "study", max_chars, None, compiled=True)
    assert got.to_pylist() == [truncate_text(t, max_chars) for t in study]
    assert got.to_pylist() == _clean_truncate(arr, "study", max_chars, None, compiled=False)[0].to_pylist()


def test_finish_column_in_place_reuses_the_buffer_unless_a_python_row_grew() -> None:
    texts = ["a  b", "plain", " x ", "ab"]
    arr = pa.array(texts, pa.string())
    got, _ = kernels.finish_column(arr, np.array([True, False, True, False]), np.array([3]), pa.array(["é"]), 100,
                                   in_place=True)  # "ab" -> "é": 2 bytes, not longer
    assert got.to_pylist() == ["a b", "plain", "x", "é"] and got.buffers()[2].address == arr.buffers()[2].address
    arr = pa.array(texts, pa.string())
    got, _ = kernels.finish_column(arr, np.array([True, False, True, False]), np.array([3]), pa.array(["abc"]), 100,
                                   in_place=True)  # longer than the row it replaces: a new buffer
    assert got.to_pylist() == ["a b", "plain", "x", "abc"] and got.buffers()[2].address != arr.buffers()[2].address
    assert arr.to_pylist() == texts
    parent = pa.array(["", "a  b", "c  d"], pa.string())  # a slice shares its parent's buffer: never in place
    got, _ = kernels.finish_column(parent.slice(1), np.array([True, True]), None, None, 100, in_place=True)
    assert got.to_pylist() == ["a b", "c d"] and parent.to_pylist() == ["", "a  b", "c  d"]


def test_finish_column_keeps_nulls_and_leaves_an_unchanged_column_uncopied() -> None:
    got, length = kernels.finish_column(pa.array([" a  b", None, "plain"]), np.array([True, False, False]), None,
                                        None, 100)
    assert got.to_pylist() == ["a b", None, "plain"] and length.tolist()[::2] == [3, 5]
    plain = pa.array(["one", "two words", ""])
    same, length = kernels.finish_column(plain, None, None, None, 100)
    assert same is plain and length.tolist() == [3, 9, 0]


def test_uid_keys_are_xxh3_64_exactly() -> None:
    rng = random.Random(2)
    uids = ["".join(rng.choice("abcXYZ0189-_é日") for _ in range(rng.randint(1, 150))) for _ in range(3000)]
    uids += ["B00" + str(rng.randrange(10**7)).zfill(7) for _ in range(1000)]  # ASIN-like, 10 bytes
    arr = pa.array(uids, pa.string())
    rows = np.arange(len(uids))
    for seed in (0, 3407, 2**63 + 11):
        k_sample, k_split, _, _ = kernels.row_keys(rows, arr, arr, arr, seed)
        assert k_sample.tolist() == [xxhash.xxh3_64_intdigest(u.encode(), seed) for u in uids]
        assert k_split.tolist() == [xxhash.xxh3_64_intdigest(u.encode(), seed + 1) for u in uids]


def test_pair_keys_tell_pairs_apart_and_depend_only_on_the_text() -> None:
    rng = random.Random(4)
    words = ["a", "b", "ab", "", " ", "\x00", "é", "x" * 7, "y" * 8, "z" * 31, "w" * 32, "v" * 33]
    pairs = {("".join(rng.choice(words) for _ in range(rng.randint(0, 6))),
              "".join(rng.choice(words) for _ in range(rng.randint(0, 9)))) for _ in range(60000)}
    pairs = sorted(pairs) + [("ab", "c"), ("a", "bc"), ("abc", ""), ("", "abc")]  # same bytes, split differently
    title = pa.array([t for t, _ in pairs], pa.string())
    content = pa.array([c for _, c in pairs], pa.string())
    rows = np.arange(len(pairs))
    _, _, a, b = kernels.row_keys(rows, title, title, content, 1)
    assert len(set(zip(a.tolist(), b.tolist()))) == len(pairs)
    # the same text at other offsets of other buffers gives the same key
    order = np.array(rng.sample(range(len(pairs)), len(pairs)))
    t2 = pa.array([pairs[i][0] for i in order], pa.string()).slice(0)
    c2 = pa.array(["pad"] + [pairs[i][1] for i in order], pa.string()).slice(1)
    _, _, a2, b2 = kernels.row_keys(rows, t2, t2, c2, 1)
    assert (a2 == a[order]).all() and (b2 == b[order]).all()


def test_seen_deduplicates_like_python_sets_in_input_order() -> None:
    rng = np.random.default_rng(0)
    seen, uid_set, pair_set = kernels.Seen(capacity=8), set(), set()  # a tiny table: it grows many times
    for _ in range(30):
        n = int(rng.integers(0, 5000))
        uid = rng.integers(0, 40000, n).astype(np.uint64)
        pair = rng.integers(0, 30000, n).astype(np.uint64)
        ua, ub = uid * np.uint64(0x9E3779B97F4A7C15), uid  # some keys share a first half
        pa_, pb = pair % np.uint64(7), pair
        want, dup_uid, dup_pair = [], 0, 0
        for u, p in zip(uid.tolist(), pair.tolist()):
            if u in uid_set:
                want.append(False)
                dup_uid += 1
                continue
            uid_set.add(u)
            if p in pair_set:
                want.append(False)
                dup_pair += 1
                continue
            pair_set.add(p)
            want.append(True)
        keep, du, dp = seen.first_unseen(ua, ub, pa_, pb)
        assert keep.tolist() == want and (du, dp) == (dup_uid, dup_pair)


def test_stage_01_gives_the_same_files_with_the_compiled_or_the_arrow_cleaning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    rng = random.Random(8)
    texts = _texts(9, 1500)
    lines = [json.dumps({"uid": f"u{rng.randrange(3000)}", "title": rng.choice(texts) or "t",
                         "content": " ".join(rng.choice(texts) for _ in range(rng.randint(0, 30)))})
             for _ in range(6000)]
    src = tmp_path / "trn.json"
    src.write_text("\n".join(lines) + "\n")
    cfg = dict(input=str(src), write_jsonl=False, min_content_chars=20, max_content_chars=120)
    kernels.warm_up()
    compiled = prepare(DataConfig(**cfg), tmp_path / "compiled", progress=False)
    monkeypatch.setattr(kernels, "ready", lambda: False)  # workers clean with Arrow (deduplication stays compiled)
    arrow = prepare(DataConfig(**cfg), tmp_path / "arrow", progress=False)
    assert compiled["filtered"] == arrow["filtered"] and compiled["truncated_content"] == arrow["truncated_content"]
    assert compiled["filtered"]["duplicate_uid"] > 0 and compiled["truncated_content"] > 0
    for split in ("train", "validation", "test"):
        assert pq.read_table(tmp_path / "compiled" / f"{split}.parquet").equals(
            pq.read_table(tmp_path / "arrow" / f"{split}.parquet"))


def test_jsonl_is_byte_for_byte_what_orjson_writes() -> None:
    import orjson

    rng = random.Random(1)
    pieces = [chr(i) for i in range(0x20)] + ['"', "\\", "/", "\x7f", "\u2028", "é", "😀", "abcdefgh", "word ", "x"]
    sizes = ((1, 5), (0, 30), (0, 80))  # uid, title, content
    rows = [tuple("".join(rng.choice(pieces) for _ in range(rng.randint(lo, hi))) for lo, hi in sizes)
            for _ in range(20000)]
    cols = [pa.array([r[i] for r in rows], pa.string()) for i in range(3)]
    want = [orjson.dumps({"uid": u, "title": t, "content": c}) + b"\n" for u, t, c in rows]
    assert bytes(kernels.jsonl(*cols)) == b"".join(want)
    assert bytes(kernels.jsonl(*(c.slice(7, 1000) for c in cols))) == b"".join(want[7:1007])


def test_without_numba_the_kernels_run_as_python_and_give_the_same_files(tmp_path: Path, sample_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys; sys.modules['numba'] = None\n"  # numba cannot be imported
            "from prodtune import jsonscan, kernels\n"
            "assert not jsonscan.AVAILABLE and not kernels.AVAILABLE\n"
            "from prodtune.data import DataConfig, prepare\n"
            f"prepare(DataConfig(input={str(sample_path)!r}, out_dir=sys.argv[1], write_jsonl=True), progress=False)\n")
    subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(tmp_path / "python")], check=True)
    prepare(DataConfig(input=str(sample_path), out_dir=str(tmp_path / "numba"), write_jsonl=True), progress=False)
    for name in ("train", "validation", "test"):
        assert pq.read_table(tmp_path / "python" / f"{name}.parquet").equals(
            pq.read_table(tmp_path / "numba" / f"{name}.parquet"))
        python, numba = (tmp_path / d / f"{name}.jsonl" for d in ("python", "numba"))
        assert python.read_bytes() == numba.read_bytes()
