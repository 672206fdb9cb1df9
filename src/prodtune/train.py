"""Stages 03/04: LoRA fine-tuning with TRL's SFTTrainer, one track per notebook.

    prodtune train --track llama --profile cpu                     # data/cpu/prepared -> models/cpu/llama
    prodtune train --track deepseek --profile cpu --max-steps 5    # data/cpu/cot      -> models/cpu/deepseek
    prodtune train --track llama --profile cpu --resume            # continue a killed run from its last checkpoint

Tracks: `llama` (Alpaca: title -> description, stage 01 data) and `deepseek` (R1: question -> <think>cot</think>
answer, stage 02 data). Loss is on the response only (TRL prompt-completion format, `completion_only_loss`),
or on the whole text with `loss_on: all` (the study's recipe, kept as a reference). Each completion ends with
EOS and is cut to fit `max_seq_length` before that EOS, so the model always learns to stop.

The out folder receives the LoRA adapter + tokenizer, `run_card.json` (profile, data hash, steps, loss
histories, time, peak memory, versions), `loss_history.{csv,json}`, `loss.html` + `loss.png`, TensorBoard logs
under `tensorboard/`, and checkpoints under `checkpoints/` while training (removed once the run finishes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from prodtune import distributed as D
from prodtune import models as MD  # (prodtune/__init__ sets OMP_WAIT_POLICY before torch is imported)
from prodtune import prompts as P
from prodtune.config import ConfigError, build, describe, fill_paths, load_profile, parse_overrides, profile_path
from prodtune.io import atomic_path, log, read_json, write_json, write_text

TRACKS = ("llama", "deepseek")
COT_COLUMNS = ("uid", "title", "Question", "Complex_CoT", "Response")
# Keys a track may not override (they describe the tracks themselves or where things go).
_NOT_PER_TRACK = {"llama", "deepseek", "data_dir", "cot_dir", "models_dir"}
# Settings that do not change what is learned: a finished run is reused when only these differ.
_NOT_IN_FINGERPRINT = {"llama", "deepseek", "data_dir", "cot_dir", "models_dir", "num_threads", "save_steps",
                       "save_total_limit", "keep_checkpoints", "merge_16bit", "logging_steps", "device"}
# ...and a checkpoint may be resumed when only these (or the above) differ.
_NOT_IN_RESUME_KEY = _NOT_IN_FINGERPRINT | {"max_steps", "num_train_epochs", "early_stopping_patience"}

TRACK_DEFAULTS: dict[str, dict[str, Any]] = {
    # The cpu profile's numbers (SmolLM2-135M, fp32): Alpaca rows are ~130 tokens, R1 rows ~310 (see configs/cpu.yaml).
    "llama": {"max_steps": 60, "max_seq_length": 192},
    "deepseek": {"max_steps": 32, "max_seq_length": 352, "per_device_train_batch_size": 2, "eval_steps": 16,
                 "save_steps": 16, "max_eval_rows": 12},
}


@dataclass
class TrainConfig:
    """Settings of stages 03/04. Defaults are the offline CPU run (embedded SmolLM2, fp32, no checkpointing).

    Shared keys apply to both tracks; the `llama` and `deepseek` mappings override any of them per track
    (typically base_model, max_steps / num_train_epochs, max_seq_length). LoRA and optimiser defaults follow
    the study and Unsloth: r=16, alpha=16, all 7 projections, lr 2e-4, warmup 5, linear decay, seed 3407.
    """

    data_dir: str = field(default="{data_dir}/prepared", metadata={"help": "stage 01 output (llama track)"})
    cot_dir: str = field(default="{data_dir}/cot", metadata={"help": "stage 02 output (deepseek track)"})
    models_dir: str = field(default="{models_dir}", metadata={"help": "runs go to <models_dir>/<track>"})
    base_model: str = field(default=MD.EMBEDDED_LLM, metadata={"help": "hub id, folder or embedded:smollm2-135m-instruct"})
    max_steps: int = field(default=-1, metadata={"help": "optimizer steps; -1: use num_train_epochs"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps is -1"})
    max_seq_length: int = field(default=256, metadata={"help": "tokens per row; completions are cut before EOS to fit"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "rows per forward pass"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "forward passes per optimizer step"})
    per_device_eval_batch_size: int = field(default=16, metadata={"help": "rows per validation forward pass"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate (the study's)"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers scheduler name"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch on CPU, adamw_8bit on CUDA (bitsandbytes)"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping"})
    seed: int = field(default=3407, metadata={"help": "seed of LoRA init, data order and dropout"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA scaling numerator"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (0 lets unsloth use its fast path)"})
    target_modules: list[str] = field(default_factory=lambda: list(MD.DEFAULT_TARGET_MODULES),
                                      metadata={"help": "projections that get LoRA adapters"})
    loss_on: str = field(default="completion", metadata={"help": "completion: response tokens only; all: whole text (study)"})
    packing: bool = field(default=False, metadata={"help": "pack rows into max_seq_length blocks (SFTConfig.packing)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (Ampere+ GPUs); slow on CPU"})
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast (T4)"})
    gradient_checkpointing: bool | str = field(default=False, metadata={"help": "true/false/'unsloth'; off on CPU (27x slower)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA 4-bit base weights (CUDA only)"})
    backend: str = field(default="auto", metadata={"help": "auto | unsloth | bnb (CUDA); cpu forces the CPU path"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (cuda: fail clearly without a GPU)"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads; null: torch's default"})
    ddp_grad_dtype: str | None = field(default=None, metadata={
        "help": "DDP (--num-gpus N): all-reduce gradients in bf16 or fp16 (half the bytes between GPUs); null: fp32"})
    logging_steps: int = field(default=2, metadata={"help": "train loss logged every N steps"})
    eval_steps: int | None = field(default=20, metadata={"help": "validation loss every N steps; null: only at the end"})
    eval_on_start: bool = field(default=True, metadata={"help": "validation loss of the base model at step 0"})
    max_eval_rows: int | None = field(default=24, metadata={"help": "validation rows used for eval loss; null: all"})
    max_train_rows: int | None = field(default=None, metadata={"help": "train rows used; null: all"})
    save_steps: int = field(default=20, metadata={"help": "checkpoint every N steps (resume point)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep checkpoints/ after a finished run"})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "stop after N evals without improvement"})
    merge_16bit: bool = field(default=False, metadata={"help": "also save base+adapter merged in 16-bit to merged_16bit/"})
    llama: dict[str, Any] = field(default_factory=dict, metadata={"help": "per-track overrides, Llama track"})
    deepseek: dict[str, Any] = field(default_factory=dict, metadata={"help": "per-track overrides, DeepSeek track"})

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self)}
        for track in TRACKS:
            over = {**TRACK_DEFAULTS[track], **(getattr(self, track) or {})}
            bad = set(over) - (names - _NOT_PER_TRACK)
            if bad:
                raise ConfigError(f"TrainConfig.{track}: unknown key(s) {sorted(bad)}; a track may override "
                                  f"{sorted(names - _NOT_PER_TRACK)}")
            setattr(self, track, over)
        if self.loss_on not in ("completion", "all"):
            raise ConfigError(f"TrainConfig.loss_on: {self.loss_on!r} is not 'completion' or 'all'")
        if self.bf16 and self.fp16:
            raise ConfigError("TrainConfig: bf16 and fp16 are exclusive")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"TrainConfig.device: {self.device!r} is not auto, cpu or cuda")
        if self.ddp_grad_dtype not in (None, "bf16", "fp16"):
            raise ConfigError(f"TrainConfig.ddp_grad_dtype: {self.ddp_grad_dtype!r} is not null, bf16 or fp16")
        if self.backend not in ("auto", "unsloth", "bnb", "cpu"):
            raise ConfigError(f"TrainConfig.backend: {self.backend!r} is not auto, unsloth, bnb or cpu")
        if self.max_steps == 0 or self.max_steps < -1 or (self.max_steps == -1 and self.num_train_epochs <= 0):
            raise ConfigError("TrainConfig: max_steps must be > 0, or -1 with num_train_epochs > 0")
        if self.max_seq_length < 32:
            raise ConfigError("TrainConfig.max_seq_length must be >= 32")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                     "lora_r", "lora_alpha", "logging_steps", "save_steps", "save_total_limit"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name} must be >= 1")
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                raise ConfigError("TrainConfig: early_stopping_patience needs eval_steps")
            if self.save_steps % self.eval_steps:
                raise ConfigError("TrainConfig: with early stopping, save_steps must be a multiple of eval_steps")

    def for_track(self, track: str) -> "TrainConfig":
        """The flat settings of one track: shared keys with the track's overrides applied (type-checked)."""
        if track not in TRACKS:
            raise ConfigError(f"unknown track {track!r}; expected one of {TRACKS}")
        values = {k: v for k, v in describe(self).items() if k not in TRACKS}
        return build(TrainConfig, {**values, **getattr(self, track)})

    def lora(self) -> dict[str, Any]:
        """The `lora` dict the model loaders take."""
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": list(self.target_modules), "seed": self.seed}


