"""`prodtune export --to merged` on a GPU, for runs trained by each backend: train the Llama track a few steps with
unsloth and with transformers + bitsandbytes (separate processes), merge each run, reload the merged folder with
plain transformers and generate a few tokens.

    # on the lent GPU machine (`run` with carry [".gpu", ".device"]; see gpu_pipeline.py's docstring):
    mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 \
      PYTHONUNBUFFERED=1 && python3 benchmarks/bench_export_gpu.py
    # one 600 s call: both backends trained, each run merged with `--method stream` (8 GB cap) and reloaded; the bnb
    # run also with `--method load` and the two folders compared tensor by tensor (~8 min with the stand-ins' build):
    ... && PRODTUNE_COMMIT=<commit> python3 benchmarks/bench_export_gpu.py --methods stream,load --load-backends bnb
    # on a CPU (tiny random stand-ins, the cpu backend), to debug the flow:
    .venv/bin/python benchmarks/bench_export_gpu.py --cpu-debug

Per backend, each step its own process (`gpu_pipeline.run_child`: seconds, exit code, peak memory three ways):
`prodtune train --track llama` on the Llama-3-8B stand-in (a pre-quantised nf4 checkpoint like the profiles'
`unsloth/llama-3-8b-bnb-4bit`, so the merge dequantises it first) with `train.backend` set, `prodtune export --run
DIR --to merged` (`prodtune.export.merge_run`, not train's `merge_16bit`), then `AutoModelForCausalLM.from_pretrained`
of the merged folder and a greedy `generate` of a few tokens from an Alpaca prompt. Sizes: the adapter and the merged
folder in MB. Results: `benchmarks/results/bench_export_gpu.json` (copied to `$OUT` when set). The merged folder
(~15 GiB in bf16) is deleted after its reload unless `--keep-merged`: two would not fit the lent machine's disk
beside the stand-ins.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_pipeline as GP  # noqa: E402 - the stand-ins, the measured child and the stage overrides

ROOT = GP.ROOT
MIB = 2**20


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / MIB, 1)


def commit() -> str | None:
    """The commit measured: `$PRODTUNE_COMMIT` when set, else `git rev-parse`. Pass it on the lent machine: the .git
    there named d326fad while the working tree sent with the call was da77289's (seen 2026-12-07)."""
    if os.environ.get("PRODTUNE_COMMIT"):
        return os.environ["PRODTUNE_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def room_for(merged: Path, margin: int = 2 * 2**30) -> bool:
    """Whether the disk holds a second merged folder of `merged`'s size (the next method's) beside it."""
    size = size_mb(merged) * MIB
    return shutil.disk_usage(merged).free >= size + margin


def reload_child(out_path: str, merged: str) -> int:
    """Load the merged folder with plain transformers (no unsloth, no peft) and generate greedily: the export works."""

    def work(rec: dict[str, Any]) -> int:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from prodtune import prompts as P

        cuda = torch.cuda.is_available()
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(merged)
        model = AutoModelForCausalLM.from_pretrained(merged, dtype="auto", device_map={"": 0} if cuda else None)
        model.eval()
        rec["load_s"] = round(time.perf_counter() - t0, 2)
        rec["dtype"] = str(model.dtype).replace("torch.", "")
        enc = tok([P.alpaca_prompt("Stainless Steel Water Bottle, 750 ml")], return_tensors="pt").to(model.device)
        t1 = time.perf_counter()
        with torch.inference_mode():
            logits = model(**enc).logits
            out = model.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
        new = out[0, enc["input_ids"].shape[1]:]
        rec["result"] = {"generate_s": round(time.perf_counter() - t1, 2), "new_tokens": int(new.numel()),
                         "text": tok.decode(new, skip_special_tokens=True), "logits_finite": bool(torch.isfinite(logits).all()),
                         "load_s": rec["load_s"], "dtype": rec["dtype"], "params": sum(p.numel() for p in model.parameters())}
        return 0 if rec["result"]["logits_finite"] and rec["result"]["new_tokens"] > 0 else 1

    return GP.measured(out_path, work)


def compare_child(out_path: str, a: str, b: str) -> int:
    """Tensor by tensor, the two merged folders (`--method stream` vs `--method load`): names, shapes, differences."""

    def work(rec: dict[str, Any]) -> int:
        from safetensors import safe_open

        def tensors(folder: str) -> dict[str, Any]:
            return {k: f for f in (safe_open(str(p), "pt") for p in sorted(Path(folder).glob("*.safetensors"))) for k in f.keys()}

        ta, tb = tensors(a), tensors(b)
        n_el = equal = 0
        max_abs = sum_abs = 0.0
        worst = None
        for k in sorted(set(ta) & set(tb)):
            x, y = ta[k].get_tensor(k).float(), tb[k].get_tensor(k).float()
            if x.shape != y.shape:
                rec["result"] = {"shape_mismatch": k}
                return 1
            d = (x - y).abs()
            n_el += d.numel()
            equal += int((d == 0).sum())
            sum_abs += float(d.sum())
            if float(d.max()) > max_abs:
                max_abs, worst = float(d.max()), k
        rec["result"] = {"tensors": len(ta), "same_names": set(ta) == set(tb), "max_abs_diff": max_abs, "worst": worst,
                         "mean_abs_diff": sum_abs / max(n_el, 1), "equal_fraction": round(equal / max(n_el, 1), 6)}
        return 0 if set(ta) == set(tb) else 1

    return GP.measured(out_path, work)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default=None, help="comma list: unsloth,bnb (default); --cpu-debug: cpu")
    ap.add_argument("--profile", default="colab-t4", help="the training profile (its batch, dtype, 4-bit, optimizer)")
    ap.add_argument("--cpu-debug", action="store_true", help="tiny random stand-ins on the CPU: the same flow")
    ap.add_argument("--work", default=None, help="stand-ins and runs (default: gpu_pipeline's, so its stand-ins are reused)")
    ap.add_argument("--tokenizer", default=str(ROOT / ".gpu/tokenizer"))
    ap.add_argument("--minilm", default=str(ROOT / ".gpu/minilm"))
    ap.add_argument("--data", default=str(ROOT / ".device/amazontitles_sample.jsonl"))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps of each training run")
    ap.add_argument("--keep-merged", action="store_true", help="keep each merged folder (15 GiB each in bf16)")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds (default 560; --cpu-debug 3600)")
    ap.add_argument("--results-dir", default=None, help="default benchmarks/results (--cpu-debug: benchmarks/.cache, git-ignored)")
    ap.add_argument("--mirror", default=os.environ.get("OUT"), help="also copy the results and log here (default $OUT)")
    ap.add_argument("--methods", default="stream,load",
                    help="export methods, in order: stream (under --export-cap-gb) then load; see --load-backends")
    ap.add_argument("--load-backends", default=None,
                    help="comma list: the backends also exported with `load` when --methods has it (default: every "
                         "backend); the last of them compares stream with load")
    ap.add_argument("--export-cap-gb", type=float, default=8.0,
                    help="GPU memory cap of the stream export (8: an RTX 4060; 0: none)")
    if sys.argv[1:2] == ["--reload-child"]:  # `--reload-child OUT.json MERGED_DIR`
        return reload_child(sys.argv[2], sys.argv[3])
    if sys.argv[1:2] == ["--compare-child"]:  # `--compare-child OUT.json DIR_A DIR_B`
        return compare_child(sys.argv[2], sys.argv[3], sys.argv[4])
    args = ap.parse_args()
    backends = (args.backends or ("cpu" if args.cpu_debug else "unsloth,bnb")).split(",")
    load_backends = args.load_backends.split(",") if args.load_backends else backends
    compare_backend = next((b for b in reversed(backends) if b in load_backends), None)
    budget = args.time_budget or (3600 if args.cpu_debug else 560)
    work = Path(args.work or ("/tmp/gpu_pipeline_cpu" if args.cpu_debug else "/tmp/gpu_pipeline"))
    t_start = time.perf_counter()
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = "bench_export_gpu_cpu_debug" if args.cpu_debug else "bench_export_gpu"
    results = GP.Results(GP.results_dir(args) / f"{name}.json", Path(args.mirror) if args.mirror else None,
                         logs / f"{name}.log")
    results.log_path.unlink(missing_ok=True)
    nvml = GP.NvmlSampler()
    env = {**os.environ, **GP.CHILD_ENV,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}

    built = work / "standins.out.json"
    cmd = [sys.executable, str(Path(GP.__file__).resolve()), "--build-standins", str(built), "--work", str(work),
           "--tokenizer", args.tokenizer, "--minilm", args.minilm] + (["--cpu-debug"] if args.cpu_debug else [])
    try:
        proc = subprocess.run(cmd, env=env, cwd=ROOT, timeout=max(60.0, budget - 60))
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, returncode=-9)
    if proc.returncode != 0:
        GP.log(f"building the stand-ins failed (exit {proc.returncode})")
        return 1
    standins = json.loads(built.read_text())
    home = work / "home" / "export"
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    env["PRODTUNE_HOME"] = str(home)
    plan = GP.plan(standins["folders"], str(Path(args.data).resolve()), cpu_debug=args.cpu_debug, rows=300,
                   steps=args.steps, n_test=8)
    entry: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "commit": commit(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "mode": "cpu-debug" if args.cpu_debug else "gpu", "profile": args.profile, "versions": GP.versions(),
        "base_model": standins["folders"]["llama"], "standins_reused": standins["reused"], "steps": args.steps,
        "device": nvml.name, "import_failures": standins.get("import_failures"), "prepare": None, "backends": {},
    }
    key = "cpu-debug" if args.cpu_debug else "gpu"

    def child(label: str, cmd: list[str]) -> dict:
        return child_env(label, cmd, env)

    def child_env(label: str, cmd: list[str], env: dict[str, str]) -> dict:
        left = budget - (time.perf_counter() - t_start)
        if left < 20:
            GP.log(f"{label}: skipped (time budget)")
            return {"stage": label, "skipped": "time budget", "finished": False}
        GP.log(f"{label}: started")
        res = GP.run_child(label, cmd, env, logs, left, nvml, tag="export-", combined=results.log_path)
        entry["device"] = entry["device"] or res.get("device")
        GP.log(f"{label}: {'finished' if res['finished'] else 'FAILED'} in {res['seconds']}s, peak reserved "
               f"{res.get('peak_reserved_gib')} GiB, device used {res.get('device_used_peak_gib')} GiB, rss {res.get('peak_rss_gib')}")
        if not res["finished"]:
            print("\n".join("    " + line for line in res.get("log_tail", [])[-12:]), flush=True)
        return res

    prep = plan["01_prepare"]
    entry["prepare"] = child("prepare", GP.prodtune_child([*prep["args"], "--profile", args.profile,
                                                           *[x for s in prep["sets"] for x in ("--set", s)]]))
    results.save(key, entry)
    for backend in backends:
        run_dir = home / "runs" / f"llama-{backend}"
        sets = plan["03_train_llama"]["sets"] + [f"train.backend={backend}", f"train.llama.out_dir={run_dir}",
                                                  "train.llama.report_to=[none]"]
        rec: dict[str, Any] = {"run_dir": str(run_dir), "overrides": sets}
        entry["backends"][backend] = rec
        rec["train"] = child(f"train-{backend}", GP.prodtune_child(
            ["train", "--track", "llama", "--profile", args.profile, *[x for s in sets for x in ("--set", s)]]))
        results.save(key, entry)
        if not rec["train"].get("finished"):
            continue
        rec["adapter_mb"] = size_mb(run_dir / "adapter_model.safetensors") if (run_dir / "adapter_model.safetensors").is_file() else None
        methods = [m for m in args.methods.split(",") if m != "load" or backend in load_backends]
        merged = run_dir / "export" / "merged"
        kept: dict[str, Path] = {}
        compare = len(methods) > 1 and backend == compare_backend
        for method in methods:
            cap = args.export_cap_gb if method == "stream" and not args.cpu_debug else 0
            env_cap = {**env, "GPU_PIPELINE_CAP_BYTES": str(int(cap * 1e9)) if cap else ""}
            label = f"export-{method}-{backend}"
            res = child_env(label, GP.prodtune_child(["export", "--run", str(run_dir), "--to", "merged", "--method", method]),
                            env_cap)
            res["cap_gb"] = cap or None
            rec[f"export_{method}"] = res
            if res.get("finished") and merged.is_dir():
                rec[f"merged_mb_{method}"] = size_mb(merged)
                rec["merged_files"] = sorted(p.name for p in merged.iterdir())
                rec[f"reload_{method}"] = child(f"reload-{method}-{backend}", [
                    sys.executable, str(Path(__file__).resolve()), "--reload-child", "{out}", str(merged)])
                if compare and method != methods[-1] and not room_for(merged):  # the next method's folder beside it
                    rec["compare_skipped"] = f"disk: {shutil.disk_usage(merged).free / 2**30:.1f} GiB free"
                    GP.log(f"{backend}: no room to keep {merged.name} beside the next export; no comparison")
                    compare = False
                    for d in kept.values():
                        shutil.rmtree(d, ignore_errors=True)
                    kept.clear()
                if compare:
                    kept[method] = merged.rename(merged.with_name(f"merged-{method}"))
                elif not args.keep_merged:
                    shutil.rmtree(merged, ignore_errors=True)
            results.save(key, entry)
        if len(kept) == 2:
            a, b = kept.values()
            rec["compare"] = child(f"compare-{backend}", [sys.executable, str(Path(__file__).resolve()), "--compare-child",
                                                          "{out}", str(a), str(b)])
        if not args.keep_merged:
            for d in kept.values():
                shutil.rmtree(d, ignore_errors=True)
        # the first method is the one `prodtune export` uses by default (auto: stream where it can)
        rec["export"], rec["reload"] = rec.get(f"export_{methods[0]}"), rec.get(f"reload_{methods[0]}")
        rec["merged_mb"] = rec.get(f"merged_mb_{methods[0]}")
        rec["finished"] = all((rec.get(k) or {}).get("finished") for k in
                              ["train", *[f"{w}_{m}" for m in methods for w in ("export", "reload")],
                               *(["compare"] if "compare" in rec or len(kept) == 2 else [])])
        results.save(key, entry)
    entry["all_finished"] = bool(entry["backends"]) and all(r.get("finished") for r in entry["backends"].values())
    entry["seconds_total"] = round(time.perf_counter() - t_start, 1)
    results.save(key, entry)
    print("    backend  method  export s  reserved GiB  merged MB  reload s  ok")
    for backend, r in entry["backends"].items():
        t = r.get("train") or {}
        print(f"    {backend:<8} train   {t.get('seconds')} s, reserved {t.get('peak_reserved_gib')} GiB, "
              f"{'ok' if t.get('finished') else 'FAIL'}; adapter {r.get('adapter_mb')} MB")
        for m in args.methods.split(","):
            e, rl = r.get(f"export_{m}"), r.get(f"reload_{m}") or {}
            if isinstance(e, dict):
                print(f"    {backend:<8} {m:<7} {e.get('seconds')}  {e.get('peak_reserved_gib')}  {r.get(f'merged_mb_{m}')}  "
                      f"{rl.get('seconds')}  {bool(e.get('finished') and rl.get('finished'))}")
        if isinstance(r.get("compare"), dict):
            print(f"    {backend:<8} stream vs load: {r['compare'].get('figures')}")
    GP.log(f"{'all finished' if entry['all_finished'] else 'NOT all finished'}; wrote {results.path}")
    return 0 if entry["all_finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
