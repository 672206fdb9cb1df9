"""Stages 03/04: LoRA fine-tuning with TRL's SFTTrainer, one track per run.

    prodtune train --track llama --profile cpu                  # data/cpu/prepared -> models/cpu/llama
    prodtune train --track deepseek --profile cpu --max_steps 5 # data/cpu/cot      -> models/cpu/deepseek
    python -c "from prodtune.config import load_config; from prodtune import train; \
print(train.run(load_config(train.Config, 'cpu', track='llama')))"

Tracks: `llama` (Alpaca: title -> description, stage 01 data) and `deepseek` (R1: question -> <think>cot</think>
answer, stage 02 data). Loss is on the response only (TRL prompt-completion format, `completion_only_loss`),
or on the whole text with `loss_on: all` (the study's recipe). Each completion ends with EOS and is cut to fit
`max_seq_length` before that EOS, so the model always learns to stop.

The out folder receives the LoRA adapter + tokenizer, `run_card.json`, `loss_history.{csv,json}`, `loss.html` +
`loss.png`, the Trainer's TensorBoard logs under `tensorboard/`, and checkpoints under `checkpoints/` while training
(removed once the run finishes; never removed while it may be resumed).

Modules: `config` (TrainConfig), `dataset` (rows fitted to length, data hash), `trainer` (SFTTrainer settings,
interrupts, DDP relaunch), `card` (run card figures, loss history and plots), `stage` (`run`).
"""

from prodtune.train.card import loss_figure, loss_history, step_summary
from prodtune.train.config import TRACKS, Config, TrainConfig, fingerprint
from prodtune.train.dataset import build_dataset, data_hash, fit_example, load_track_split, neighbour_contexts
from prodtune.train.stage import last_checkpoint, merge_16bit, run
from prodtune.train.trainer import TrainingInterrupted, cli_args, make_trainer, sft_config

__all__ = ["TRACKS", "Config", "TrainConfig", "TrainingInterrupted", "build_dataset", "cli_args", "data_hash",
           "fingerprint", "fit_example", "last_checkpoint", "load_track_split", "loss_figure", "loss_history",
           "make_trainer", "merge_16bit", "neighbour_contexts", "run", "sft_config", "step_summary"]
