"""TRL's SFTTrainer for one run: its settings, interrupts that keep a checkpoint, and the data-parallel relaunch.

    python -c "from prodtune.train import TrainConfig, sft_config; print(sft_config(TrainConfig(), '/tmp/ckpt'))"

Everything the Trainer's behaviour depends on is set in `sft_config`. Reporting (TensorBoard by default) is the
Trainer's own `report_to`. Ctrl-C during training asks the Trainer to save a checkpoint at the end of the current
step and stop (a second Ctrl-C stops at once); either way `TrainingInterrupted` says how to resume.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import threading
from typing import Any, Iterator, Sequence

from prodtune import distributed as D
from prodtune.config import ConfigError
from prodtune.io import env_var, headless, log
from prodtune.train.config import TrainConfig, field_names

# Python packages that must import for each `report_to` choice.
_REPORTER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
                      "trackio": ("trackio",)}


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (or a kill); the message names the checkpoint left and how to resume."""


def sft_config(cfg: TrainConfig, output_dir: str | os.PathLike, *, on_cuda: bool = False, backend: str = "cpu",
               eval_on: bool = True, resumed: bool = False) -> Any:
    """The TRL `SFTConfig` of a run (everything the Trainer's behaviour depends on is set here).

    Args:
        cfg: the run's settings.
        output_dir: where checkpoints go.
        on_cuda: training on a GPU (else `use_cpu`).
        backend: the loader used; gradient checkpointing is set up by the GPU loaders, by TRL on CPU.
        eval_on: a validation set is present.
        resumed: continuing from a checkpoint (no second step-0 evaluation).
    """
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_length=cfg.max_seq_length,
        packing=cfg.packing,
        completion_only_loss=cfg.loss_on == "completion",
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        optim=cfg.optim,
        max_grad_norm=cfg.max_grad_norm,
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.num_train_epochs,
        seed=cfg.seed,
        data_seed=cfg.seed,
        # SFTConfig's defaults turn bf16 and gradient checkpointing ON; on CPU they made a step 27x slower.
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        gradient_checkpointing=bool(cfg.checkpointing()) and backend == "cpu",
        logging_steps=cfg.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if cfg.eval_steps else "no") if eval_on else "no",
        eval_steps=cfg.eval_steps,
        eval_on_start=cfg.eval_on_start and eval_on and not resumed and bool(cfg.eval_steps),
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=cfg.early_stopping_patience is not None,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to=list(cfg.report_to),  # the Trainer's integrations write only on rank 0
        use_cpu=not on_cuda,
        disable_tqdm=not cfg.progress or not D.is_main(),
        dataloader_num_workers=0,
        # tokens per logged step (summed over processes): the run card's tokens/s
        include_num_input_tokens_seen="non_padding",
        # DDP: every LoRA weight gets a gradient each step, so DDP need not search the graph for unused ones
        ddp_find_unused_parameters=False,
    )


def fp32_adapters(model: Any) -> int:
    """Cast bf16 trainable weights back to float32; returns how many tensors it cast.

    TRL's SFTTrainer casts every trainable weight of a 4-bit model to bf16 (QLoRA's recipe) whatever the run's
    precision. fp16 training (a T4) then stops at the first step: its GradScaler refuses bf16 gradients
    (`_amp_foreach_non_finite_check_and_unscale_cuda not implemented for 'BFloat16'`, seen on the lent H100 with
    the transformers+bitsandbytes backend), and a T4 has no fast bf16 anyway. Called before the optimizer exists.
    """
    import torch

    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.bfloat16:
            p.data = p.data.float()
            n += 1
    return n


def check_reporters(report_to: Sequence[str]) -> None:
    """Raise ConfigError when a chosen experiment tracker is not installed."""
    for name in report_to:
        pkgs = _REPORTER_PACKAGES.get(name, ())
        if pkgs and not any(importlib.util.find_spec(p) for p in pkgs):
            raise ConfigError(f"TrainConfig.report_to: {name} is not installed (pip install {pkgs[0]}); "
                              f"choose another tracker or none")


