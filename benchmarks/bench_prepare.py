"""Stage 01 speed and memory on a file of the real size, on a fresh machine: ours vs the study's approach, same run.

    python benchmarks/bench_prepare.py                   # makes benchmarks/.cache/trn_synth_<lines>_v2.json (1.37 GB) once
    python benchmarks/bench_prepare.py --input trn.json  # or measure on the real dump
    python benchmarks/bench_prepare.py --repeat 3        # every approach 3 times in turns, medians

The synthetic file has the real dump's shape: 2,248,619 lines, ~1.37 GB, `uid`/`title`/`content`/`target_ind`/
`target_rel`, ~46% empty content, log-normal title and content lengths, HTML entities and tags in some rows,
duplicates (0.4% of lines repeat a recent row's uid, 0.4% its title and content under a new uid) and a few
malformed lines.

What is timed (the headline, "cold"): the wall time of a fresh `python -c ...` process, from its start to its exit,
measured by this script: interpreter start, every import (`prodtune.data`, pyarrow, numpy, xxhash, orjson for ours;
json and re for the reference), the whole stage with its writes, and exit. Each run gets empty temporary
`PYTHONPYCACHEPREFIX` and `NUMBA_CACHE_DIR` folders, so no bytecode or compile cache of an earlier run helps (every
imported .py file is compiled from source: more than a fresh machine pays, whose packages come with their .pyc).
Untimed before each run: the input file is read once (in the page cache for both approaches, as the study's machine
had it) and the previous run's writes are flushed (`os.sync`). Peak RSS is the process's own `ru_maxrss`.
"ours" is `prodtune.data.run(Config(input=..., out_dir=..., progress=False))`, all other settings default (Parquet,
snappy). The results, with the machine's description, go to benchmarks/results/bench_prepare.json.
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


REFERENCE = r"""
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
print(json.dumps({"stage_seconds": time.perf_counter() - t, "kept": len(rows),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

OURS = r"""
import time
t = time.perf_counter()
import json, resource, sys
from prodtune.data import Config, run
t_run = time.perf_counter()
stats = run(Config(input=sys.argv[1], out_dir=sys.argv[2], progress=False, force=True))
print(json.dumps({"stage_seconds": time.perf_counter() - t_run, "import_seconds": t_run - t, "kept": stats["kept"],
                  "rejected": stats["rejected"], "filtered": stats["filtered"],
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def cold_run(code: str, path: Path, *args: str) -> dict:
    """One run in a fresh process with empty bytecode and numba caches; the input read once first (untimed)."""
    with open(path, "rb") as f:  # into the page cache
        while f.read(16 << 20):
            pass
    os.sync()  # the previous run's output goes to disk now, not during this run
    with tempfile.TemporaryDirectory() as pycache, tempfile.TemporaryDirectory() as numba_cache:
        env = dict(os.environ, PYTHONPYCACHEPREFIX=pycache, NUMBA_CACHE_DIR=numba_cache, HF_HUB_OFFLINE="1")
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", code, str(path), *args], capture_output=True, text=True, env=env,
                             cwd=ROOT)
        wall = time.perf_counter() - t
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return {"seconds": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


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
    results: dict = {"input": str(path), "input_lines": n_lines, "input_gb": round(size_gb, 3),
                     "timed": "wall of a fresh process (start, imports, stage, exit), empty PYTHONPYCACHEPREFIX and "
                              "NUMBA_CACHE_DIR, input in the page cache"}
    runs: dict[str, list[dict]] = {}
    for rep in range(args.repeat):
        with tempfile.TemporaryDirectory() as tmp:
            r = cold_run(OURS, path, f"{tmp}/ours")
        runs.setdefault("ours", []).append(r)
        print(f"[{rep + 1}/{args.repeat}] ours:", r, flush=True)
        if not args.skip_reference:
            r = cold_run(REFERENCE, path)
            runs.setdefault("reference", []).append(r)
            print(f"[{rep + 1}/{args.repeat}] reference (study):", r, flush=True)
    for key, rs in runs.items():  # medians; every run kept
        results[key] = dict(rs[-1], seconds=statistics.median(r["seconds"] for r in rs),
                            stage_seconds=statistics.median(r["stage_seconds"] for r in rs),
                            peak_rss_gib=max(r["peak_rss_gib"] for r in rs), seconds_runs=[r["seconds"] for r in rs])
    if "reference" in results:
        ours, ref = results["ours"], results["reference"]
        ours["time_fraction_of_reference"] = round(ours["seconds"] / ref["seconds"], 3)
        ours["speedup"] = round(ref["seconds"] / ours["seconds"], 2)
        # each repeat's ours over the reference run right after it (closest in the machine's conditions)
        ours["time_fraction_per_repeat"] = [round(a / b, 3) for a, b in zip(ours["seconds_runs"], ref["seconds_runs"])]
    from prodtune.bench import save_result

    print(f"\n{'cold run (median of ' + str(args.repeat) + ')':<28}{'seconds':>9}{'of reference':>14}{'peak RSS GiB':>14}"
          f"{'kept':>12}")
    for key in ("reference", "ours"):
        if key in results:
            r = results[key]
            frac = f"{r['time_fraction_of_reference']:.3f}" if "time_fraction_of_reference" in r else ""
            print(f"{key:<28}{r['seconds']:>9.2f}{frac:>14}{r['peak_rss_gib']:>14.2f}{r['kept']:>12,}")
    print("saved", save_result("bench_prepare", results))


if __name__ == "__main__":
    main()
