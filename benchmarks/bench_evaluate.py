"""Stage 06 as we run it (ours: the systems of one model pooled into fuller batches, `evaluate.pool`, decoded by
the pruned greedy loop, `decoding.greedy_pruned`: a row that reached EOS leaves the batch, the KV cache grows in place)
against the reference (one system at a time through transformers' `model.generate`), on the same trained runs, each
into its own output folder with nothing cached, and the generations of every system compared token for token.

    ./run_all.sh                                   # stages 01-05 (and 01s/03s) first: this reads their run folders
    python benchmarks/bench_evaluate.py            # the cpu profile's stage 06 per variant (~5-9 min each on 2 cores)
    python benchmarks/bench_evaluate.py --n-test 8 --systems base llama-ft   # a quick check
    python benchmarks/bench_evaluate.py --set paths.models_dir=/elsewhere/models/cpu   # runs trained elsewhere

Variants (`--variants`, the reference first: a machine that warms up favours the later ones): `transformers`
(engine transformers, one system at a time), `pruned` (engine pruned, one system at a time), `ours` (engine pruned,
pooled). Per variant: the stage's wall seconds and each system's seconds (`metrics.json` meta). Then, per system, how
many generations are identical to the reference's and whether every metric is equal. Results:
benchmarks/results/bench_evaluate.json (with the machine); the work folders are
benchmarks/.cache/bench_evaluate/<variant>/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from prodtune.bench import save_result  # noqa: E402

VARIANTS = {"transformers": ["evaluate.engine=transformers", "evaluate.pool=false"],
            "pruned": ["evaluate.engine=pruned", "evaluate.pool=false"],
            "ours": ["evaluate.engine=pruned", "evaluate.pool=true"]}


def generations(out: Path, systems: list[str]) -> dict[str, dict[str, str]]:
    """Each system's cached generations, text by cache key (uid + prompt + model), from `<out>/generations/`."""
    res = {}
    for name in systems:
        lines = (out / "generations" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        res[name] = {r["key"]: r["text"] for r in map(json.loads, filter(str.strip, lines))}
    return res


def run_variant(profile: str, variant: str, work: Path, overrides: list[str]) -> dict[str, Any]:
    from prodtune.config import load_config
    from prodtune.evaluate import EvalConfig, run

    out = work / variant
    shutil.rmtree(out, ignore_errors=True)  # nothing cached: every system generates
    cfg = load_config(EvalConfig, profile, [*overrides, *VARIANTS[variant], f"evaluate.out_dir={out}",
                                            "evaluate.write_latest=false", "evaluate.progress=false"])
    t0 = time.perf_counter()
    metrics = run(cfg)
    return {"seconds": round(time.perf_counter() - t0, 1), "system_seconds": metrics["meta"]["system_seconds"],
            "metrics": {s: {k: v["mean"] for k, v in m.items()} for s, m in metrics.items()
                        if s not in ("comparisons", "meta")}, "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="cpu")
    ap.add_argument("--n-test", type=int, default=None, help="first N test products (default: the profile's)")
    ap.add_argument("--systems", nargs="*", default=None, help="default: the profile's")
    ap.add_argument("--work", default=str(ROOT / "benchmarks/.cache/bench_evaluate"))
    ap.add_argument("--name", default="bench_evaluate", help="results file name")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                    help="the first is the reference the others are compared with")
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a profile value")
    a = ap.parse_args()
    overrides = list(a.set)
    if a.n_test:
        overrides.append(f"evaluate.n_test={a.n_test}")
    if a.systems:
        overrides.append("evaluate.systems=[" + ",".join(a.systems) + "]")
    work = Path(a.work)
    runs = {v: run_variant(a.profile, v, work, overrides) for v in a.variants}
    ref_name, others = a.variants[0], a.variants[1:]
    names = list(runs[ref_name]["metrics"])
    gens = {v: generations(Path(runs[v]["out"]), names) for v in a.variants}
    systems = {}
    for name in names:
        m_ref = {k: v for k, v in runs[ref_name]["metrics"][name].items() if k != "tokens_per_s"}
        row: dict[str, Any] = {"n": len(gens[ref_name][name]), f"{ref_name}_s": runs[ref_name]["system_seconds"].get(name)}
        for v in others:
            row[f"{v}_identical"] = sum(text == gens[v][name].get(key) for key, text in gens[ref_name][name].items())
            row[f"{v}_metrics_equal_except_speed"] = m_ref == {k: x for k, x in runs[v]["metrics"][name].items()
                                                              if k != "tokens_per_s"}
            row[f"{v}_s"] = runs[v]["system_seconds"].get(name)
        systems[name] = row
    print(f"{'system':18} {'n':>4} {ref_name + ' s':>16} " + " ".join(f"{v + ' s':>9} {'same':>5} {'m=':>5}" for v in others))
    for name, r in systems.items():
        print(f"{name:18} {r['n']:4d} {r[f'{ref_name}_s'] or 0:16.1f} " + " ".join(
            f"{r[f'{v}_s'] or 0:9.1f} {r[f'{v}_identical']:5d} {str(r[f'{v}_metrics_equal_except_speed'])[0]:>5}" for v in others))
    t = {v: runs[v]["seconds"] for v in a.variants}
    for v in others:
        print(f"stage 06: {ref_name} {t[ref_name]:.0f} s, {v} {t[v]:.0f} s: {t[ref_name] / t[v]:.2f}x")
    path = save_result(a.name, {
        "command": "python benchmarks/bench_evaluate.py " + " ".join(sys.argv[1:]), "profile": a.profile,
        "overrides": overrides, "variants": {v: VARIANTS[v] for v in a.variants}, "reference": ref_name,
        "stage_seconds": t, "speedup": {v: round(t[ref_name] / t[v], 2) for v in others}, "systems": systems,
        "all_identical": {v: all(r[f"{v}_identical"] == r["n"] for r in systems.values()) for v in others},
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
