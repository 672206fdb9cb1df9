"""Data-parallel training speed: tokens/s of `prodtune train` on 1 GPU vs N GPUs (DDP), Llama-3-8B shape, 4-bit.

    # on a machine with 2+ CUDA GPUs, from the repo root (the lent GPUs: unpack .gpu/site.tar.xz first, see
    # benchmarks/bench_train_gpu.py and /work/shared/gpu/README.md)
    python benchmarks/bench_train_ddp.py --tokenizer .gpu/tokenizer --gpus 1,2 --paths hf,ours

What runs is the real command a user runs, once per (path, GPU count):

    prodtune train --track llama --profile h100 --num_gpus N --backend bnb|auto ...

i.e. accelerate launch with configs/accelerate/ddp.yaml, TRL's SFTTrainer, our run card. Every GPU gets the
same per-device batch (2 x 1024 tokens by default: rows long enough that each is cut to exactly max_seq_length), so
N GPUs do N times the work per optimizer step; tokens/s = non-padding tokens of all processes per step / median
step time (CUDA-synchronised step times from the run card, the first `--warmup` steps dropped). The model is a
random-weight Llama-3-8B quantised to nf4 (bench_train_gpu.prepare_models): speed does not depend on the weights.

Paths: `hf` = transformers + peft + bitsandbytes (backend bnb), `ours` = the default (unsloth when it imports).
Figures go to benchmarks/results/bench_train_ddp.json with the device name.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).parent))

PATHS = {"hf": "bnb", "ours": "auto"}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def make_data(dest: Path, rows: int, seed: int = 0) -> Path:
    """A stage-01-shaped train.parquet whose rows are all longer than any max_seq_length used here."""
    import pandas as pd

    rng = random.Random(seed)
    words = ("steel bottle insulated cotton blanket wireless charger garden hose kitchen knife leather wallet "
             "yoga mat led lamp travel bag phone case board game paperback novel water filter camping tent").split()
    recs = []
    for i in range(rows):
        title = " ".join(rng.choice(words) for _ in range(12)).title()
        content = " ".join(rng.choice(words) for _ in range(2600))  # ~3,000 Llama-3 tokens: always cut to fit
        recs.append({"uid": f"B{i:09d}", "title": title, "content": content})
    dest.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(recs).to_parquet(dest / "train.parquet")
    return dest


def run_one(path: str, n_gpus: int, model_dir: str, data: Path, out: Path, args: argparse.Namespace) -> dict:
    flags = {
        "base_model": model_dir, "backend": PATHS[path], "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": args.accum, "max_seq_length": args.seq, "max_steps": args.steps,
        "eval_on_start": "false", "save_steps": 100000, "logging_steps": 1, "report_to": "none",
        "max_train_rows": args.steps * args.batch * args.accum * n_gpus, "data_dir": data, "out_dir": out,
        "force": "true", "num_gpus": n_gpus,
    }
    sets = ["train.eval_steps=null"]  # no validation: only training steps are timed
    if args.ddp_grad_dtype != "profile":
        sets.append(f"train.ddp_grad_dtype={args.ddp_grad_dtype}")
    cmd = [sys.executable, "-m", "prodtune", "train", "--track", "llama", "--profile", args.profile]
    for k, v in flags.items():
        cmd += [f"--{k}", str(v)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    try:
        # exactly n GPUs visible: with more, a 1-process run would split batches over all of them (DataParallel)
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in range(n_gpus))}
        if args.nccl_debug and n_gpus > 1:
            env.update(NCCL_DEBUG="INFO", NCCL_DEBUG_SUBSYS="INIT")  # transports chosen (P2P/NVLink, SHM, ...)
        proc = subprocess.run(cmd, cwd=ROOT, timeout=args.timeout_s, env=env)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        rc = -9
    wall = round(time.perf_counter() - t0, 1)
    card_path = out / "run_card.json"
    if rc != 0 or not card_path.is_file():
        return {"error": f"exit {rc}", "wall_s": wall}
    from prodtune.train import step_summary

    card = json.loads(card_path.read_text())
    summary = step_summary(card["step_seconds"], card["tokens_seen"], card["steps"], warmup=args.warmup)
    return {
        "gpus": n_gpus, "processes": card["processes"], "backend": card["backend"], "steps": card["steps"],
        "global_batch_rows": card["global_batch_size"], "tokens_per_step": round(card["tokens_seen"] / max(1, card["steps"]), 1),
        "s_per_step_median": summary["median_step_seconds"],
        "s_per_step_mean": round(statistics.mean(card["step_seconds"][args.warmup:]), 4),
        "tokens_per_s": summary["tokens_per_second"], "step_seconds": card["step_seconds"], "warmup_steps": args.warmup,
        "peak_memory_gb_rank0": card["peak_memory_gb"], "device": card["device"], "wall_s": wall,
        "loss_first_last": [card["train_loss"][0]["loss"], card["train_loss"][-1]["loss"]] if card["train_loss"] else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/prodtune-bench", help="random models, data and runs (about 6 GiB)")
    ap.add_argument("--tokenizer", default=".gpu/tokenizer", help="a Llama-3 tokenizer folder (tokenizer.json)")
    ap.add_argument("--paths", default="hf,ours", help=f"comma list of {list(PATHS)}")
    ap.add_argument("--gpus", default="1,2", help="GPU counts to compare, e.g. 1,2")
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--batch", type=int, default=2, help="rows per GPU per step")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--accum", type=int, default=1, help="gradient accumulation steps")
    ap.add_argument("--ddp-grad-dtype", default="profile", help="bf16 | fp16 | null | profile (the profile's)")
    ap.add_argument("--nccl-debug", action="store_true", help="NCCL_DEBUG=INFO in the multi-GPU runs")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    ap.add_argument("--timeout-s", type=float, default=300, help="per run")
    ap.add_argument("--budget-s", type=float, default=520, help="runs that would start after this are skipped")
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks/results"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    import torch

    n_have = torch.cuda.device_count()
    gpus = [g for g in (int(x) for x in args.gpus.split(",")) if g <= n_have]
    log(f"{n_have} CUDA device(s): {torch.cuda.get_device_name(0) if n_have else '-'}; measuring GPU counts {gpus}")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import bench_train_gpu as b; from pathlib import Path; "
                    f"b.prepare_models(Path({str(work)!r}), Path({str(Path(args.tokenizer).resolve())!r}))"],
                   check=True, cwd=Path(__file__).parent)
    prepare_s = round(time.perf_counter() - t0, 1)
    data = make_data(work / "ddp_data", args.steps * args.batch * args.accum * max(gpus))
    log(f"models and data ready in {prepare_s}s")
    results: dict = {}
    for path in args.paths.split(","):
        for n in gpus:
            elapsed = time.perf_counter() - t_start
            if elapsed > args.budget_s:
                log(f"skipping {path} x{n}: {elapsed:.0f}s spent, budget {args.budget_s}s")
                continue
            r = run_one(path, n, str(work / "llama-3-8b"), data, work / "runs" / f"{path}-{n}", args)
            results.setdefault(path, {})[str(n)] = r
            log(f"{path} on {n} GPU(s): {r.get('s_per_step_median')} s/step, {r.get('tokens_per_s')} tok/s "
                f"({r.get('error', 'ok')}, {r['wall_s']}s)")
    summary = {}
    for path, per in results.items():
        one = per.get("1", {}).get("tokens_per_s")
        for n, r in per.items():
            if n != "1" and one and r.get("tokens_per_s"):
                summary[f"{path}_{n}gpu_vs_1gpu_tokens_per_s"] = round(r["tokens_per_s"] / one, 2)
    print(f"\n{'path':<6}{'GPUs':>5}{'s/step':>9}{'tok/s':>10}{'peak GB':>9}")
    for path, per in results.items():
        for n, r in per.items():
            if "error" in r:
                print(f"{path:<6}{n:>5}  {r['error']}")
            else:
                print(f"{path:<6}{n:>5}{r['s_per_step_median']:>9.3f}{r['tokens_per_s']:>10.0f}{r['peak_memory_gb_rank0']:>9.2f}")
    print(json.dumps(summary, indent=2))
    from bench_train_gpu import versions
    from prodtune.bench import save_result

    p = save_result("bench_train_ddp", {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "gpus_present": n_have,
        "gpu_name": torch.cuda.get_device_name(0) if n_have else None, "versions": versions(), "prepare_s": prepare_s,
        "settings": {"profile": args.profile, "batch_per_gpu": args.batch, "accum": args.accum, "seq": args.seq,
                     "steps": args.steps, "ddp_grad_dtype": args.ddp_grad_dtype,
                     "warmup": args.warmup, "launcher": "prodtune train --num_gpus N (accelerate, configs/accelerate/ddp.yaml)"},
        "summary": summary, "results": results}, args.results_dir)
    log(f"saved {p}")


if __name__ == "__main__":
    main()