def train_config(profile: str = "cpu", overrides: Sequence[str] | None = None, **cli_values: Any) -> TrainConfig:
    """Build the `train` section of a profile, accepting per-track overrides like `train.llama.max_steps=3`.

    The more specific setting wins: a profile that `inherit:`s another overrides both the parent's shared keys
    and the parent's per-track values with its own shared keys (so `h100.yaml`'s batch size also reaches the
    deepseek track that `cpu.yaml` gave its own batch size); within one file a track's mapping beats the
    shared key; command-line overrides come last (`train.max_steps=5` for both tracks, `train.llama.max_steps=3`
    for one).

    Args:
        profile: profile name or YAML path.
        overrides: `section.key=value` strings; `train.<track>.<key>=value` sets one per-track key.
        **cli_values: shared keys given on the command line (None values are ignored).
    """
    import yaml

    plain, nested = [], []
    for item in overrides or []:
        key = item.partition("=")[0].lstrip("-")
        (nested if key.startswith(tuple(f"train.{t}." for t in TRACKS)) else plain).append(item)
    prof = load_profile(profile, plain)  # validates every section and gives the paths to fill
    layers: list[dict[str, Any]] = []
    path = profile_path(profile)
    while True:  # the inherit chain, most specific first
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        layers.insert(0, raw.get("train") or {})
        if not raw.get("inherit"):
            break
        path = profile_path(raw["inherit"])
    cli_layer: dict[str, Any] = dict(parse_overrides(plain).get("train", {}))
    cli_layer.update({k: v for k, v in cli_values.items() if v is not None})
    for item in nested:
        key, _, value = item.partition("=")
        _, track, name = key.lstrip("-").split(".", 2)
        cli_layer.setdefault(track, {})[name] = yaml.safe_load(value)
    layers.append(cli_layer)
    # Path templates in the dataclass defaults ({data_dir}, {models_dir}) are filled too, not only the profile's values.
    values: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                              if isinstance(f.default, str) and "{" in f.default}
    tracks = {t: dict(TRACK_DEFAULTS[t]) for t in TRACKS}
    for layer in layers:
        shared = {k: v for k, v in layer.items() if k not in TRACKS}
        values.update(shared)
        for t in TRACKS:
            tracks[t].update({k: v for k, v in shared.items() if k in tracks[t]})  # this level beats older per-track values
            tracks[t].update(layer.get(t) or {})
    values = fill_paths(values, prof)
    values.update(tracks)
    return build(TrainConfig, _floats(values))


