"""Stage 06 metrics: each rule on a table of cases; bootstrap CIs that can exclude zero or not, equal to the old ones."""

from __future__ import annotations

import numpy as np
import pytest

from prodtune import metrics as M


@pytest.mark.parametrize(
    "pred, ref, lo, hi",
    [
        ("a red steel water bottle", "a red steel water bottle", 0.99, 1.0),
        ("a red steel bottle", "a red steel water bottle", 0.8, 0.9),
        ("completely unrelated words", "a red steel water bottle", 0.0, 0.01),
        ("", "a red steel water bottle", 0.0, 0.0),
    ],
)
def test_rouge_l(pred: str, ref: str, lo: float, hi: float) -> None:
    assert lo <= M.rouge_l(pred, ref) <= hi


def test_chrf_orders_closeness() -> None:
    ref = "Double-wall insulation keeps drinks cold for 24 hours."
    assert M.chrf(ref, ref) > M.chrf("Insulation keeps drinks cold.", ref) > M.chrf("A book about a garden.", ref) >= 0
    assert M.chrf("", ref) == 0.0


@pytest.mark.parametrize(
    "answer, own, neighbours, unsupported, copied",
    [
        ("Holds 750 ml and weighs 350 g.", "Bottle 750 ml, weighs 350 g", "", [], []),
        ("Holds 1000 ml.", "Bottle 750 ml", "", ["1000 ml"], []),
        ("Holds 750 cl.", "Bottle 750 ml", "", ["750 cl"], []),  # the same number with another unit is a new claim
        ("Made by Acme in Germany.", "Nordvik bottle", "", ["acme", "germany"], []),
        ("Made by Nordvik. Great gift.", "Nordvik Insulated Bottle", "", [], []),
        ("Weighs 1,5 kg and holds 1,000 mAh.", "weighs 1.5kg; 1000 mAh battery", "", [], []),
        ("A 5-inch screen, 12 pcs.", 'A 5" screen. Pack of 12.', "", [], []),  # 12 without its unit in the text: ok
        # RAG: specifics taken from a retrieved neighbour are unsupported AND copied
        ("The Zorro mat is 6 mm thick.", "Birchmont mat 5 mm", "Zorro yoga mat, 6 mm TPE", ["6 mm", "zorro"],
         ["6 mm", "zorro"]),
        ("The mat is 5 mm thick.", "Birchmont mat 5 mm", "Zorro yoga mat, 5 mm TPE", [], []),  # its own: not copied
    ],
)
def test_claim_check(answer: str, own: str, neighbours: str, unsupported: list, copied: list) -> None:
    r = M.claim_check(answer, own, neighbours)
    assert r["unsupported"] == unsupported and r["copied"] == copied
    assert r["unsupported_rate"] == pytest.approx(len(unsupported) / r["claims"]) if r["claims"] else r["unsupported_rate"] == 0
    assert r["copied_rate"] <= r["unsupported_rate"]


def test_number_claims_normalise_units_and_separators() -> None:
    assert M.number_claims('1,000 mAh, 2,5 kg, 5mm, 3-inch, 4" wide, 12 pcs, in 2020') == {
        ("1000", "mah"), ("2.5", "kg"), ("5", "mm"), ("3", "in"), ("4", "in"), ("12", "pcs"), ("2020", "")}


@pytest.mark.parametrize(
    "text, lo, hi",
    [("one two three four five six", 0.0, 0.0), ("buy it now " * 10, 0.85, 1.0), ("", 0.0, 0.0)],
)
def test_repetition_rate(text: str, lo: float, hi: float) -> None:
    assert lo <= M.repetition_rate(text) <= hi


@pytest.mark.parametrize(
    "completion, ok",
    [
        ("The shopper wants a gift.\n</think>\nYes, it makes a great gift.", True),
        ("reasoning only, never closed", False),
        ("\n</think>\nanswer without reasoning", False),
        ("reasoning\n</think>\n", False),
        ("a\n</think>\nb\n</think>\nc", False),
        ("<think>nested</think> answer", False),
    ],
)
def test_think_adherence(completion: str, ok: bool) -> None:
    assert M.think_adherence(completion) is ok