def make_trainer(cfg: TrainConfig, model: Any, tok: Any, train_ds: Any, eval_ds: Any, output_dir: str | os.PathLike, *,
                 on_cuda: bool = False, backend: str = "cpu", resumed: bool = False, callbacks: Sequence[Any] = (),
                 tensorboard_dir: str | os.PathLike | None = None) -> Any:
    """An `SFTTrainer` over prepared datasets (TRL tokenizes, masks the prompt and builds labels here).

    Args:
        tensorboard_dir: where the Trainer's TensorBoard callback writes (default: `<output_dir>/runs/<time>`).
    """
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    if not cfg.progress:
        import datasets

        datasets.disable_progress_bars()
    check_reporters(cfg.report_to)
    args = sft_config(cfg, output_dir, on_cuda=on_cuda, backend=backend, eval_on=eval_ds is not None, resumed=resumed)
    cbs = list(callbacks)
    if cfg.early_stopping_patience is not None:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    # transformers 5 dropped TrainingArguments.logging_dir: its TensorBoard callback reads this variable when made
    with env_var("TENSORBOARD_LOGGING_DIR", str(tensorboard_dir) if tensorboard_dir else None):
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                             callbacks=cbs)
    if not cfg.bf16:
        fp32_adapters(trainer.model)
    handler = trainer.accelerator.ddp_handler
    if cfg.ddp_grad_dtype and handler is not None and args.world_size > 1:
        from accelerate.utils import DDPCommunicationHookType

        # PyTorch's compression hook: gradients cast to 16 bits for the all-reduce, back to fp32 after (LoRA's ~42M
        # gradients of an 8B model are ~170 MB a step in fp32). Registered when the Trainer wraps the model in DDP.
        handler.comm_hook = DDPCommunicationHookType.BF16 if cfg.ddp_grad_dtype == "bf16" else DDPCommunicationHookType.FP16
    if headless():  # a notebook run by `prodtune run`: steps and losses as text lines
        from transformers.trainer_callback import ProgressCallback
        from transformers.utils.notebook import NotebookProgressCallback

        trainer.remove_callback(NotebookProgressCallback)
        if not any(isinstance(c, ProgressCallback) for c in trainer.callback_handler.callbacks):
            trainer.add_callback(ProgressCallback)
    return trainer


# ----------------------------------------------------------------------------------------------
# Interrupts
# ----------------------------------------------------------------------------------------------


def save_on_interrupt() -> Any:
    """A Trainer callback: once `.requested` is set, save a checkpoint at the end of the step and stop training."""
    from transformers import TrainerCallback

    class SaveOnInterrupt(TrainerCallback):
        def __init__(self) -> None:
            self.requested = False
            self.stopped_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if self.requested and self.stopped_at is None:
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step

    return SaveOnInterrupt()


@contextlib.contextmanager
def sigint_saves(callback: Any) -> Iterator[None]:
    """While training: the first SIGINT (Ctrl-C) sets `callback.requested`; a second raises KeyboardInterrupt at once.

    Only in a single process on the main thread (signal handlers live there). With several processes a flag seen
    at different steps would leave the others waiting in an all-reduce, so there Ctrl-C stops at once and the
    last regular checkpoint is the resume point.
    """
    if threading.current_thread() is not threading.main_thread() or D.world_size() > 1:
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if callback.requested:
            raise KeyboardInterrupt
        callback.requested = True
        log.warning("interrupted: saving a checkpoint at the end of this step, then stopping (Ctrl-C again: stop now)")

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)


def resume_hint(cfg: TrainConfig, step: int, checkpoint: str | None) -> str:
    """The one-line message of `TrainingInterrupted`."""
    where = f"{checkpoint} holds the last checkpoint" if checkpoint else "no checkpoint was saved yet"
    return (f"training of the {cfg.track} track interrupted at step {step}; {where}. Run the same command again "
            f"(prodtune train --track {cfg.track} ..., or the notebook cell) to resume from it (resume is on by default)")


# ----------------------------------------------------------------------------------------------
# Several processes (DDP)
# ----------------------------------------------------------------------------------------------


def cli_args(cfg: TrainConfig) -> list[str]:
    """`prodtune train` arguments that rebuild `cfg` exactly (one flag per field, `--num_gpus 1`).

    Flags are the dataclass fields as HfArgumentParser makes them; a null value cannot be a flag, so it goes
    as `--set train.<field>=null`.
    """
    args: list[str] = []
    for name in field_names():
        value = getattr(cfg, name)
        if name == "num_gpus":
            value = 1  # the launched processes train; they must not launch again
        if value is None:
            args += ["--set", f"train.{name}=null"]
        elif isinstance(value, bool):
            args += [f"--{name}", str(value).lower()]
        elif isinstance(value, list):
            args += [f"--{name}", *map(str, value)]
        else:
            args += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
    return args


def launch_ddp(cfg: TrainConfig) -> int:
    """Run `prodtune train` with `cfg` in `cfg.num_gpus` processes (GPUs where training runs on CUDA, else gloo CPU).

    Returns:
        The launcher's exit code.
    """
    from prodtune.gpu import cuda_available, require_cuda

    if cfg.device == "cuda":
        require_cuda(f"num_gpus={cfg.num_gpus}")
    cpu = cfg.backend == "cpu" or cfg.device == "cpu" or not cuda_available()
    if not cpu:
        import torch

        have = torch.cuda.device_count()
        if cfg.num_gpus > have:
            raise ConfigError(f"TrainConfig.num_gpus: {cfg.num_gpus}, but this machine has {have} CUDA device(s)")
    if cfg.merge_16bit:
        log.warning("merge_16bit with num_gpus > 1: the merged model is written by rank 0 only")
    log.info("train %s: relaunching in %d processes with %s", cfg.track, cfg.num_gpus, json.dumps(cli_args(cfg)))
    return D.relaunch(cfg.num_gpus, ["train", *cli_args(cfg)], cpu=cpu)