def _floats(values: dict[str, Any]) -> dict[str, Any]:
    """YAML 1.1 reads `2e-4` (no dot) as a string; accept it for float fields (and in per-track mappings)."""
    floats = {f.name for f in dataclasses.fields(TrainConfig) if f.type in ("float", float)}
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            v = _floats(v)
        elif k in floats and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass  # left for build() to reject with the field name
        out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------


def load_track_split(track: str, data_dir: str | os.PathLike, split: str) -> Any:
    """One split of a track's data as a DataFrame.

    Raises:
        FileNotFoundError: the stage that writes it has not run (named in the message).
    """
    import pandas as pd

    path = Path(data_dir) / f"{split}.parquet"
    if track == "llama":
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing; run notebook 01 first (prodtune prepare)")
        df = pd.read_parquet(path)
        missing = [c for c in ("title", "content") if c not in df.columns]
        if missing:
            raise ValueError(f"{path}: columns {missing} missing; expected uid, title, content")
        return df
    if not Path(data_dir).is_dir():
        raise FileNotFoundError(f"{data_dir}: the CoT dataset is missing; run notebook 02 first (prodtune cot)")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run notebook 02 first (prodtune cot)")
    df = pd.read_parquet(path)
    missing = [c for c in ("Question", "Complex_CoT", "Response") if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: columns {missing} missing; expected {list(COT_COLUMNS)}")
    return df


def fit_example(example: dict[str, str], tokenizer: Any, max_seq_length: int) -> tuple[dict[str, str] | None, bool]:
    """Cut an example's completion so prompt + completion + EOS fit `max_seq_length` tokens.

    TRL truncates the token sequence at the end, which would drop the EOS of long rows and teach the model
    to never stop. Cutting the text first (at the last sentence end in the budget, else a word) keeps the EOS.
    An R1 completion (`cot</think>answer`) is cut inside the reasoning, so `</think>` and the answer survive.

    Returns:
        `(example, truncated)`; `(None, False)` when the prompt (plus an R1 answer) leaves fewer than 8 tokens.
    """
    eos = tokenizer.eos_token
    body = example["completion"][: -len(eos)] if example["completion"].endswith(eos) else example["completion"]
    n_prompt = len(tokenizer(example["prompt"])["input_ids"])
    budget = max_seq_length - n_prompt - 1
    head, tail = body, ""
    if P.THINK_CLOSE in body:  # keep "\n</think>\n{answer}" whole; only the reasoning may be shortened
        head, rest = body.split(P.THINK_CLOSE, 1)
        head, tail = head.rstrip("\n"), "\n" + P.THINK_CLOSE + rest
        budget -= len(tokenizer(tail, add_special_tokens=False)["input_ids"]) + 1
    if budget < 8:
        return None, False
    ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    if len(ids) <= budget:
        return {"prompt": example["prompt"], "completion": body + eos}, False
    text = tokenizer.decode(ids[:budget], skip_special_tokens=False)
    cut = max(text.rfind(". "), text.rfind("! "), text.rfind("? "), text.rfind(".\n"))
    if cut >= len(text) // 2:
        text = text[: cut + 1]
    elif " " in text:
        text = text[: text.rfind(" ")]
    return {"prompt": example["prompt"], "completion": text.rstrip() + tail + eos}, True


def build_dataset(track: str, df: Any, tokenizer: Any, max_seq_length: int, loss_on: str = "completion") -> tuple[Any, dict[str, int]]:
    """A `datasets.Dataset` of prompt/completion rows (or `text` rows for `loss_on="all"`), fitted to length.

    Returns:
        `(dataset, counts)` with counts `rows`, `truncated`, `dropped`.
    """
    from datasets import Dataset

    rows, truncated, dropped = [], 0, 0
    for ex in P.build_examples(track, df.to_dict("records"), tokenizer.eos_token):
        fitted, cut = fit_example(ex, tokenizer, max_seq_length)
        if fitted is None:
            dropped += 1
            continue
        truncated += cut
        rows.append({"text": P.full_text(fitted)} if loss_on == "all" else fitted)
    if not rows:
        raise ValueError(f"no {track} row fits max_seq_length={max_seq_length}")
    return Dataset.from_list(rows), {"rows": len(rows), "truncated": truncated, "dropped": dropped}


def data_hash(paths: Sequence[Path]) -> str:
    """blake2b of the files' rows (the run card's `data_hash`): same rows, same hash.

    The rows are hashed, not the file bytes, so rewriting identical data (a rerun of stage 01 or 02, another
    Parquet writer version) does not make a finished training run look stale.
    """
    import pandas as pd

    h = hashlib.blake2b(digest_size=12)
    for p in paths:
        df = pd.read_parquet(p)
        h.update(Path(p).name.encode() + b"\0" + "\0".join(map(str, df.columns)).encode())
        h.update(pd.util.hash_pandas_object(df, index=False).values.tobytes())
    return h.hexdigest()


def _fingerprint(cfg: TrainConfig, track: str, dhash: str, exclude: set[str]) -> str:
    d = {k: v for k, v in describe(cfg).items() if k not in exclude}
    payload = json.dumps({"track": track, "cfg": d, "data": dhash, "prompt": P.PROMPT_VERSION}, sort_keys=True, default=str)
    return hashlib.blake2b(payload.encode(), digest_size=10).hexdigest()


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def last_checkpoint(ckpt_dir: str | os.PathLike) -> Path | None:
    """The newest complete `checkpoint-N` folder (one with trainer_state.json), or None."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return None
    done = [c for c in d.glob("checkpoint-*") if (c / "trainer_state.json").is_file() and c.name.split("-")[-1].isdigit()]
    return max(done, key=lambda c: int(c.name.split("-")[-1]), default=None)


def _peak_memory_gb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_reserved() / 2**30, 3)
    from prodtune.bench import peak_rss_gib

    return round(peak_rss_gib(), 3)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("prodtune", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "unsloth", "bitsandbytes"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def loss_history(log_history: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Train and validation losses from `trainer.state.log_history`, one point per logged step."""
    train, evals = {}, {}
    for e in log_history:
        if "loss" in e and "step" in e:
            train[e["step"]] = {"step": e["step"], "loss": float(e["loss"]), "learning_rate": float(e.get("learning_rate", 0.0)),
                                "epoch": float(e.get("epoch", 0.0))}
        if "eval_loss" in e and "step" in e:
            evals[e["step"]] = {"step": e["step"], "loss": float(e["eval_loss"]), "epoch": float(e.get("epoch", 0.0))}
    return {"train_loss": [train[k] for k in sorted(train)], "eval_loss": [evals[k] for k in sorted(evals)]}


def _save_history(out: Path, hist: dict[str, list[dict[str, float]]]) -> None:
    import pandas as pd

    write_json(out / "loss_history.json", hist)
    rows = [{"split": "train", **p} for p in hist["train_loss"]] + [{"split": "validation", **p} for p in hist["eval_loss"]]
    with atomic_path(out / "loss_history.csv") as tmp:
        pd.DataFrame(rows, columns=["split", "step", "loss", "learning_rate", "epoch"]).to_csv(tmp, index=False)


def loss_figure(run: str | os.PathLike | dict[str, Any]) -> Any:
    """Interactive plotly figure of train and validation loss vs step, from a run folder or run card."""
    import plotly.graph_objects as go

    card = run if isinstance(run, dict) else read_json(Path(run) / "run_card.json")
    fig = go.Figure()
    for key, name, dash in (("train_loss", "train", "solid"), ("eval_loss", "validation", "dash")):
        pts = card.get(key) or []
        fig.add_trace(go.Scatter(x=[p["step"] for p in pts], y=[p["loss"] for p in pts], mode="lines+markers",
                                 name=name, line={"dash": dash}))
    fig.update_layout(title=f"{card.get('track', '')} track: loss vs step ({card.get('base_model', '')})",
                      xaxis_title="optimizer step", yaxis_title="cross-entropy loss", template="plotly_white")
    return fig


def save_loss_plots(out: Path, card: dict[str, Any]) -> None:
    """`loss.html` (plotly, self-contained: works offline) and `loss.png` (matplotlib: kaleido needs Chrome)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        fig_html = loss_figure(card)
    except ImportError as e:  # plotly is in requirements.txt; a bare GPU image may lack it: keep the PNG
        log.warning("loss.html not written (%s); loss.png and loss_history.csv are", e)
    else:
        with atomic_path(out / "loss.html", ".html") as tmp:
            fig_html.write_html(tmp, include_plotlyjs=True, full_html=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    for key, name, style in (("train_loss", "train", "-"), ("eval_loss", "validation", "--")):
        pts = card.get(key) or []
        if pts:
            ax.plot([p["step"] for p in pts], [p["loss"] for p in pts], style, marker="o", ms=3, label=name)
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title=f"{card.get('track')} track loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(out / "loss.png", ".png") as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def sft_config(tcfg: TrainConfig, output_dir: str | os.PathLike, *, on_cuda: bool = False, backend: str = "cpu",
               eval_on: bool = True, resumed: bool = False, progress: bool = True) -> Any:
    """The TRL `SFTConfig` for one track's settings (everything the run's behaviour depends on is set here).

    Args:
        tcfg: a track's flat settings (`TrainConfig.for_track`).
        output_dir: where checkpoints go.
        on_cuda: training on a GPU (else `use_cpu`).
        backend: the loader used; gradient checkpointing is set up by the GPU loaders, by TRL on CPU.
        eval_on: a validation set is present.
        resumed: continuing from a checkpoint (no second step-0 evaluation).
        progress: tqdm bars.
    """
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir),
        max_length=tcfg.max_seq_length,
        packing=tcfg.packing,
        completion_only_loss=tcfg.loss_on == "completion",
        per_device_train_batch_size=tcfg.per_device_train_batch_size,
        gradient_accumulation_steps=tcfg.gradient_accumulation_steps,
        per_device_eval_batch_size=tcfg.per_device_eval_batch_size,
        learning_rate=tcfg.learning_rate,
        lr_scheduler_type=tcfg.lr_scheduler_type,
        warmup_steps=tcfg.warmup_steps,
        weight_decay=tcfg.weight_decay,
        optim=tcfg.optim,
        max_grad_norm=tcfg.max_grad_norm,
        max_steps=tcfg.max_steps,
        num_train_epochs=tcfg.num_train_epochs,
        seed=tcfg.seed,
        data_seed=tcfg.seed,
        # SFTConfig's defaults turn bf16 and gradient checkpointing ON; on CPU they made a step 27x slower.
        bf16=tcfg.bf16,
        fp16=tcfg.fp16,
        gradient_checkpointing=bool(tcfg.gradient_checkpointing) and backend == "cpu",
        logging_steps=tcfg.logging_steps,
        logging_first_step=True,
        eval_strategy=("steps" if tcfg.eval_steps else "no") if eval_on else "no",
        eval_steps=tcfg.eval_steps,
        eval_on_start=tcfg.eval_on_start and eval_on and not resumed and bool(tcfg.eval_steps),
        save_strategy="steps",
        save_steps=tcfg.save_steps,
        save_total_limit=tcfg.save_total_limit,
        load_best_model_at_end=tcfg.early_stopping_patience is not None,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        report_to="none",  # TensorBoard is added as a callback writing to our own folder
        use_cpu=not on_cuda,
        disable_tqdm=not progress or not D.is_main(),
        dataloader_num_workers=0,
        # tokens per logged step (summed over processes): the run card's tokens/s
        include_num_input_tokens_seen="non_padding",
        # DDP: every LoRA weight gets a gradient each step, so DDP need not search the graph for unused ones
        ddp_find_unused_parameters=False,
    )


def make_trainer(tcfg: TrainConfig, model: Any, tok: Any, train_ds: Any, eval_ds: Any, output_dir: str | os.PathLike, *,
                 on_cuda: bool = False, backend: str = "cpu", resumed: bool = False, progress: bool = True,
                 callbacks: Sequence[Any] = ()) -> Any:
    """An `SFTTrainer` over prepared datasets (TRL tokenizes, masks the prompt and builds labels here)."""
    from transformers import EarlyStoppingCallback
    from trl import SFTTrainer

    if not progress:
        import datasets

        datasets.disable_progress_bars()
    args = sft_config(tcfg, output_dir, on_cuda=on_cuda, backend=backend, eval_on=eval_ds is not None,
                      resumed=resumed, progress=progress)
    cbs = list(callbacks)
    if tcfg.early_stopping_patience is not None:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=tcfg.early_stopping_patience))
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok, callbacks=cbs)
    handler = trainer.accelerator.ddp_handler
    if tcfg.ddp_grad_dtype and handler is not None and args.world_size > 1:
        from accelerate.utils import DDPCommunicationHookType

        # PyTorch's compression hook: gradients cast to 16 bits for the all-reduce, back to fp32 after (LoRA's ~42M
        # gradients of an 8B model are ~170 MB a step in fp32). Registered when the Trainer wraps the model in DDP.
        handler.comm_hook = DDPCommunicationHookType.BF16 if tcfg.ddp_grad_dtype == "bf16" else DDPCommunicationHookType.FP16
    return trainer


def step_timer() -> Any:
    """A Trainer callback that records the wall time of every optimizer step (CUDA-synchronised) in `.times`."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._t0 = 0.0

        @staticmethod
        def _sync() -> None:
            import torch

            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sync()
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._sync()
            self.times.append(time.perf_counter() - self._t0)

    return StepTimer()


