"""CPU training speed of the cpu profile vs TRL's SFTConfig defaults (bf16 autocast + gradient checkpointing on).

    .venv/bin/python benchmarks/bench_train_cpu.py                       # ~4 min on 2 cores
    .venv/bin/python benchmarks/bench_train_cpu.py --batch 4 --steps 3 --ref-steps 1 --threads 0

Figures of past runs: benchmarks/README.md (stages 03/04).

Same model (embedded SmolLM2-135M, LoRA r16 on all 7 projections), same data (the Llama-track Alpaca rows of
the prepared sample, completion-only loss), same batch size and sequence length; only the SFTConfig settings
differ:

    ours          the cpu profile: fp32, no gradient checkpointing, adamw_torch
    trl-defaults  SFTConfig's own defaults for bf16 (on) and gradient_checkpointing (on), everything else as ours

Each variant runs in its own process (bf16 autocast and checkpointing hooks stay out of the other's way), drops
its first step (allocations, lazy init) and times the next ones between `on_step_begin` and `on_step_end`.
tokens/s counts the real (non-padding) tokens of the batches the steps consumed. Results go to
benchmarks/results/bench_train_cpu.json with the machine description. Under a shared, loaded machine expect
noise; CPU seconds per step (process time) are reported next to wall seconds for that reason.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prodtune.io import project_root

VARIANTS = ("ours", "trl-defaults")


def _data_dir() -> Path:
    """Stage 01 output of the cpu profile, made from the committed sample if it is not there."""
    d = project_root() / "data" / "cpu" / "prepared"
    if (d / "train.parquet").is_file():
        return d
    from prodtune import data

    tmp = Path(tempfile.mkdtemp(prefix="bench_prepared_"))
    data.run(data.Config(input=str(project_root() / "data" / "sample" / "trn_sample.jsonl"), out_dir=str(tmp), progress=False))
    return tmp


def run_one(variant: str, steps: int, threads: int | None, batch: int) -> dict:
    """Train `1 + steps` steps of one variant in this process and return its timings."""
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from prodtune import models as MD
    from prodtune import train as T

    if threads:
        torch.set_num_threads(threads)
    # the TrainConfig defaults are the cpu profile's Llama track in everything that sets the speed (fp32, no
    # gradient checkpointing, adamw_torch, max_seq_length 192); the batch is the benchmark's own
    tcfg = T.TrainConfig(data_dir=str(_data_dir()), out_dir="unused", max_steps=steps + 1, per_device_train_batch_size=batch,
                         eval_steps=None, save_steps=10**6, logging_steps=10**6, report_to=["none"], progress=False)
    df = T.load_track_split("llama", tcfg.data_dir, "train")
    model, tok, _ = MD.load_train_model(tcfg.base_model, max_seq_length=tcfg.max_seq_length, lora=tcfg.lora(), device="cpu")
    ds, _ = T.build_dataset("llama", df, tok, tcfg.max_seq_length)
    out = tempfile.mkdtemp(prefix=f"bench_{variant}_")
    if variant == "ours":
        trainer = T.make_trainer(tcfg, model, tok, ds, None, out)
    else:
        args = SFTConfig(  # bf16 and gradient_checkpointing are left at SFTConfig's defaults
            output_dir=out, max_length=tcfg.max_seq_length, per_device_train_batch_size=batch, learning_rate=tcfg.learning_rate,
            max_steps=steps + 1, seed=tcfg.seed, data_seed=tcfg.seed, use_cpu=True, report_to="none", disable_tqdm=True,
            save_strategy="no", logging_steps=10**6,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    collate = trainer.data_collator
    tokens: list[int] = []

    def counting_collator(rows):  # the real tokens of every batch, in the order the steps consume them
        batch_ = collate(rows)
        tokens.append(int(batch_["attention_mask"].sum()))
        return batch_

    trainer.data_collator = counting_collator

    class Timer(TrainerCallback):
        def __init__(self):
            self.wall, self.cpu = [], []

        def on_step_begin(self, args, state, control, **kw):
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            self.wall.append(time.perf_counter() - self.t0)
            self.cpu.append(time.process_time() - self.c0)

    timer = Timer()
    trainer.add_callback(timer)
    trainer.train()
    wall, cpu, tok_steps = timer.wall[1:], timer.cpu[1:], tokens[1 : 1 + steps]  # drop the warm-up step
    a = trainer.args
    return {
        "variant": variant, "bf16": bool(a.bf16), "gradient_checkpointing": bool(a.gradient_checkpointing),
        "optim": str(getattr(a.optim, "value", a.optim)), "batch": batch, "max_seq_length": tcfg.max_seq_length, "timed_steps": len(wall),
        "threads": torch.get_num_threads(),
        "s_per_step_median": round(statistics.median(wall), 3), "s_per_step": [round(x, 3) for x in wall],
        "cpu_s_per_step_median": round(statistics.median(cpu), 3),
        "steps_per_s": round(1 / statistics.median(wall), 4),
        "tokens_per_step": round(statistics.mean(tok_steps), 1),
        "tokens_per_s": round(sum(tok_steps) / sum(wall), 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps of ours (after 1 warm-up step)")
    p.add_argument("--ref-steps", type=int, default=1, help="timed steps of trl-defaults (~50 s each at batch 1)")
    p.add_argument("--batch", type=int, default=1, help="rows per step (the cpu profile trains at 4; 1 keeps the reference short)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on shared runners; 0: torch default)")
    p.add_argument("--one", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        steps = args.steps if args.one == "ours" else args.ref_steps
        print("RESULT " + json.dumps(run_one(args.one, steps, args.threads or None, args.batch)), flush=True)
        return

    from prodtune.bench import save_result

    results = {}
    for v in VARIANTS:
        cmd = [sys.executable, __file__, "--one", v, "--steps", str(args.steps), "--ref-steps", str(args.ref_steps),
               "--batch", str(args.batch), "--threads", str(args.threads)]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=project_root(), env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((x for x in res.stdout.splitlines() if x.startswith("RESULT ")), None)
        if res.returncode or line is None:
            sys.exit(f"{v} failed:\n{res.stderr[-3000:]}")
        results[v] = {**json.loads(line[7:]), "process_seconds": round(time.perf_counter() - t0, 1)}
        r = results[v]
        print(f"{v:13s} bf16={r['bf16']!s:5s} ckpt={r['gradient_checkpointing']!s:5s} {r['s_per_step_median']:7.2f} s/step "
              f"(cpu {r['cpu_s_per_step_median']:.2f} s)  {r['steps_per_s']:.3f} steps/s  {r['tokens_per_s']:7.1f} tokens/s",
              flush=True)
    speedup = results["trl-defaults"]["s_per_step_median"] / results["ours"]["s_per_step_median"]
    tok_speedup = results["ours"]["tokens_per_s"] / results["trl-defaults"]["tokens_per_s"]
    print(f"cpu profile vs TRL defaults: {speedup:.1f}x faster per step, {tok_speedup:.1f}x tokens/s")
    path = save_result("bench_train_cpu", {"model": "embedded:smollm2-135m-instruct", "data": "llama track, prepared sample",
                                           "variants": results, "speedup_s_per_step": round(speedup, 2),
                                           "speedup_tokens_per_s": round(tok_speedup, 2)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
