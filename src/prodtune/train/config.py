"""`TrainConfig`: the settings of one training run (stages 03/04), flat, one track per config.

    python -c "from prodtune.config import load_config; from prodtune.train import TrainConfig; \
print(load_config(TrainConfig, 'cpu', track='deepseek'))"

The loader (`prodtune.config.load_config`) merges the profile's `train:` section with its `train.<track>:` sub-mapping
and fills the path templates (`{data_dir}`, `{models_dir}`, `{track}`). Defaults are the cpu profile's Llama track.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from prodtune import prompts as P
from prodtune.config import ConfigError, describe
from prodtune.decoding import DECODING, decoding_settings
from prodtune.models import DEFAULT_TARGET_MODULES, EMBEDDED_EMBEDDER, EMBEDDED_LLM

TRACKS = ("llama", "deepseek")
# Experiment trackers the Trainer reports to (`report_to`); "none" turns reporting off.
REPORTERS = ("tensorboard", "wandb", "mlflow", "trackio", "none")
GRADIENT_CHECKPOINTING = ("false", "true", "torch", "unsloth")
# Settings that do not change what is learned: a finished run is reused when only these differ.
NOT_IN_FINGERPRINT = frozenset({"data_dir", "out_dir", "num_threads", "save_steps", "save_total_limit", "keep_checkpoints",
                                "merge_16bit", "logging_steps", "device", "resume", "force", "progress", "num_gpus",
                                "report_to", "n_eval", *DECODING})  # decoding is not training
# Fields added after runs were made, with the value that means "as before": left out of the fingerprint at that
# value, so an earlier finished run is still recognised as the same run.
ADDED_OFF: dict[str, Any] = {"skip_press_quotes": False}
# ...and a checkpoint may be resumed when only these (or the above) differ.
NOT_IN_RESUME_KEY = NOT_IN_FINGERPRINT | {"max_steps", "num_train_epochs", "early_stopping_patience"}


@dataclass
class TrainConfig:
    """Settings of stages 03/04. Defaults are the offline CPU run of the Llama track (embedded SmolLM2, fp32).

    LoRA and optimiser defaults follow the study and Unsloth: r=16, alpha=16, all 7 projections, lr 2e-4,
    warmup 5, linear decay, seed 3407.
    """

    SECTION: ClassVar[str] = "train"
    TRACKS: ClassVar[tuple[str, ...]] = TRACKS

    track: str = field(default="llama", metadata={
        "help": "llama: Alpaca title -> description (stage 01 data); deepseek: R1 question -> <think>cot</think> answer (stage 02)"})
    data_dir: str = field(default="{data_dir}/prepared", metadata={
        "help": "folder with train.parquet (+ validation.parquet): stage 01's for llama, stage 02's ({data_dir}/cot) for deepseek"})
    out_dir: str = field(default="{models_dir}/{track}", metadata={
        "help": "run folder: adapter, tokenizer, run_card.json, loss history and plots, checkpoints/ while training"})
    base_model: str = field(default=EMBEDDED_LLM, metadata={"help": "hub id, folder or embedded:smollm2-135m-instruct"})
    max_steps: int = field(default=60, metadata={"help": "optimizer steps; -1: use num_train_epochs"})
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs when max_steps is -1"})
    max_seq_length: int = field(default=192, metadata={"help": "tokens per row; completions are cut before EOS to fit"})
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
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES),
                                      metadata={"help": "projections that get LoRA adapters"})
    loss_on: str = field(default="completion", metadata={"help": "completion: response tokens only; all: whole text (study)"})
    skip_press_quotes: bool = field(default=False, metadata={
        "help": "llama track: leave out of training the rows whose description opens with a quotation (press praise, "
                "\"'A wonderful book' The Times\"; data.clean.opens_with_quote), which teach the model to invent "
                "endorsements for every product; they stay in the retrieval catalogue, and validation and test are "
                "untouched"})
    rag_k: int = field(default=0, metadata={
        "help": "llama track: up to K retrieved descriptions of other training products in the training prompt "
                "(retrieval-augmented fine-tuning; the product itself is never among them), as stage 06 and "
                "`prodtune generate --rag` show them; 0: plain prompts (the study)"})
    rag_min_score: float = field(default=0.0, metadata={
        "help": "a neighbour is shown only when its title's cosine similarity to the product's is at least this "
                "(training and inference alike, from the run card); below it the prompt stays plain"})
    rag_max_chars: int = field(default=600, metadata={"help": "longest retrieved description shown, in characters"})
    rag_embedder: str = field(default=EMBEDDED_EMBEDDER, metadata={
        "help": "sentence-transformers model that finds the training neighbours by title (stage 05's embedder)"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "decoding this run is used with (run card `generation`, stage 06, generate/chat/serve): > 1 "
                "discourages repeating tokens; 1.0: off. Chosen on validation (benchmarks/tune_decoding.py)"})
    no_repeat_ngram_size: int = field(default=0, metadata={
        "help": "decoding: never repeat a token n-gram of the text; 0: off. Chosen on validation"})
    think_before_eos: bool = field(default=False, metadata={
        "help": "decoding (DeepSeek track): no EOS before the reply has closed </think> and begun its answer "
                "(decoding.ThinkBeforeEOS). Chosen on validation"})
    min_new_tokens: int = field(default=0, metadata={
        "help": "decoding: no EOS before this many new tokens (a description, not a one-line blurb); 0: off. "
                "Chosen on validation"})
    think_budget: int = field(default=0, metadata={
        "help": "decoding (DeepSeek track): a reply still reasoning after this many tokens writes </think> and answers "
                "(decoding.ThinkBudget, budget forcing); 0: off. Chosen on validation"})
    ground_claims: bool = field(default=False, metadata={
        "help": "decoding: write no number or brand-like word that the prompt (title, retrieved products) does not "
                "hold (decoding.GroundedClaims). Chosen on validation"})
    packing: bool = field(default=False, metadata={"help": "pack rows into max_seq_length blocks (SFTConfig.packing)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (Ampere+ GPUs); slow on CPU"})
    fp16: bool = field(default=False, metadata={"help": "fp16 autocast (T4)"})
    gradient_checkpointing: str = field(default="false", metadata={
        "help": "false | true | torch | unsloth (true: unsloth's offloaded mode on unsloth, torch's elsewhere); off on CPU (27x slower)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "QLoRA 4-bit base weights (CUDA only)"})
    backend: str = field(default="auto", metadata={"help": "auto | unsloth | bnb (CUDA); cpu forces the CPU path"})
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda (cuda: fail clearly without a GPU)"})
    num_threads: int | None = field(default=None, metadata={"help": "torch CPU threads; null: torch's default"})
    num_gpus: int = field(default=1, metadata={
        "help": "data-parallel processes, one per GPU (accelerate, configs/accelerate/ddp.yaml); on CPU, N gloo processes"})
    ddp_grad_dtype: str | None = field(default=None, metadata={
        "help": "DDP (num_gpus > 1): all-reduce gradients in bf16 or fp16 (half the bytes between GPUs); null: fp32"})
    logging_steps: int = field(default=2, metadata={"help": "train loss logged every N steps"})
    eval_steps: int | None = field(default=20, metadata={"help": "validation loss every N steps; null: only at the end"})
    eval_on_start: bool = field(default=True, metadata={"help": "validation loss of the base model at step 0"})
    max_eval_rows: int | None = field(default=24, metadata={"help": "validation rows used for eval loss; null: all"})
    max_train_rows: int | None = field(default=None, metadata={"help": "train rows used; null: all"})
    n_eval: int | None = field(default=None, metadata={
        "help": "validation rows notebooks 03/04 generate with the base model and with the adapter (their before/after "
                "cells, N_EVAL); null: the whole split. `prodtune train` itself generates nothing"})
    save_steps: int = field(default=20, metadata={"help": "checkpoint every N steps (resume point)"})
    save_total_limit: int = field(default=2, metadata={"help": "checkpoints kept"})
    keep_checkpoints: bool = field(default=False, metadata={"help": "keep checkpoints/ after a finished run"})
    resume: bool = field(default=True, metadata={
        "help": "continue from the last checkpoint made with the same settings; checkpoints that do not match are moved "
                "to checkpoints.stale-<time>/, never deleted"})
    force: bool = field(default=False, metadata={"help": "retrain even if out_dir holds a finished run with these settings"})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "stop after N evals without improvement"})
    merge_16bit: bool = field(default=False, metadata={"help": "also save base+adapter merged in 16-bit to merged_16bit/"})
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"], metadata={
        "help": "the Trainer's experiment trackers: tensorboard (into <out_dir>/tensorboard), wandb, mlflow, trackio "
                "(when installed), or none"})
    progress: bool = field(default=True, metadata={"help": "tqdm progress bars"})

    def __post_init__(self) -> None:
        if isinstance(self.gradient_checkpointing, bool):  # built in Python with True/False
            self.gradient_checkpointing = str(self.gradient_checkpointing).lower()
        self.report_to = list(self.report_to)
        choices = {"track": TRACKS, "loss_on": ("completion", "all"), "device": ("auto", "cpu", "cuda"),
                   "backend": ("auto", "unsloth", "bnb", "cpu"), "ddp_grad_dtype": (None, "bf16", "fp16"),
                   "gradient_checkpointing": GRADIENT_CHECKPOINTING}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"TrainConfig.{name}: {getattr(self, name)!r} is not one of "
                                  f"{', '.join('null' if a is None else a for a in allowed)}")
        bad = [r for r in self.report_to if r not in REPORTERS]
        if bad or not self.report_to or ("none" in self.report_to and len(self.report_to) > 1):
            raise ConfigError(f"TrainConfig.report_to: {self.report_to!r}; give one or more of "
                              f"{', '.join(REPORTERS[:-1])}, or none alone")
        if self.bf16 and self.fp16:
            raise ConfigError("TrainConfig.bf16 / fp16: they are exclusive; set at most one to true")
        if self.max_steps == 0 or self.max_steps < -1 or (self.max_steps == -1 and self.num_train_epochs <= 0):
            raise ConfigError("TrainConfig.max_steps: must be > 0, or -1 with num_train_epochs > 0")
        if self.max_seq_length < 32:
            raise ConfigError(f"TrainConfig.max_seq_length: {self.max_seq_length} is too short; must be >= 32")
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "per_device_eval_batch_size",
                     "lora_r", "lora_alpha", "logging_steps", "save_steps", "save_total_limit", "num_gpus"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TrainConfig.{name}: {getattr(self, name)} must be >= 1")
        if self.n_eval is not None and self.n_eval < 1:
            raise ConfigError(f"TrainConfig.n_eval: {self.n_eval} must be >= 1, or null for the whole split")
        if self.rag_k < 0 or self.rag_max_chars < 1 or not -1.0 <= self.rag_min_score <= 1.0:
            raise ConfigError(f"TrainConfig.rag_k / rag_max_chars / rag_min_score: {self.rag_k}, {self.rag_max_chars}, "
                              f"{self.rag_min_score}; need k >= 0, max_chars >= 1, min_score in [-1, 1]")
        if self.rag_k and self.track != "llama":
            raise ConfigError("TrainConfig.rag_k: retrieved context is a Llama-track prompt; set it under train.llama")
        if self.min_new_tokens < 0 or self.think_budget < 0:
            raise ConfigError(f"TrainConfig.min_new_tokens / think_budget: {self.min_new_tokens}, {self.think_budget}; "
                              "need >= 0 (0: off)")
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ConfigError(f"TrainConfig.repetition_penalty / no_repeat_ngram_size: {self.repetition_penalty}, "
                              f"{self.no_repeat_ngram_size}; need a penalty > 0 (1.0: off) and a size >= 0 (0: off)")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"TrainConfig.lora_dropout: {self.lora_dropout} must be in [0, 1)")
        if self.early_stopping_patience is not None:
            if self.eval_steps is None:
                raise ConfigError("TrainConfig.early_stopping_patience: needs eval_steps (a number, not null)")
            if self.save_steps % self.eval_steps:
                raise ConfigError("TrainConfig.save_steps: with early_stopping_patience, save_steps must be a multiple "
                                  "of eval_steps")

    def lora(self) -> dict[str, Any]:
        """The `lora` dict the model loaders take."""
        return {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                "target_modules": list(self.target_modules), "seed": self.seed}

    def rag(self) -> dict[str, Any]:
        """The retrieval settings the run card records and inference reuses (k 0: plain prompts)."""
        return {"k": self.rag_k, "min_score": self.rag_min_score, "max_chars": self.rag_max_chars,
                "embedder": self.rag_embedder}

    def generation(self) -> dict[str, Any]:
        """The decoding settings the run card records (`generation`, as `decoding.decoding_settings` normalises them;
        greedy unless a caller samples): every setting of `decoding.DECODING` is a field of this config."""
        return decoding_settings({k: getattr(self, k) for k in DECODING})

    def checkpointing(self) -> bool | str:
        """`gradient_checkpointing` as the model loaders take it: False, True, "torch" or "unsloth"."""
        return {"false": False, "true": True}.get(self.gradient_checkpointing, self.gradient_checkpointing)

    def check_paths(self) -> None:
        """Raise ConfigError when a path still holds a template (the config was not built by the loader)."""
        for name in ("data_dir", "out_dir"):
            value = getattr(self, name)
            if "{" in value:
                raise ConfigError(f"TrainConfig.{name}: {value!r} still holds a template; build the config with "
                                  f"prodtune.config.load_config(TrainConfig, profile, track=...) or give a real path")


Config = TrainConfig


def fingerprint(cfg: TrainConfig, dhash: str, *, processes: int = 1, resume_key: bool = False) -> str:
    """A short hash of what shapes the trained adapter: settings, data rows, prompt version and process count.

    Args:
        cfg: the run's settings.
        dhash: the data hash (`dataset.data_hash`).
        processes: data-parallel processes (the global batch is per-device batch x accumulation x processes).
        resume_key: leave out what a resumed run may change too (`max_steps`, epochs, early stopping).
    """
    exclude = NOT_IN_RESUME_KEY if resume_key else NOT_IN_FINGERPRINT
    d = {k: v for k, v in describe(cfg).items() if k not in exclude and not (k in ADDED_OFF and v == ADDED_OFF[k])}
    payload = json.dumps({"track": cfg.track, "cfg": d, "data": dhash, "prompt": P.PROMPT_VERSION, "processes": processes},
                         sort_keys=True, default=str)
    return hashlib.blake2b(payload.encode(), digest_size=10).hexdigest()


def field_names() -> list[str]:
    """The names of TrainConfig's fields, in order."""
    return [f.name for f in dataclasses.fields(TrainConfig)]
