"""Stages 03/04: `run(cfg)` trains one track and writes the adapter, run card, loss history and plots.

    prodtune train --track llama --profile cpu                  # data/cpu/prepared -> models/cpu/llama
    prodtune train --track deepseek --profile cpu --max_steps 5 # data/cpu/cot      -> models/cpu/deepseek
    prodtune train --track llama --profile h100 --num_gpus 2    # DDP: one process per GPU

A finished run with the same settings and data is not redone. An interrupted run resumes from its last
checkpoint; checkpoints made with other settings (or with `resume: false`) are moved to
`checkpoints.stale-<YYYYmmdd-HHMMSS>/`, never deleted.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

from prodtune import distributed as D
from prodtune import models as MD  # (prodtune/__init__ sets OMP_WAIT_POLICY before torch is imported)
from prodtune import prompts as P
from prodtune.config import describe
from prodtune.gpu import free_memory
from prodtune.io import log, read_json, write_json
from prodtune.train import card as C
from prodtune.train.config import TrainConfig, fingerprint
from prodtune.train.dataset import build_dataset, data_hash, load_track_split, neighbour_contexts, token_count
from prodtune.train.trainer import (TrainingInterrupted, launch_ddp, make_trainer, resume_hint, save_on_interrupt,
                                    sigint_saves)


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest `checkpoint-N` folder (transformers' `get_last_checkpoint`), or None."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    return Path(found) if found else None


def set_aside(path: Path, why: str) -> Path:
    """Move `path` to `<path>.stale-<YYYYmmdd-HHMMSS>` beside it (never deleted) and log one line saying where."""
    dest = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
    n = 1
    while dest.exists():
        dest = path.with_name(f"{path.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}-{n}")
        n += 1
    os.replace(path, dest)
    log.warning("%s: %s; moved to %s", path, why, dest)
    return dest


def find_resume_point(ckpt_dir: Path, resume_key: str, resume: bool) -> Path | None:
    """The checkpoint to continue from, or None; checkpoints that may not be resumed are set aside (rank 0 only).

    A checkpoint may be resumed when `resume` is on and it was made with the same resume key (same data and
    the settings that shape training). The newest checkpoint is resumed only when complete (a kill while saving
    leaves one without `trainer_state.json`): an incomplete one is set aside and the one before it is used.
    """
    main = D.is_main()
    ckpt = last_checkpoint(ckpt_dir)
    if ckpt is None:
        return None
    key_file = ckpt_dir / "resume_key.json"
    same = key_file.is_file() and read_json(key_file).get("resume_key") == resume_key
    if not (resume and same):
        if main:
            set_aside(ckpt_dir, "resume is off" if not resume else "its checkpoints were made with other settings or data")
        return None
    if not (ckpt / "trainer_state.json").is_file():  # killed while saving: use the newest complete one
        complete = [c for c in ckpt_dir.glob("checkpoint-*") if (c / "trainer_state.json").is_file()]
        if main:
            stale = ckpt_dir.with_name(f"{ckpt_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            stale.mkdir(exist_ok=True)
            os.replace(ckpt, stale / ckpt.name)
            log.warning("%s: incomplete (no trainer_state.json); moved to %s", ckpt, stale / ckpt.name)
        ckpt = max(complete, key=lambda c: int(c.name.rsplit("-", 1)[-1]), default=None)
    return ckpt


def _device(cfg: TrainConfig) -> bool:
    """Check the device asked for, preload unsloth where it will be used, set threads; True when training on CUDA."""
    if cfg.device == "cuda":
        from prodtune.gpu import require_cuda

        require_cuda(f"train.device=cuda ({cfg.track} track)")
    if cfg.backend in ("auto", "unsloth") and cfg.device != "cpu":
        from prodtune.gpu import preload_unsloth

        preload_unsloth()  # (CUDA only) unsloth must patch transformers before the imports below
    import torch

    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    on_cuda = cfg.backend != "cpu" and (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()))
    if on_cuda:
        if D.world_size() == 1 and torch.cuda.device_count() > 1:
            log.info("train %s: %d GPUs visible in one process: the Trainer splits each batch over them (DataParallel); "
                     "num_gpus=%d (DDP) is faster, CUDA_VISIBLE_DEVICES=0 keeps to one", cfg.track,
                     torch.cuda.device_count(), torch.cuda.device_count())
        if D.world_size() > 1:
            torch.cuda.set_device(D.local_rank())  # each process loads its copy onto its own GPU
        torch.cuda.reset_peak_memory_stats()
    return on_cuda


def run(cfg: TrainConfig, *, callbacks: Sequence[Any] = ()) -> dict[str, Any]:
    """Train one track (`cfg.track`) and write adapter, run card, loss history and plots into `cfg.out_dir`.

    Args:
        cfg: the run's settings, paths filled (`prodtune.config.load_config(TrainConfig, profile, track=...)`).
        callbacks: extra `transformers.TrainerCallback`s (tests use one to interrupt a run).

    Returns:
        The run card (also `<out_dir>/run_card.json`) with `skipped` (a finished run was reused) and `out_dir`.

    Raises:
        FileNotFoundError: the track's data is missing (the message names the stage to run).
        TrainingInterrupted: Ctrl-C or a kill during training; the last checkpoint stays for the next run.
    """
    cfg.check_paths()
    data, out = Path(cfg.data_dir), Path(cfg.out_dir)
    if cfg.num_gpus > 1 and not D.is_launched():
        code = launch_ddp(cfg)
        if code != 0 or not (out / "run_card.json").is_file():
            raise RuntimeError(f"train {cfg.track}: the {cfg.num_gpus} data-parallel processes failed (exit {code}); "
                               "their log is above")
        return {**read_json(out / "run_card.json"), "skipped": False, "out_dir": str(out)}

    train_df = load_track_split(cfg.track, data, "train")
    val_path = data / "validation.parquet"
    val_df = load_track_split(cfg.track, data, "validation") if val_path.is_file() else None
    dhash = data_hash([data / "train.parquet"] + ([val_path] if val_df is not None else []))
    fp = fingerprint(cfg, dhash, processes=D.world_size())
    card_path = out / "run_card.json"
    if not cfg.force and card_path.is_file() and (out / "adapter_config.json").is_file():
        old = read_json(card_path)
        if old.get("fingerprint") == fp:
            log.info("train %s: %s already holds a finished run with these settings; skipping (force=true retrains)",
                     cfg.track, out)
            kept = {k: v for k, v in (old.get("generation") or {}).items() if k not in MD.DECODING}  # decoding: cfg's
            if old.get("generation") != {**kept, **cfg.generation()} and D.is_main():
                old["generation"] = {**kept, **cfg.generation()}  # decoding is not training
                write_json(card_path, old)
            return {**old, "skipped": True, "out_dir": str(out)}

    on_cuda = _device(cfg)
    ckpt_dir = out / "checkpoints"
    resume_key = fingerprint(cfg, dhash, processes=D.world_size(), resume_key=True)
    resume_from = find_resume_point(ckpt_dir, resume_key, cfg.resume)
    if resume_from is not None:
        log.info("train %s: resuming from %s", cfg.track, resume_from)
    main = D.is_main()  # with several processes (DDP) only rank 0 touches files; the others read
    if main:
        card_path.unlink(missing_ok=True)  # an older run's card must not vouch for a run that may now be interrupted
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(ckpt_dir / "resume_key.json", {"resume_key": resume_key, "track": cfg.track})

    t0 = time.perf_counter()
    model, tok, backend = MD.load_train_model(
        cfg.base_model, max_seq_length=cfg.max_seq_length, lora=cfg.lora(), load_in_4bit=cfg.load_in_4bit,
        # on CPU the weights stay float32 and bf16/fp16 only switch on the Trainer's autocast
        dtype=("bfloat16" if cfg.bf16 else "float16" if cfg.fp16 else None) if on_cuda else None,
        gradient_checkpointing=cfg.checkpointing(), backend=cfg.backend, device="cuda" if on_cuda else "cpu",
    )
    if cfg.max_train_rows:
        train_df = train_df.iloc[: cfg.max_train_rows]
    # Retrieval-augmented fine-tuning (rag_k > 0): each prompt shows its nearest *other* training products, as
    # inference shows the store's; validation rows retrieve from the training split too (no held-out text leaks in).
    has_val = val_df is not None and len(val_df) > 0
    if has_val and cfg.max_eval_rows:
        val_df = val_df.iloc[: cfg.max_eval_rows]
    catalogue, n_quotes = train_df, None
    if cfg.skip_press_quotes and cfg.track == "llama":  # left out of the rows trained on, not of the catalogue
        from prodtune.data.clean import opens_with_quote  # here, not at the top: a GPU box can train without the data stage
        quoted = train_df["content"].map(opens_with_quote).to_numpy(dtype=bool)
        train_df, n_quotes = train_df[~quoted], int(quoted.sum())
        log.info("train %s: %d of %d rows left out (their description opens with a quotation: press praise)",
                 cfg.track, n_quotes, len(catalogue))
    ctx_train, ctx_val = (neighbour_contexts([train_df, val_df if has_val else train_df.iloc[:0]], catalogue, cfg)
                          if cfg.rag_k > 0 and cfg.track == "llama" else (None, None))
    ctx_kw = {"max_context_chars": cfg.rag_max_chars}
    train_ds, train_counts = build_dataset(cfg.track, train_df, tok, cfg.max_seq_length, cfg.loss_on, ctx_train, **ctx_kw)
    if n_quotes is not None:
        train_counts["press_quotes_left_out"] = n_quotes
    eval_ds, eval_counts = None, {"rows": 0, "truncated": 0, "dropped": 0}
    if has_val:
        eval_ds, eval_counts = build_dataset(cfg.track, val_df, tok, cfg.max_seq_length, cfg.loss_on, ctx_val, **ctx_kw)
    n_tokens = token_count(train_ds, tok)
    log.info("train %s: %d train rows (%d cut to fit, %d dropped), %d validation rows, %.0f tokens/row", cfg.track,
             train_counts["rows"], train_counts["truncated"], train_counts["dropped"], eval_counts["rows"],
             n_tokens / max(1, train_counts["rows"]))

    timer, stopper = C.step_timer(), save_on_interrupt()
    trainer = make_trainer(cfg, model, tok, train_ds, eval_ds, ckpt_dir, on_cuda=on_cuda, backend=backend,
                           resumed=resume_from is not None, callbacks=[timer, *callbacks, stopper],
                           tensorboard_dir=out / "tensorboard")
    try:
        with sigint_saves(stopper):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt as e:
        last = last_checkpoint(ckpt_dir)
        raise TrainingInterrupted(resume_hint(cfg, trainer.state.global_step, str(last) if last else None)) from e
    if stopper.requested:
        last = last_checkpoint(ckpt_dir)
        raise TrainingInterrupted(resume_hint(cfg, trainer.state.global_step, str(last) if last else None))
    step = trainer.state.global_step
    if eval_ds is not None and not any("eval_loss" in e and e.get("step") == step for e in trainer.state.log_history):
        trainer.evaluate()  # the curve ends with a validation point at the final step (every process takes part)

    trainer.save_model(str(out))  # rank 0 only; a peft model saves only the adapter (+ adapter_config.json)
    card = _card(cfg, trainer, result, timer.times, resume_from, backend=backend, on_cuda=on_cuda, data=data,
                 dhash=dhash, fp=fp, counts={"train": train_counts, "validation": eval_counts}, n_tokens=n_tokens,
                 seconds=time.perf_counter() - t0)
    if main:
        tok.save_pretrained(str(out))
        C.save_history(out, {"train_loss": card["train_loss"], "eval_loss": card["eval_loss"]})
        C.save_loss_plots(out, card)
        write_json(card_path, card)  # before the merge: the merge of a bitsandbytes run reads the run folder
        if cfg.merge_16bit:
            card["merged_16bit"] = str(merge_16bit(model, tok, out / "merged_16bit", backend, cfg))
            write_json(card_path, card)
        if not cfg.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)  # the run finished: its adapter is the work kept
    trainer.accelerator.wait_for_everyone()  # the others return once rank 0 has written the run
    # Notebooks 03/04 load the model again for their before/after right after this: the training copy must be gone
    # first (a T4 or an 8 GB card holds one 8B model, not two), and a Trainer holds it in reference cycles.
    del trainer, model
    free_memory()
    log.info("train %s: %d steps in %.0fs (%.2f s/step), loss %.3f -> %.3f, eval %s; wrote %s", cfg.track, card["steps"],
             card["seconds"], card["seconds_per_step"], card["train_loss"][0]["loss"] if card["train_loss"] else float("nan"),
             card["final_train_loss"] or float("nan"), card["final_eval_loss"], out)
    return {**card, "skipped": False, "out_dir": str(out)}


def _card(cfg: TrainConfig, trainer: Any, result: Any, step_times: list[float], resume_from: Path | None, *,
          backend: str, on_cuda: bool, data: Path, dhash: str, fp: str, counts: dict[str, Any], n_tokens: int,
          seconds: float) -> dict[str, Any]:
    import torch

    hist = C.loss_history(trainer.state.log_history)
    state = trainer.state
    steps_this_run = state.global_step - (int(resume_from.name.split("-")[-1]) if resume_from else 0)
    world = trainer.args.world_size
    tokens_seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))}
    runtime = float(metrics.get("train_runtime", 0.0))
    return {
        "track": cfg.track,
        "base_model": cfg.base_model,
        "backend": backend,
        "loss_on": cfg.loss_on,
        "prompt_version": P.PROMPT_VERSION,
        # what inference reuses: the retrieval the prompts were trained with, and the decoding chosen on validation
        "rag": cfg.rag() if cfg.track == "llama" else None,
        "generation": cfg.generation(),
        "data_dir": str(data),
        "data_hash": dhash,
        "fingerprint": fp,
        "rows": counts,
        "train_tokens_per_epoch": n_tokens,
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0.0), 3),
        "resumed_from": str(resume_from) if resume_from else None,
        "train_loss": hist["train_loss"],
        "eval_loss": hist["eval_loss"],
        "final_train_loss": hist["train_loss"][-1]["loss"] if hist["train_loss"] else None,
        "final_eval_loss": hist["eval_loss"][-1]["loss"] if hist["eval_loss"] else None,
        "mean_train_loss": float(result.training_loss),
        # the Trainer's own figures of this session: train_runtime, train_samples_per_second, train_steps_per_second...
        "trainer_metrics": metrics,
        "seconds": round(seconds, 2),
        "train_seconds": round(runtime, 2),
        "seconds_per_step": round(runtime / max(1, steps_this_run), 3),
        # per-step wall times of this session (warm-up included) and the steady-state figures derived from them
        "step_seconds": [round(t, 4) for t in step_times],
        **C.step_summary(step_times, tokens_seen, steps_this_run),
        "tokens_seen": tokens_seen,
        "processes": world,
        # rows per optimizer step over all processes (and over all GPUs of a DataParallel process)
        "global_batch_size": trainer.args.train_batch_size * cfg.gradient_accumulation_steps * world,
        "peak_memory_gb": C.peak_memory_gb(),
        "peak_memory_kind": "cuda_reserved" if on_cuda else "process_rss",
        "device": torch.cuda.get_device_name(0) if on_cuda else f"cpu x{torch.get_num_threads()} threads",
        "versions": C.versions(),
        "config": describe(cfg),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def merge_16bit(model: Any, tok: Any, dest: Path, backend: str, cfg: TrainConfig) -> Path:
    """Save base + adapter merged into one 16-bit model (for vLLM, llama.cpp conversion, the hub).

    unsloth merges from the model in memory (`save_pretrained_merged` dequantises its 4-bit base); the other backends
    merge the saved run as `prodtune export --to merged` does (`export.merge_run`: a 16-bit base, a bitsandbytes 4-bit
    one dequantised first), so the run folder must already hold the adapter and its run card.
    """
    if dest.exists():
        shutil.rmtree(dest)
    if backend == "unsloth":
        model.save_pretrained_merged(str(dest), tok, save_method="merged_16bit")  # dequantises the 4-bit base
        return dest
    from prodtune import export as X

    merged, mtok, _ = X.merge_run(dest.parent, device="cpu" if backend == "cpu" else "cuda")
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")  # a failed merge leaves no half-written model
    shutil.rmtree(tmp, ignore_errors=True)
    X.write_merged(merged, mtok, tmp, "bfloat16" if cfg.bf16 else "float16")
    os.replace(tmp, dest)
    del merged
    free_memory()
    return dest
