"""Stage 02 throughput against an OpenAI-compatible server with a fixed per-request latency: sequential vs concurrent.

    .venv/bin/python benchmarks/bench_cot.py                       # 128 products, 0.2 s per request
    .venv/bin/python benchmarks/bench_cot.py --n 64 --latency-s 0.1 --concurrency 1 4 16

The server is tests/fakeopenai.py in its own process (so its threads do not share our GIL), answering every
request after `--latency-s`, like a hosted API whose time is spent on its side. Measured in one run:

* reference: the study's loop, one blocking `httpx.Client` request per product, parse, next;
* prodtune at each concurrency (`prodtune.cot.run`, openai backend: the `openai` client's AsyncOpenAI with its
  retries, then validation, gates and writes).

Rows/s are products finished per second of wall time of the whole stage (including reading the splits and
writing the dataset). Done when prodtune at concurrency 16 is >= 12x the sequential rate. The template
backend's rate over the same products is printed too. Results: benchmarks/results/bench_cot.json; figures in
benchmarks/README.md ("Stage 02").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def start_server(latency_s: float) -> tuple[subprocess.Popen, str]:
    """Start tests/fakeopenai.py in a subprocess; return it and its base URL."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fakeopenai.py"), "--latency-s", str(latency_s)],
                            stdout=subprocess.PIPE, text=True)
    url = proc.stdout.readline().strip()
    if not url.startswith("http"):
        proc.kill()
        raise RuntimeError(f"fake server did not start: {url!r}")
    return proc, url


def reference_sequential(items: list, url: str, model: str) -> float:
    """The study's loop: one request at a time with a blocking client; returns seconds."""
    import httpx

    from prodtune import prompts
    from prodtune.cot import parse_answer

    t0 = time.perf_counter()
    with httpx.Client(timeout=60) as client:
        for it in items:
            r = client.post(f"{url}/chat/completions", json={
                "model": model, "messages": prompts.cot_messages(it.title, it.content, it.style), "temperature": 0.7})
            ans, _, _ = parse_answer(r.json()["choices"][0]["message"]["content"])
            assert ans is not None
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=128, help="products per measurement")
    ap.add_argument("--latency-s", type=float, default=0.2, help="server-side delay of every request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    args = ap.parse_args()

    from prodtune import data
    from prodtune.bench import save_result
    from prodtune.cot import CoTConfig, load_products, run

    tmp = Path(tempfile.mkdtemp(prefix="bench_cot_"))
    prepared = tmp / "prepared"
    data.run(data.Config(input=str(ROOT / "data" / "sample" / "trn_sample.jsonl"), out_dir=str(prepared), progress=False))
    items = load_products(prepared)[: args.n]
    os.environ.setdefault("BENCH_COT_KEY", "sk-bench-not-a-real-key")
    proc, url = start_server(args.latency_s)
    runs = []
    try:
        ref_s = reference_sequential(items, url, "fake-model")
        ref = len(items) / ref_s
        print(f"reference sequential loop : {ref:7.2f} rows/s  ({len(items)} products in {ref_s:.2f}s)")
        for c in args.concurrency:
            cfg = CoTConfig(backend="openai", base_url=url, model="fake-model", api_key_env="BENCH_COT_KEY", n=args.n,
                            concurrency=c, overwrite=True, data_dir=str(prepared), out_dir=str(tmp / f"c{c}"), progress=False)
            t0 = time.perf_counter()
            stats = run(cfg)
            wall = time.perf_counter() - t0
            assert stats["complete"] and stats["rows"] + stats["rejected"] == args.n, stats
            runs.append({"concurrency": c, "seconds": round(wall, 3), "rows_per_s": round(args.n / wall, 2), "rows": stats["rows"]})
            print(f"prodtune concurrency {c:3d}  : {args.n / wall:7.2f} rows/s  ({wall:.2f}s)")
    finally:
        proc.kill()
        proc.wait()
    seq = next((r["rows_per_s"] for r in runs if r["concurrency"] == 1), ref)
    for r in runs:
        r["speedup_vs_sequential"] = round(r["rows_per_s"] / seq, 2)
        r["speedup_vs_reference"] = round(r["rows_per_s"] / ref, 2)
    t0 = time.perf_counter()
    tstats = run(CoTConfig(n=args.n, data_dir=str(prepared), out_dir=str(tmp / "template"), progress=False))
    template_rps = round(args.n / (time.perf_counter() - t0), 1)
    print(f"template backend          : {template_rps:7.1f} rows/s ({tstats['rows']} rows, no model)")
    best = max(runs, key=lambda r: r["concurrency"])
    print(f"speedup at concurrency {best['concurrency']}: {best['speedup_vs_sequential']}x vs prodtune sequential, "
          f"{best['speedup_vs_reference']}x vs the reference loop (target >= 12x at 16)")
    path = save_result("bench_cot", {
        "n": args.n, "latency_s": args.latency_s, "reference_sequential_rows_per_s": round(ref, 2),
        "runs": runs, "template_rows_per_s": template_rps,
        "command": "python benchmarks/bench_cot.py " + " ".join(sys.argv[1:]),
    })
    print(f"saved {path}")
    print(json.dumps(runs))


if __name__ == "__main__":
    main()