def test_paired_bootstrap_detects_a_real_difference_and_not_noise() -> None:
    rng = np.random.default_rng(0)
    base = rng.uniform(0.1, 0.3, size=40)
    better = base + 0.05 + rng.normal(0, 0.01, size=40)
    d = M.paired_bootstrap_diff(better, base)
    assert d["excludes_zero"] and d["lo"] > 0 and 0.04 < d["diff"] < 0.06 and d["p"] < 0.01
    noise = base + rng.normal(0, 0.05, size=40)
    d0 = M.paired_bootstrap_diff(noise, base)
    assert d0["lo"] < 0 < d0["hi"] and not d0["excludes_zero"]
    with pytest.raises(ValueError):
        M.paired_bootstrap_diff([1.0, 2.0], [1.0])


def test_bootstrap_mean_ci_covers_the_mean() -> None:
    ci = M.bootstrap_mean_ci([0.2, 0.4, 0.6, 0.8] * 10)
    assert ci["lo"] < ci["mean"] < ci["hi"] and ci["mean"] == pytest.approx(0.5) and ci["n"] == 40


def test_embedder_cosine_with_the_embedded_minilm() -> None:
    emb = M.Embedder()
    sims = emb.cosine(["a stainless steel water bottle", "", "a children's novel about a lighthouse"],
                      ["an insulated steel drinking bottle"] * 3)
    assert sims[0] > 0.6 and sims[1] == 0.0 and sims[2] < sims[0]


def _old_percentile_bootstrap(x: np.ndarray, n_boot: int, seed: int, alpha: float = 0.05) -> tuple[float, float, np.ndarray]:
    """The hand-written bootstrap stage 06 used before scipy's (the reference the new CIs must agree with)."""
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(n_boot, len(x)))].mean(axis=1)
    return float(np.quantile(means, alpha / 2)), float(np.quantile(means, 1 - alpha / 2)), means


@pytest.mark.parametrize("n, n_boot, seed", [(7, 500, 0), (40, 2000, 3407), (200, 1000, 1)])
def test_scipy_bootstrap_agrees_with_the_old_hand_written_one(n: int, n_boot: int, seed: int) -> None:
    rng = np.random.default_rng(n)
    a, b = rng.uniform(0, 1, size=n), rng.uniform(0, 1, size=n)
    lo, hi, _ = _old_percentile_bootstrap(a, n_boot, seed)
    ci = M.bootstrap_mean_ci(a, n_boot, seed)
    assert ci["lo"] == pytest.approx(lo, abs=1e-12) and ci["hi"] == pytest.approx(hi, abs=1e-12)
    lo, hi, means = _old_percentile_bootstrap(a - b, n_boot, seed)
    p = min(1.0, 2 * min((means <= 0).mean(), (means >= 0).mean()))
    d = M.paired_bootstrap_diff(a, b, n_boot, seed)
    assert d["lo"] == pytest.approx(lo, abs=1e-12) and d["hi"] == pytest.approx(hi, abs=1e-12) and d["p"] == p
    other = M.bootstrap_mean_ci(a, n_boot, seed + 1)  # the seed matters: another seed, other resamples
    assert (other["lo"], other["hi"]) != (ci["lo"], ci["hi"])


@pytest.mark.parametrize("values, lo, hi", [([0.25], 0.25, 0.25), ([0.3, 0.3, 0.3], 0.3, 0.3), ([0.0, 1.0], 0.0, 1.0)])
def test_bootstrap_of_tiny_samples(values: list[float], lo: float, hi: float) -> None:
    ci = M.bootstrap_mean_ci(values, 200, 0)
    assert ci["lo"] == pytest.approx(lo) and ci["hi"] == pytest.approx(hi) and ci["n"] == len(values)


def test_bootstrap_of_nothing_is_nan() -> None:
    assert np.isnan(M.bootstrap_mean_ci([])["mean"]) and M.bootstrap_mean_ci([])["n"] == 0
    d = M.paired_bootstrap_diff([], [])
    assert np.isnan(d["diff"]) and d["n"] == 0 and not d["excludes_zero"]


def test_claims_skip_function_words_and_closing_quotes() -> None:
    text = "'A fine book.' This novel is good. 'A gripping read' The Times' critic liked it, An Nordvik fan"
    assert M.capitalised_words(text) == {"times", "nordvik"}  # not "this" (a sentence after a quote), "the", "an"
    check = M.claim_check(text, "The Times reviewed it")
    assert check["unsupported"] == ["nordvik"]  # "Times'" is the word "Times"