def step_summary(step_times: Sequence[float], tokens_seen: int, steps: int, warmup: int = 2) -> dict[str, Any]:
    """Median s/step after `warmup` steps and tokens/s (non-padding tokens of all processes per second of steps)."""
    import statistics

    if not step_times:
        return {"median_step_seconds": None, "tokens_per_second": None}
    timed = list(step_times[warmup:]) or list(step_times)
    med = statistics.median(timed)
    per_step = tokens_seen / max(1, steps)
    return {"median_step_seconds": round(med, 4), "tokens_per_second": round(per_step / med, 1) if med > 0 else None}


def _track_data_dir(cfg: TrainConfig, track: str) -> str:
    return cfg.data_dir if track == "llama" else cfg.cot_dir


def run_train(
    cfg: TrainConfig,
    track: str,
    data_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    profile: str = "cpu",
    max_steps: int | None = None,
    resume: bool = True,
    force: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """Train one track and write adapter, run card, loss history and plots into `out_dir`.

    A finished run with the same settings and data is not redone (its run card is returned with
    `skipped: true`). With `resume`, an interrupted run continues from its last checkpoint when the
    settings that shape training match; otherwise training starts over.

    Args:
        cfg: the `train` section (both tracks).
        track: `llama` or `deepseek`.
        data_dir: folder with train/validation parquet (default: cfg.data_dir or cfg.cot_dir).
        out_dir: run folder (default: `<cfg.models_dir>/<track>`).
        profile: profile name, recorded in the run card.
        max_steps: overrides the track's max_steps.
        resume: continue from the last compatible checkpoint, if any.
        force: retrain even if a finished run matches.
        progress: show tqdm bars.
        callbacks: extra `transformers.TrainerCallback`s (tests use one to interrupt a run).

    Returns:
        The run card dict (also in `<out_dir>/run_card.json`), with `out_dir` added.
    """
    tcfg = cfg.for_track(track)
    profile = Path(profile).stem if str(profile).endswith((".yaml", ".yml")) else str(profile)
    if max_steps is not None:
        tcfg = dataclasses.replace(tcfg, max_steps=max_steps)
    data = Path(data_dir or _track_data_dir(tcfg, track))
    out = Path(out_dir or Path(tcfg.models_dir) / track)
    train_df = load_track_split(track, data, "train")
    val_path = data / "validation.parquet"
    val_df = load_track_split(track, data, "validation") if val_path.is_file() else None
    dhash = data_hash([data / "train.parquet"] + ([val_path] if val_df is not None else []))
    fp = _fingerprint(tcfg, track, dhash, _NOT_IN_FINGERPRINT)
    resume_key = _fingerprint(tcfg, track, dhash, _NOT_IN_RESUME_KEY)

    card_path = out / "run_card.json"
    if not force and card_path.is_file() and (out / "adapter_config.json").is_file():
        old = read_json(card_path)
        if old.get("fingerprint") == fp:
            log.info("train %s: %s already holds a finished run with these settings; skipping (force=True retrains)", track, out)
            return {**old, "skipped": True, "out_dir": str(out)}

    if tcfg.device == "cuda":
        from prodtune.gpu import require_cuda

        require_cuda(profile)
    if tcfg.backend in ("auto", "unsloth") and tcfg.device != "cpu":
        from prodtune.gpu import preload_unsloth

        preload_unsloth()  # (CUDA only) unsloth must patch transformers before the imports below
    import torch
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    if tcfg.num_threads:
        torch.set_num_threads(tcfg.num_threads)
    ckpt_dir = out / "checkpoints"
    resume_from = None
    key_file = ckpt_dir / "resume_key.json"
    if resume and last_checkpoint(ckpt_dir):
        if key_file.is_file() and read_json(key_file).get("resume_key") == resume_key:
            resume_from = last_checkpoint(ckpt_dir)
            log.info("train %s: resuming from %s", track, resume_from)
        else:
            log.warning("train %s: checkpoints in %s were made with other settings or data; starting over", track, ckpt_dir)
    main = D.is_main()  # with several processes (DDP) only rank 0 touches files; the others read
    if main:
        if resume_from is None and ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        card_path.unlink(missing_ok=True)  # an older run's card must not vouch for a run that may now be interrupted
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(key_file, {"resume_key": resume_key, "track": track})

    t0 = time.perf_counter()
    on_cuda = tcfg.backend != "cpu" and (tcfg.device == "cuda" or (tcfg.device == "auto" and torch.cuda.is_available()))
    if on_cuda:
        if D.world_size() == 1 and torch.cuda.device_count() > 1:
            log.info("train %s: %d GPUs visible in one process: the Trainer splits each batch over them (DataParallel); "
                     "--num-gpus %d (DDP) is faster, CUDA_VISIBLE_DEVICES=0 keeps to one", track, torch.cuda.device_count(),
                     torch.cuda.device_count())
        if D.world_size() > 1:
            torch.cuda.set_device(D.local_rank())  # each process loads its copy onto its own GPU
        torch.cuda.reset_peak_memory_stats()
    model, tok, backend = MD.load_train_model(
        tcfg.base_model, max_seq_length=tcfg.max_seq_length, lora=tcfg.lora(), load_in_4bit=tcfg.load_in_4bit,
        # on CPU the weights stay float32 and bf16/fp16 only switch on the Trainer's autocast
        dtype=("bfloat16" if tcfg.bf16 else "float16" if tcfg.fp16 else None) if on_cuda else None,
        gradient_checkpointing=tcfg.gradient_checkpointing, backend=tcfg.backend, device="cuda" if on_cuda else "cpu",
    )
    if tcfg.max_train_rows:
        train_df = train_df.iloc[: tcfg.max_train_rows]
    train_ds, train_counts = build_dataset(track, train_df, tok, tcfg.max_seq_length, tcfg.loss_on)
    eval_ds, eval_counts = None, {"rows": 0, "truncated": 0, "dropped": 0}
    if val_df is not None and len(val_df):
        if tcfg.max_eval_rows:
            val_df = val_df.iloc[: tcfg.max_eval_rows]
        eval_ds, eval_counts = build_dataset(track, val_df, tok, tcfg.max_seq_length, tcfg.loss_on)
    n_tokens = sum(len(tok(P.full_text(r) if "prompt" in r else r["text"])["input_ids"]) for r in train_ds)
    log.info("train %s: %d train rows (%d cut to fit, %d dropped), %d validation rows, %.0f tokens/row",
             track, train_counts["rows"], train_counts["truncated"], train_counts["dropped"], eval_counts["rows"],
             n_tokens / max(1, train_counts["rows"]))

    eval_on = eval_ds is not None
    timer = step_timer()
    cbs = [timer, *(callbacks or [])]
    if main:
        cbs.insert(0, TensorBoardCallback(SummaryWriter(str(out / "tensorboard"))))
    trainer = make_trainer(tcfg, model, tok, train_ds, eval_ds, ckpt_dir, on_cuda=on_cuda, backend=backend,
                           resumed=resume_from is not None, progress=progress, callbacks=cbs)
    t_train = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.perf_counter() - t_train
    step = trainer.state.global_step
    if eval_on and not any("eval_loss" in e and e.get("step") == step for e in trainer.state.log_history):
        trainer.evaluate()  # the curve ends with a validation point at the final step (every process takes part)

    # -- save ------------------------------------------------------------------------------------
    trainer.save_model(str(out))  # rank 0 only; a peft model saves only the adapter (+ adapter_config.json)
    hist = loss_history(trainer.state.log_history)
    steps_this_run = trainer.state.global_step - (int(resume_from.name.split("-")[-1]) if resume_from else 0)
    world = trainer.args.world_size
    tokens_seen = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    card = {
        "track": track,
        "profile": profile,
        "base_model": tcfg.base_model,
        "backend": backend,
        "loss_on": tcfg.loss_on,
        "prompt_version": P.PROMPT_VERSION,
        "data_dir": str(data),
        "data_hash": dhash,
        "fingerprint": fp,
        "rows": {"train": train_counts, "validation": eval_counts},
        "train_tokens_per_epoch": n_tokens,
        "steps": trainer.state.global_step,
        "epochs": round(float(trainer.state.epoch or 0.0), 3),
        "resumed_from": str(resume_from) if resume_from else None,
        "train_loss": hist["train_loss"],
        "eval_loss": hist["eval_loss"],
        "final_train_loss": hist["train_loss"][-1]["loss"] if hist["train_loss"] else None,
        "final_eval_loss": hist["eval_loss"][-1]["loss"] if hist["eval_loss"] else None,
        "mean_train_loss": float(result.training_loss),
        "seconds": round(time.perf_counter() - t0, 2),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(1, steps_this_run), 3),
        # per-step wall times of this run (warm-up included) and the steady-state figures derived from them
        "step_seconds": [round(t, 4) for t in timer.times],
        **step_summary(timer.times, tokens_seen, steps_this_run),
        "tokens_seen": tokens_seen,
        "processes": world,
        # rows per optimizer step over all processes (and over all GPUs of a DataParallel process)
        "global_batch_size": trainer.args.train_batch_size * tcfg.gradient_accumulation_steps * world,
        "peak_memory_gb": _peak_memory_gb(),
        "peak_memory_kind": "cuda_reserved" if on_cuda else "process_rss",
        "device": torch.cuda.get_device_name(0) if on_cuda else f"cpu x{torch.get_num_threads()} threads",
        "versions": _versions(),
        "config": describe(tcfg),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if main:
        tok.save_pretrained(str(out))
        _save_history(out, hist)
        if tcfg.merge_16bit:
            card["merged_16bit"] = str(merge_16bit(model, tok, out / "merged_16bit", backend, tcfg))
        save_loss_plots(out, card)
        write_json(card_path, card)
        if not tcfg.keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()  # the others return once rank 0 has written the run
    log.info("train %s: %d steps in %.0fs (%.2f s/step), loss %.3f -> %.3f, eval %s; wrote %s", track, card["steps"],
             card["seconds"], card["seconds_per_step"], hist["train_loss"][0]["loss"] if hist["train_loss"] else float("nan"),
             card["final_train_loss"] or float("nan"), card["final_eval_loss"], out)
    return {**card, "skipped": False, "out_dir": str(out)}


def merge_16bit(model: Any, tok: Any, dest: Path, backend: str, tcfg: TrainConfig) -> Path:
    """Save base + adapter merged into one 16-bit model (for vLLM, llama.cpp conversion, the hub)."""
    import torch

    if dest.exists():
        shutil.rmtree(dest)
    if backend == "unsloth":
        model.save_pretrained_merged(str(dest), tok, save_method="merged_16bit")  # dequantises the 4-bit base
        return dest
    if backend == "cpu":
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(MD.resolve_model_id(tcfg.base_model), dtype=torch.float32)
        merged = PeftModel.from_pretrained(base, str(dest.parent)).merge_and_unload()  # merge in fp32, then cast
        merged.to(torch.bfloat16 if tcfg.bf16 else torch.float16).save_pretrained(str(dest))
        tok.save_pretrained(str(dest))
        return dest
    raise NotImplementedError("merging a bitsandbytes 4-bit base needs unsloth (backend=unsloth) or a 16-bit base reload")


def train_reference_recipe(profile: str, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                           overrides: Sequence[str] | None = None) -> Path:
    """Train the study's recipe (loss on the whole text) with the Llama track's settings; return the run folder."""
    cfg = train_config(profile, overrides)
    cfg = dataclasses.replace(cfg, llama={**cfg.llama, "loss_on": "all"})
    run_train(cfg, "llama", data_dir, out_dir, profile=profile, progress=False)
    return Path(out_dir)


# ----------------------------------------------------------------------------------------------
# Before / after comparison (notebooks 03/04)
# ----------------------------------------------------------------------------------------------


def before_after(
    run_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    *,
    split: str = "validation",
    n_rows: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int | None = None,
    max_batch_tokens: int | None = MD.DEFAULT_MAX_BATCH_TOKENS,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate for a split with the base model and with the fine-tuned adapter; score ROUGE-L against references.

    Both come from one loaded model (`disable_adapter()` gives the base). Greedy decoding, stop at EOS.
    Results are cached in `<run_dir>/before_after_<split>.json`, keyed by the run's fingerprint and settings.

    Args:
        run_dir: a finished training run (adapter + run_card.json).
        data_dir: data folder (default: the run card's).
        split: which split to generate for.
        n_rows: first N rows only (None: all).
        max_new_tokens: longest generation.
        batch_size: prompts per generate call; None: 64 on CPU (decoding is memory-bound there, so one big batch
            costs about what a batch of 8 does), 8 on CUDA (the KV cache of an 8B model must fit 8 GB cards).
        max_batch_tokens: also cap rows x (prompt + max_new_tokens) per batch: long R1 completions go fewer at a time.
        progress: tqdm bars.

    Returns:
        `{"rouge_l_before", "rouge_l_after", "n", "rows": [{title/question, reference, before, after, rouge...}], ...}`.
    """
    from prodtune.metrics import rouge_l

    run = Path(run_dir)
    card = read_json(run / "run_card.json")
    track = card["track"]
    df = load_track_split(track, data_dir or card["data_dir"], split)
    if n_rows:
        df = df.iloc[:n_rows]
    key = {"fingerprint": card["fingerprint"], "steps": card["steps"], "split": split, "n": len(df),
           "max_new_tokens": max_new_tokens, "prompt_version": P.PROMPT_VERSION, "data_hash": card["data_hash"]}
    cache = run / f"before_after_{split}.json"
    if cache.is_file():
        old = read_json(cache)
        if old.get("key") == key:
            return old
    rows = df.to_dict("records")
    prompts = [P.inference_prompt(track, r) for r in rows]
    refs = [P.reference_answer(track, r) for r in rows]
    model, tok = MD.load_for_inference(card["base_model"], run)
    if batch_size is None:
        batch_size = 8 if next(model.parameters()).is_cuda else 64
    with model.disable_adapter():
        before = MD.generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                             max_batch_tokens=max_batch_tokens, progress=progress, desc="base model")
    after = MD.generate(model, tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                        max_batch_tokens=max_batch_tokens, progress=progress, desc="fine-tuned")
    out_rows = []
    for r, ref, b, a in zip(rows, refs, before, after):
        ans_b, ans_a = P.parse_answer(track, b["text"]), P.parse_answer(track, a["text"])
        out_rows.append({
            "uid": r.get("uid"), "input": r["title"] if track == "llama" else r["Question"], "reference": ref,
            "before": ans_b, "after": ans_a, "after_full": a["text"],
            "rouge_l_before": rouge_l(ans_b, ref), "rouge_l_after": rouge_l(ans_a, ref),
            "finished_before": b["finished"], "finished_after": a["finished"],
            "tokens_before": b["new_tokens"], "tokens_after": a["new_tokens"],
        })
    n = len(out_rows)
    res = {
        "key": key, "track": track, "split": split, "n": n,
        "rouge_l_before": sum(r["rouge_l_before"] for r in out_rows) / max(1, n),
        "rouge_l_after": sum(r["rouge_l_after"] for r in out_rows) / max(1, n),
        "stopped_at_eos_before": sum(r["finished_before"] for r in out_rows) / max(1, n),
        "stopped_at_eos_after": sum(r["finished_after"] for r in out_rows) / max(1, n),
        "seconds_before": sum(b["seconds"] for b in before), "seconds_after": sum(a["seconds"] for a in after),
        "rows": out_rows,
    }
    write_json(cache, res)
    log.info("before/after on %s (%d rows): ROUGE-L %.3f -> %.3f; wrote %s", split, n, res["rouge_l_before"],
             res["rouge_l_after"], cache)
    return res


def before_after_table(res: dict[str, Any], n: int = 5, width: int = 160) -> Any:
    """The first `n` rows of a before/after result as a DataFrame with texts cut to `width` characters."""
    import pandas as pd

    cols = ["input", "reference", "before", "after", "rouge_l_before", "rouge_l_after"]
    df = pd.DataFrame(res["rows"][:n], columns=cols)
    for c in ("input", "reference", "before", "after"):
        df[c] = df[c].str.slice(0, width)
    return df.round(3)


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register `prodtune train`."""
    p = sub.add_parser("train", help="stages 03/04: LoRA fine-tuning (llama or deepseek track)")
    p.add_argument("--track", choices=TRACKS, required=True)
    p.add_argument("--data", help="train/validation parquet folder (default: the profile's prepared or cot folder)")
    p.add_argument("--out", help="run folder (default: <models_dir>/<track>)")
    p.add_argument("--max-steps", type=int, help="override the track's max_steps")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in <out>/checkpoints")
    p.add_argument("--force", action="store_true", help="retrain even if <out> holds a finished run")
    p.add_argument("--merge", action="store_true", help="also save a merged 16-bit model")
    p.add_argument("--num-gpus", type=int, default=1, metavar="N",
                   help="data-parallel processes, one per GPU (accelerate + configs/accelerate/ddp.yaml); on a CPU "
                        "profile, N gloo processes")
    p.set_defaults(func=_cli)


def launch_ddp(cfg: TrainConfig, track: str, num_gpus: int, argv: Sequence[str]) -> int:
    """Re-run `prodtune train <argv>` in `num_gpus` processes (DDP); GPUs where the profile trains on CUDA."""
    from prodtune.gpu import cuda_available, require_cuda

    tcfg = cfg.for_track(track)
    if tcfg.device == "cuda":
        require_cuda(f"--num-gpus {num_gpus}")
    cpu = tcfg.backend == "cpu" or tcfg.device == "cpu" or not cuda_available()
    if not cpu:
        import torch

        have = torch.cuda.device_count()
        if num_gpus > have:
            raise ConfigError(f"--num-gpus {num_gpus}: this machine has {have} CUDA device(s)")
    if tcfg.merge_16bit:
        log.warning("--merge with --num-gpus: the merged model is written by rank 0 only")
    return D.relaunch(num_gpus, ["train", *D.strip_option(argv, "--num-gpus")], cpu=cpu)


def _cli(args: Any) -> int:
    cfg = train_config(args.profile, args.set, merge_16bit=True if args.merge else None)
    if args.num_gpus < 1:
        raise ConfigError("--num-gpus must be >= 1")
    if args.num_gpus > 1 and not D.is_launched():
        return launch_ddp(cfg, args.track, args.num_gpus, args.argv)
    card = run_train(cfg, args.track, args.data, args.out, profile=args.profile, max_steps=args.max_steps,
                     resume=args.resume, force=args.force)
    keep = ("track", "profile", "base_model", "backend", "steps", "final_train_loss", "final_eval_loss", "seconds",
            "seconds_per_step", "peak_memory_gb", "skipped", "out_dir")
    if D.is_main():
        print(json.dumps({k: card.get(k) for k in keep}))
    return 0
