"""Stage 01 speed and memory on a file of the real size: ours vs the study's approach, in the same run.

    python benchmarks/bench_prepare.py                   # makes benchmarks/.cache/trn_synth_<lines>_v2.json (1.37 GB) once
    python benchmarks/bench_prepare.py --input trn.json  # or measure on the real dump
    python benchmarks/bench_prepare.py --repeat 3        # every approach 3 times in turns, medians

The synthetic file has the real dump's shape: 2,248,619 lines, ~1.37 GB, `uid`/`title`/`content`/`target_ind`/
`target_rel`, ~46% empty content, log-normal title and content lengths, HTML entities and tags in some rows,
duplicates (0.4% of lines repeat a recent row's uid, 0.4% its title and content under a new uid) and a few
malformed lines. Each approach runs in its own process; wall time (of the stage, imports excluded for both) and
that process's peak RSS are reported and saved to benchmarks/results/bench_prepare.json (dirty pages of the
previous run are flushed to disk before each run, untimed; numba's on-disk cache of the compiled parts is filled
first, untimed, as a machine's first run of stage 01 does). "ours" is what `prodtune prepare` does with no flags
(Parquet, snappy); then with the other compression choice (none or snappy), and with JSON lines too (`--jsonl`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prodtune.data import DataConfig

ROOT = Path(__file__).resolve().parents[1]
N_LINES = 2_248_619
WORDS = (
    "the a and with for of to in is this your it on are you that from by be as can our these will made high quality "
    "design easy use perfect size great set color black white steel cotton book story author new edition cover "
    "pack inches cm mm ml oz lbs kit men women kids gift home kitchen outdoor travel power battery usb wireless "
    "water bottle bag case phone screen light led lamp toy game music album guitar paper pen art craft tool garden"
).split()


def make_synthetic(path: Path, n_lines: int = N_LINES, seed: int = 0) -> None:
    """Write a trn.json-shaped file of `n_lines` lines (about 1.37 GB for the full count)."""
    rng = random.Random(seed)
    pool_words = [rng.choice(WORDS) for _ in range(400_000)]
    for i in range(0, len(pool_words), 23):
        pool_words[i] = pool_words[i].capitalize() + rng.choice([".", ",", "", "!", " -", ";", " (2 pack)"])
    pool = " ".join(pool_words)
    plen = len(pool)
    tmp = path.with_suffix(".tmp")
    recent: list[dict] = []  # rows that later lines duplicate
    with open(tmp, "w", encoding="utf-8") as f:
        for i in range(n_lines):
            tl = min(int(rng.lognormvariate(3.9, 0.45)), 400)
            t0 = rng.randrange(plen - 500)
            title = pool[t0 : t0 + tl].strip().title()
            if rng.random() < 0.46:
                content = ""
            else:
                cl = min(int(rng.lognormvariate(6.2, 0.85)), 12000)
                c0 = rng.randrange(plen - cl - 1)
                content = pool[c0 : c0 + cl].strip()
                r = rng.random()
                if r < 0.05:
                    content = "<p>" + content + "</p><br/>"
                elif r < 0.17:  # entities as scraped: &#8217; &amp; &quot; ...
                    cut = rng.randrange(len(content) + 1)
                    content = content[:cut] + rng.choice(["&#8217;s", " &amp; ", " &quot;new&quot; ", "&#8211;"]) + content[cut:]
                elif r < 0.22:
                    content = content.replace(" ", " caf\u00e9 ", 1)
            k = rng.randint(1, 12)
            ind = sorted(rng.sample(range(2_800_000), k))
            row = {"uid": f"{i:010d}", "title": title, "content": content, "target_ind": ind, "target_rel": [1.0] * k}
            d = rng.random()
            if recent and d < 0.004:  # the same product again (same uid)
                row = dict(rng.choice(recent))
            elif recent and d < 0.008:  # the same title and description under another uid
                prev = rng.choice(recent)
                row["title"], row["content"] = prev["title"], prev["content"]
            elif content and len(recent) < 5000:
                recent.append(row)
            elif content:
                recent[i % 5000] = row
            if i % 400_000 == 7:  # a few malformed lines, as in real scraped dumps
                f.write('{"uid": "broken", "title": "x", "content": \n')
                continue
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


REFERENCE = r'''
import json, re, resource, sys, time
t = time.perf_counter()
rows = []
with open(sys.argv[1], encoding="utf-8") as f:
    for line in f:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass
rows = [r for r in rows if r.get("title") and r.get("content")]
for r in rows:
    r["title"] = re.sub(r"[^A-Za-z0-9 ]+", "", r["title"])
    r["content"] = re.sub(r"[^A-Za-z0-9 ]+", "", r["content"])
print(json.dumps({"seconds": time.perf_counter() - t, "kept": len(rows),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''

OURS = r'''
import json, resource, sys, time
from prodtune.data import DataConfig, prepare
t = time.perf_counter()
stats = prepare(DataConfig(input=sys.argv[1], out_dir=sys.argv[2], write_jsonl=sys.argv[3] == "1",
                           parquet_compression=sys.argv[4]), progress=False)
print(json.dumps({"seconds": time.perf_counter() - t, "kept": stats["kept"], "rejected": stats["rejected"],
                  "filtered": stats["filtered"], "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
'''


WARM_UP = r'''
import json, time
t = time.perf_counter()
from prodtune import jsonscan, kernels
jsonscan.warm_up()
kernels.warm_up()
print(json.dumps({"seconds": time.perf_counter() - t}))
'''


def run(code: str, *args: str) -> dict:
    # the previous run's output is flushed to disk first (not timed), or its writeback slows this run
    os.sync()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", help="a real trn.json; default: make a synthetic one of the real size")
    ap.add_argument("--lines", type=int, default=N_LINES, help="lines of the synthetic file")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every approach this many times, in turns; report medians (the machine's speed drifts)")
    args = ap.parse_args()
    if args.input:
        path = Path(args.input)
    else:
        path = ROOT / "benchmarks" / ".cache" / f"trn_synth_{args.lines}_v2.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            t = time.perf_counter()
            print(f"writing synthetic {path} ...", flush=True)
            make_synthetic(path, args.lines)
            print(f"  done in {time.perf_counter() - t:.0f}s", flush=True)
    size_gb = path.stat().st_size / 1e9
    n_lines = sum(1 for _ in open(path, "rb"))
    print(f"input {path}: {n_lines:,} lines, {size_gb:.2f} GB", flush=True)
    results = {"input": str(path), "input_lines": n_lines, "input_gb": round(size_gb, 3)}
    # Stage 01's compiled parts are cached on disk by numba: a machine's first run compiles them, every later run
    # loads them (inside the timed stage). The first run is made here, untimed, and how long it took is reported.
    results["numba_first_load_seconds"] = run(WARM_UP)["seconds"]
    print(f"numba: compiled parts loaded (compiled if this is the machine's first run) in "
          f"{results['numba_first_load_seconds']:.1f} s, untimed", flush=True)
    defaults = DataConfig()
    default, jsonl = defaults.parquet_compression, "1" if defaults.write_jsonl else "0"
    other = "none" if default != "none" else "snappy"
    plan = {"ours": (OURS, jsonl, default), f"ours_parquet_{other}": (OURS, jsonl, other),
            "ours_with_jsonl" if jsonl == "0" else "ours_without_jsonl": (OURS, "1" if jsonl == "0" else "0", default)}
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            for key, (code, jsonl, comp) in plan.items():
                r = run(code, str(path), f"{tmp}/{key}", jsonl, comp)
                runs.setdefault(key, []).append(r)
                print(f"[{rep + 1}/{args.repeat}] {key} (Parquet {comp}{', + JSONL' if jsonl == '1' else ''}):", r,
                      flush=True)
        if not args.skip_reference:
            r = run(REFERENCE, str(path))
            runs.setdefault("reference", []).append(r)
            print(f"[{rep + 1}/{args.repeat}] reference (study):", r, flush=True)
    for key, rs in runs.items():  # medians; every run kept
        results[key] = dict(rs[-1], seconds=statistics.median(r["seconds"] for r in rs),
                            peak_rss_gib=max(r["peak_rss_gib"] for r in rs), seconds_runs=[r["seconds"] for r in rs])
    if "reference" in results:
        ref = results["reference"]
        for key in [k for k in results if k.startswith("ours")]:
            r = results[key]
            r["time_fraction_of_reference"] = round(r["seconds"] / ref["seconds"], 3)
            r["speedup"] = round(ref["seconds"] / r["seconds"], 2)
            # each repeat's ours over the reference run right after it (closest in the machine's conditions)
            r["time_fraction_per_repeat"] = [round(a / b, 3) for a, b in zip(r["seconds_runs"], ref["seconds_runs"])]
    from prodtune.bench import save_result

    print(f"\n{'approach (median of ' + str(args.repeat) + ')':<30}{'seconds':>9}{'of reference':>14}{'peak RSS GiB':>14}"
          f"{'kept':>12}")
    for key in ["reference"] + [k for k in results if k.startswith("ours")]:
        if key in results:
            r = results[key]
            frac = f"{r['time_fraction_of_reference']:.3f}" if "time_fraction_of_reference" in r else ""
            print(f"{key:<30}{r['seconds']:>9.2f}{frac:>14}{r['peak_rss_gib']:>14.2f}{r['kept']:>12,}")
    print("saved", save_result("bench_prepare", results))


if __name__ == "__main__":
    main()
