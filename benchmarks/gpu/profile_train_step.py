"""Where a QLoRA training step of the 8B shape spends its time, on a GPU: step-time trajectory, batch scaling
(fixed cost per step vs cost per token), with and without autocast, and a torch.profiler trace of a few steps.

    # on the lent GPU, after unpacking .gpu/site.tar.xz (see benchmarks/bench_train_gpu.py)
    python benchmarks/gpu/profile_train_step.py --work /dev/shm/pb --tokenizer $PWD/.gpu/tokenizer --out $OUT

One process per path (`ours` = prodtune.gpu.load_gpu_model(backend="auto"), `hf` = backend="bnb"). Writes
profile_<path>.json (figures) and trace_<path>.json.gz (Chrome trace of the profiled steps) under --out, and prints
the top kernels by GPU time and the GPU busy share of each profiled step (kernel time / wall time).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1] / "src"))

import bench_train_gpu as b  # noqa: E402


def steps(model, opt, batches, dtype, autocast: bool = True) -> list[float]:
    import contextlib

    import torch

    out = []
    for bt in batches:
        bt = {k: v.cuda(non_blocking=True) for k, v in bt.items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ctx = torch.autocast("cuda", dtype=dtype) if autocast else contextlib.nullcontext()
        with ctx:
            loss = model(**bt).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out.append(round(time.perf_counter() - t0, 4))
    return out


def busy_share(trace_path: Path) -> dict:
    """Per profiled step: wall time, summed GPU kernel time, and the GPU's busy share (union of kernel intervals)."""
    tr = json.loads(gzip.open(trace_path).read()) if trace_path.suffix == ".gz" else json.loads(trace_path.read_text())
    ev = tr.get("traceEvents", tr)
    kernels = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in ev
                     if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"))
    step_marks = sorted((e["ts"], e["ts"] + e["dur"]) for e in ev
                        if e.get("ph") == "X" and str(e.get("name", "")).startswith("ProfilerStep#"))
    res = []
    for s0, s1 in step_marks:
        ks = [(max(a, s0), min(c, s1)) for a, c in kernels if c > s0 and a < s1]
        union, cur0, cur1 = 0.0, None, None
        for a, c in ks:
            if cur1 is None or a > cur1:
                if cur1 is not None:
                    union += cur1 - cur0
                cur0, cur1 = a, c
            else:
                cur1 = max(cur1, c)
        if cur1 is not None:
            union += cur1 - cur0
        res.append({"wall_ms": round((s1 - s0) / 1e3, 1), "gpu_busy_ms": round(union / 1e3, 1),
                    "busy_share": round(union / max(s1 - s0, 1), 3), "kernels": len(ks)})
    return {"steps": res}


def worker(path: str, args: argparse.Namespace) -> dict:
    import torch

    from prodtune import gpu

    if path == "ours":
        gpu.preload_unsloth()
    import bitsandbytes as bnb

    backend = "auto" if path == "ours" else "bnb"
    model, tok, used = gpu.load_gpu_model(str(Path(args.work) / "llama-3-8b"), max_seq_length=args.seq, dtype="auto",
                                          lora=b.LORA, gradient_checkpointing=True, backend=backend)
    dtype = torch.bfloat16
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.AdamW8bit(params, lr=2e-4)
    res: dict = {"path": path, "backend_used": used, "device": torch.cuda.get_device_name(0),
                 "lora_param_dtypes": sorted({str(p.dtype) for p in params})}
    t0 = time.perf_counter()
    res["trajectory_2x1024"] = steps(model, opt, b.full_batches(args.trajectory, 2, args.seq, 1), dtype)
    b.log(f"{path} trajectory ({time.perf_counter() - t0:.0f}s): {res['trajectory_2x1024']}")
    if path == "ours":
        res["no_autocast_2x1024"] = steps(model, opt, b.full_batches(8, 2, args.seq, 2), dtype, autocast=False)
        b.log(f"{path} no autocast: {res['no_autocast_2x1024']}")
    for bs in (1, 4, 8):
        t = steps(model, opt, b.full_batches(6, bs, args.seq, 3 + bs), dtype)
        res[f"batch_{bs}x{args.seq}"] = t
        b.log(f"{path} batch {bs}: {t}")
    # profile: wait 1, warmup 1, active 3
    from torch.profiler import ProfilerActivity, profile, schedule

    batches = b.full_batches(5, 2, args.seq, 9)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=schedule(wait=1, warmup=1, active=3),
                 record_shapes=False) as prof:
        for bt in batches:
            steps(model, opt, [bt], dtype)
            prof.step()
    out = Path(args.out)
    trace = out / f"trace_{path}.json"
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(str(trace) + ".gz", "wb", compresslevel=6) as g:
        g.write(f.read())
    res["busy"] = busy_share(trace)
    trace.unlink()
    ka = prof.key_averages()
    table_gpu = ka.table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70)
    table_cpu = ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70)
    (out / f"tables_{path}.txt").write_text(table_gpu + "\n\n" + table_cpu)
    print(table_gpu[:6000], flush=True)
    b.log(f"{path} busy: {res['busy']}")
    res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/prodtune-bench")
    ap.add_argument("--tokenizer", default=".gpu/tokenizer")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--paths", default="ours,hf")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--trajectory", type=int, default=30)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.worker:
        res = worker(args.worker, args)
        (Path(args.out) / f"profile_{args.worker}.json").write_text(json.dumps(res, indent=2))
        return
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(HERE.parent)!r}); import bench_train_gpu as b; "
                    f"from pathlib import Path; b.prepare_models(Path({args.work!r}), Path({args.tokenizer!r}))"], check=True)
    for path in args.paths.split(","):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--worker", path])
        b.log(f"{path}: exit {r.returncode} after {time.perf_counter() - t0:.0f}s")
    for path in args.paths.split(","):
        f = Path(args.out) / f"profile_{path}.json"
        if f.is_file():
            d = json.loads(f.read_text())
            tr = d["trajectory_2x1024"][3:]
            print(path, "median 2x1024", statistics.median(tr), "min", min(tr),
                  {k: statistics.median(v[2:]) for k, v in d.items() if k.startswith(("batch_", "no_autocast"))},
                  [s["busy_share"] for s in d["busy"]["steps"]])


if __name__ == "__main__":
    main()
