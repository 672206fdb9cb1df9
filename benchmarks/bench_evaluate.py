"""Stage 06 with the pruned greedy loop (ours: `decoding.greedy_pruned`, a row that reached EOS leaves the batch)
against transformers' `model.generate` (the reference), on the same trained runs, each into its own output folder
with nothing cached, and the generations of every system compared token for token.

    ./run_all.sh                                   # stages 01-05 (and 01s/03s) first: this reads their run folders
    python benchmarks/bench_evaluate.py            # the cpu profile's stage 06 twice (each ~9 min on 2 cores)
    python benchmarks/bench_evaluate.py --n-test 8 --systems base llama-ft   # a quick check

Per engine: the stage's wall seconds and each system's seconds (`metrics.json` meta). Then, per system, how many
generations are identical and whether every metric is equal. Results: benchmarks/results/bench_evaluate.json (with
the machine); the work folders are benchmarks/.cache/bench_evaluate/<engine>/ (git-ignored).
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

ENGINES = ("transformers", "pruned")  # the reference first: a machine that warms up favours the second


def generations(out: Path, systems: list[str]) -> dict[str, dict[str, str]]:
    """Each system's cached generations, text by cache key (uid + prompt + model), from `<out>/generations/`."""
    res = {}
    for name in systems:
        lines = (out / "generations" / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()
        res[name] = {r["key"]: r["text"] for r in map(json.loads, filter(str.strip, lines))}
    return res


def run_engine(profile: str, engine: str, work: Path, overrides: list[str]) -> dict[str, Any]:
    from prodtune.config import load_config
    from prodtune.evaluate import EvalConfig, run

    out = work / engine
    shutil.rmtree(out, ignore_errors=True)  # nothing cached: every system generates
    cfg = load_config(EvalConfig, profile, [*overrides, f"evaluate.engine={engine}", f"evaluate.out_dir={out}",
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
    a = ap.parse_args()
    overrides = []
    if a.n_test:
        overrides.append(f"evaluate.n_test={a.n_test}")
    if a.systems:
        overrides.append("evaluate.systems=[" + ",".join(a.systems) + "]")
    work = Path(a.work)
    runs = {e: run_engine(a.profile, e, work, overrides) for e in ENGINES}
    names = list(runs["transformers"]["metrics"])
    ref, ours = (generations(Path(runs[e]["out"]), names) for e in ENGINES)
    systems = {}
    for name in names:
        same = sum(text == ours[name].get(key) for key, text in ref[name].items())
        m_ref, m_ours = ({k: v for k, v in runs[e]["metrics"][name].items() if k != "tokens_per_s"} for e in ENGINES)
        systems[name] = {"n": len(ref[name]), "identical": same, "metrics_equal_except_speed": m_ref == m_ours,
                         "transformers_s": runs["transformers"]["system_seconds"].get(name),
                         "pruned_s": runs["pruned"]["system_seconds"].get(name)}
    t_ref, t_ours = runs["transformers"]["seconds"], runs["pruned"]["seconds"]
    print(f"{'system':18} {'n':>4} {'identical':>9} {'metrics =':>9} {'transformers s':>14} {'pruned s':>9}")
    for name, s in systems.items():
        print(f"{name:18} {s['n']:4d} {s['identical']:9d} {str(s['metrics_equal_except_speed']):>9} {s['transformers_s']:14.1f} "
              f"{s['pruned_s']:9.1f}")
    print(f"stage 06: transformers' generate {t_ref:.0f} s, pruned loop {t_ours:.0f} s: {t_ref / t_ours:.2f}x")
    path = save_result(a.name, {
        "command": "python benchmarks/bench_evaluate.py " + " ".join(sys.argv[1:]), "profile": a.profile,
        "overrides": overrides, "stage_seconds": {e: runs[e]["seconds"] for e in ENGINES},
        "speedup": round(t_ref / t_ours, 2), "systems": systems,
        "all_identical": all(s["identical"] == s["n"] for s in systems.values()),
    })
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
