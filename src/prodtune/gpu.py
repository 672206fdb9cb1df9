"""The CUDA path for the real 8B models: unsloth when it imports, else transformers + peft + bitsandbytes.

    python -m prodtune.gpu            # prints what this machine would use (CUDA, bf16, backend, memory)

`load_gpu_model` returns a LoRA-wrapped 4-bit model, in training mode, ready for TRL's SFTTrainer. The backend is
chosen once: `"auto"` takes unsloth and falls back to `"bnb"` (transformers + bitsandbytes nf4 + peft) when unsloth
is not installed or does not import (how the two compare on the 8B shapes: benchmarks/README.md, stages 03/04).

Import order matters: unsloth patches transformers when it is imported, so a process that trains with it should
import unsloth first. `preload_unsloth()` does that (and nothing on a machine without CUDA); call it before anything
imports transformers (the first code cell of notebooks 03/04, the top of a training script).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from typing import Any

from prodtune.io import UserError, log

BACKENDS = ("auto", "unsloth", "bnb")
DTYPES = ("auto", "bfloat16", "float16", "float32")
LORA_KEYS = ("r", "alpha", "dropout", "target_modules", "seed")
# The study's and unsloth's default: LoRA on all seven projections of a Llama block.
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_DEFAULTS: dict[str, Any] = {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": ALL_PROJECTIONS, "seed": 3407}

_UNSLOTH_STATE: tuple[bool, str] | None = None


class CudaRequiredError(UserError, RuntimeError):
    """A GPU profile (or backend) was asked for on a machine where torch sees no CUDA device."""


# ----------------------------------------------------------------------------------------------
# What the machine has
# ----------------------------------------------------------------------------------------------


def cuda_available() -> bool:
    """True when torch is installed with CUDA and sees at least one device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def require_cuda(profile_name: str) -> None:
    """Raise a clear `CudaRequiredError` when `profile_name` needs CUDA and this machine has none.

    Args:
        profile_name: the profile asking (named in the message, e.g. `colab-t4`).

    Raises:
        CudaRequiredError: torch is CPU-only or sees no GPU; the message says how to get one or which profile to use.
    """
    if cuda_available():
        return
    try:
        import torch

        build = f"torch {torch.__version__}, " + (f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build")
    except ImportError:
        build = "torch is not installed"
    on_colab = "google.colab" in sys.modules
    how = (
        "On Colab: Runtime > Change runtime type > T4 GPU, then run the notebook again from the top."
        if on_colab
        else "Install a CUDA build of torch and the GPU requirements (pip install -r requirements-gpu.txt) on a machine "
        "with an NVIDIA GPU,"
    )
    raise CudaRequiredError(
        f"profile {profile_name!r} trains the 8B models on a CUDA GPU, but none is visible here ({build}; "
        f"torch.cuda.is_available() is False). {how} or run the offline CPU profile instead: PROFILE='cpu' in the "
        "notebook, or --profile cpu on the command line."
    )


def cuda_supports_bf16(device: int | None = None) -> bool:
    """True when the GPU computes in bfloat16 natively (compute capability 8.0+: A100, RTX 30xx/40xx, H100).

    `torch.cuda.is_bf16_supported()` answers True on a T4 (7.5) because bf16 can be emulated there, slowly; the
    capability is what decides whether bf16 training is sensible, so it is checked here instead.
    `PRODTUNE_EMULATE_NO_BF16=1` makes a bf16 card answer False, so a T4's fp16 path can be proven on an H100.
    """
    if not cuda_available():
        return False
    if os.environ.get("PRODTUNE_EMULATE_NO_BF16", "").strip() not in ("", "0"):
        return False  # a newer card standing in for a T4 (benchmarks/gpu_pipeline.py): every dtype choice goes fp16
    import torch

    major, _ = torch.cuda.get_device_capability(device)
    return major >= 8


def resolve_dtype(dtype: Any = None, *, bf16_supported: bool | None = None) -> str:
    """Turn a profile's `dtype` (`auto`/None, `bfloat16`, `float16`, `float32` or a torch dtype) into a dtype name.

    `auto` picks bfloat16 where the card has it and float16 elsewhere (T4). Asking for bfloat16 on a card without it
    is an error rather than a silent 10x slowdown.

    Args:
        dtype: the requested dtype.
        bf16_supported: whether the card has bf16 (default: ask `cuda_supports_bf16()`).

    Returns:
        One of `bfloat16`, `float16`, `float32`.
    """
    name = str(dtype).replace("torch.", "") if dtype is not None else "auto"
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
    name = aliases.get(name, name)
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    if bf16_supported is None:
        bf16_supported = cuda_supports_bf16()
    if name == "auto":
        return "bfloat16" if bf16_supported else "float16"
    if name == "bfloat16" and not bf16_supported:
        raise ValueError("dtype bfloat16 was asked for, but this GPU has no native bf16 (a T4 has compute capability 7.5): "
                         "use dtype: float16 (or auto) in the profile")
    return name


def bnb_4bit_config(dtype_name: str) -> Any:
    """The bitsandbytes 4-bit settings of every 16-bit checkpoint quantised on load, for training and inference alike:
    nf4 + double quantisation (the QLoRA recipe, and what unsloth's `-bnb-4bit` checkpoints hold), computing in
    `dtype_name` (`resolve_dtype`'s answer: float16 on a T4)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=getattr(torch, dtype_name))


def free_memory() -> None:
    """Collect unreachable objects (a peft model or a Trainer sits in reference cycles that `del` alone leaves), then
    hand CUDA's cached blocks back to the driver. Call it once the last reference to a model is gone, before the next
    model loads: a T4 or an 8 GB card holds one 8B model in 4-bit, not two."""
    import gc

    gc.collect()
    if cuda_available():
        import torch

        torch.cuda.empty_cache()


def unsloth_status(*, force: bool = False) -> tuple[bool, str]:
    """Try to import unsloth once; return `(importable, reason)`.

    unsloth refuses to import without a GPU (and may fail on a driver or version mismatch); every such failure
    means "use the bnb backend" and the reason is kept for the log. Importing it after transformers still works
    but some patches may not apply, so that is logged as a warning.
    """
    global _UNSLOTH_STATE
    if _UNSLOTH_STATE is not None and not force:
        return _UNSLOTH_STATE
    if not cuda_available():
        _UNSLOTH_STATE = (False, "no CUDA device")
    elif importlib.util.find_spec("unsloth") is None:
        _UNSLOTH_STATE = (False, "unsloth is not installed (pip install -r requirements-gpu.txt)")
    else:
        if "transformers" in sys.modules and "unsloth" not in sys.modules:
            log.warning("unsloth is imported after transformers; call prodtune.gpu.preload_unsloth() first for all its patches")
        try:
            importlib.import_module("unsloth")
            _UNSLOTH_STATE = (True, "unsloth imported")
        except Exception as e:  # noqa: BLE001 - any import failure means: fall back to bnb
            _UNSLOTH_STATE = (False, f"unsloth failed to import: {type(e).__name__}: {e}")
    return _UNSLOTH_STATE


def preload_unsloth() -> bool:
    """Import unsloth now (before transformers) when CUDA and unsloth are present; return whether it imported."""
    ok, reason = unsloth_status()
    log.info("unsloth: %s", reason)
    return ok


def choose_backend(requested: str = "auto", *, unsloth_ok: bool, reason: str = "") -> str:
    """Pick the training backend: the fastest one that is present.

    Args:
        requested: `auto`, `unsloth` or `bnb`.
        unsloth_ok: whether unsloth imports here.
        reason: why it does not (put in the error when `unsloth` was asked for explicitly).

    Returns:
        `unsloth` or `bnb`.
    """
    if requested not in BACKENDS:
        raise ValueError(f"backend {requested!r} is not one of {list(BACKENDS)}")
    if requested == "bnb":
        return "bnb"
    if unsloth_ok:
        return "unsloth"
    if requested == "unsloth":
        raise RuntimeError(f"backend 'unsloth' was asked for but cannot be used: {reason or 'unsloth does not import'}; "
                           "use backend: auto (falls back to transformers+peft+bitsandbytes) or install requirements-gpu.txt")
    return "bnb"


def check_lora(lora: dict[str, Any] | None) -> dict[str, Any]:
    """Fill LoRA defaults (r 16, alpha 16, dropout 0, all 7 projections, seed 3407) and reject unknown keys."""
    lora = dict(lora or {})
    unknown = set(lora) - set(LORA_KEYS)
    if unknown:
        raise ValueError(f"lora: unknown key(s) {sorted(unknown)}; known: {list(LORA_KEYS)}")
    out = {**LORA_DEFAULTS, **{k: v for k, v in lora.items() if v is not None}}
    if int(out["r"]) < 1:
        raise ValueError(f"lora.r must be >= 1, got {out['r']}")
    if not 0.0 <= float(out["dropout"]) < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {out['dropout']}")
    if isinstance(out["target_modules"], str):
        out["target_modules"] = [out["target_modules"]] if out["target_modules"] != "all-linear" else ALL_PROJECTIONS
    out["target_modules"] = list(out["target_modules"])
    return out


def gpu_memory_report(device: int | None = None) -> dict[str, Any]:
    """Memory of the current GPU in GiB: total, free, this process's allocated/reserved and their peaks.

    Returns `{"cuda": False}` where there is no CUDA device, so it can be logged on any machine.
    """
    if not cuda_available():
        return {"cuda": False}
    import torch

    dev = torch.cuda.current_device() if device is None else device
    gib = 2**30
    free, total = torch.cuda.mem_get_info(dev)
    props = torch.cuda.get_device_properties(dev)
    return {
        "cuda": True,
        "device": props.name,
        "capability": ".".join(map(str, torch.cuda.get_device_capability(dev))),
        "total_gib": round(total / gib, 2),
        "free_gib": round(free / gib, 2),
        "allocated_gib": round(torch.cuda.memory_allocated(dev) / gib, 2),
        "reserved_gib": round(torch.cuda.memory_reserved(dev) / gib, 2),
        "peak_allocated_gib": round(torch.cuda.max_memory_allocated(dev) / gib, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved(dev) / gib, 2),
    }


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_gpu_model(
    model_name: str,
    *,
    max_seq_length: int,
    load_in_4bit: bool = True,
    dtype: Any = None,
    lora: dict[str, Any] | None = None,
    gradient_checkpointing: bool | str = True,
    backend: str = "auto",
) -> tuple[Any, Any, str]:
    """Load `model_name` on the GPU, 4-bit, with LoRA adapters, through the fastest backend present.

    Args:
        model_name: hub id (`unsloth/llama-3-8b-bnb-4bit`, `deepseek-ai/DeepSeek-R1-Distill-Llama-8B`) or a local folder;
            pre-quantised bnb-4bit checkpoints load as they are, 16-bit ones are quantised to nf4 on load.
        max_seq_length: longest training sequence (unsloth sizes its RoPE cache and kernels with it).
        load_in_4bit: QLoRA (True) or 16-bit LoRA.
        dtype: compute dtype, `auto`/None = bf16 where the card has it, else fp16 (T4).
        lora: keys r, alpha, dropout, target_modules, seed (defaults: 16, 16, 0.0, all 7 projections, 3407).
        gradient_checkpointing: True = unsloth's offloaded checkpointing ("unsloth" mode) on the unsloth backend and
            non-reentrant torch checkpointing on bnb; "torch" = plain recompute on both; False = off.
        backend: `auto` (unsloth if it imports, else bnb), `unsloth` or `bnb`.

    Returns:
        `(peft_model, tokenizer, backend_used)`, the model in training mode (gradient checkpointing only acts
        then); the tokenizer has a pad token.

    Raises:
        CudaRequiredError: no CUDA device.
    """
    require_cuda(f"backend={backend}")
    lora = check_lora(lora)
    dtype_name = resolve_dtype(dtype)
    if backend in ("auto", "unsloth"):
        ok, reason = unsloth_status()
    else:
        ok, reason = False, "bnb asked for"
    used = choose_backend(backend, unsloth_ok=ok, reason=reason)
    log.info("loading %s on %s with backend %s (%s), %s, max_seq_length %d", model_name, gpu_memory_report().get("device"),
             used, reason, dtype_name, max_seq_length)
    if used == "unsloth":
        model, tok = _load_unsloth(model_name, max_seq_length, load_in_4bit, dtype_name, lora, gradient_checkpointing)
    else:
        model, tok = _load_bnb(model_name, load_in_4bit, dtype_name, lora, gradient_checkpointing)
    if tok.pad_token is None:
        # Llama-3 base ships no pad token; reusing eos would mask the eos label in some collators, so prefer a
        # reserved special token when the vocabulary has one.
        for cand in ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", "<｜▁pad▁｜>"):
            if cand in tok.get_vocab():
                tok.pad_token = cand
                break
        else:
            tok.pad_token = tok.eos_token
    log.info("loaded; %s", gpu_memory_report())
    return model, tok, used


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)


def _load_unsloth(model_name: str, max_seq_length: int, load_in_4bit: bool, dtype_name: str, lora: dict[str, Any],
                  gradient_checkpointing: bool | str) -> tuple[Any, Any]:
    from unsloth import FastLanguageModel  # imported (first) by unsloth_status

    # True -> unsloth's own mode (recompute + activations offloaded to host RAM: the least VRAM); "torch" -> plain
    # recompute kept on the GPU; False -> off.
    gc: bool | str = {True: "unsloth", "torch": True}.get(gradient_checkpointing, gradient_checkpointing)
    model, tok = FastLanguageModel.from_pretrained(
        model_name=model_name, max_seq_length=max_seq_length, dtype=_torch_dtype(dtype_name), load_in_4bit=load_in_4bit,
        use_gradient_checkpointing=gc,
    )
    model = FastLanguageModel.get_peft_model(
        model, r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
        target_modules=lora["target_modules"], bias="none", use_gradient_checkpointing=gc, random_state=int(lora["seed"]),
        max_seq_length=max_seq_length,
    )
    # Checkpointing only acts in training mode; a model left in eval mode keeps every layer's activations
    # (measured: 13.5 instead of ~6 GiB at 2 x 1024 on the 8B shape).
    FastLanguageModel.for_training(model)
    return model, tok


def _load_bnb(model_name: str, load_in_4bit: bool, dtype_name: str, lora: dict[str, Any],
              gradient_checkpointing: bool | str) -> tuple[Any, Any]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = _torch_dtype(dtype_name)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "device_map": {"": torch.cuda.current_device()}, "attn_implementation": "sdpa"}
    if load_in_4bit:
        kwargs["quantization_config"] = bnb_4bit_config(dtype_name)
    model = AutoModelForCausalLM.from_pretrained(model_name, **kwargs)
    tok = AutoTokenizer.from_pretrained(model_name)
    gc = bool(gradient_checkpointing)
    if load_in_4bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(int(lora["seed"]))
    cfg = LoraConfig(r=int(lora["r"]), lora_alpha=int(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                     target_modules=lora["target_modules"], bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)  # adapters in float32 (peft's autocast); see train.trainer.fp32_adapters
    model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
    model.train()  # checkpointing only acts in training mode (from_pretrained returns eval mode)
    return model, tok


def describe_machine() -> dict[str, Any]:
    """What `load_gpu_model(backend="auto")` would do here: CUDA, bf16, the backend and why, memory."""
    ok, reason = unsloth_status()
    info: dict[str, Any] = {"cuda": cuda_available(), "bf16": cuda_supports_bf16(), "unsloth": ok, "reason": reason}
    info["backend"] = choose_backend("auto", unsloth_ok=ok) if info["cuda"] else None
    info["dtype"] = resolve_dtype("auto", bf16_supported=info["bf16"]) if info["cuda"] else None
    info["memory"] = gpu_memory_report()
    info["alloc_conf"] = os.environ.get("PYTORCH_CUDA_ALLOC_CONF")
    return info


def profile_needs_cuda(profile: str) -> bool:
    """True when a profile trains on CUDA (`train.device: cuda`, the GPU profiles)."""
    from prodtune.config import load_profile

    return (load_profile(profile).get("train") or {}).get("device") == "cuda"


def main(argv: list[str]) -> int:
    """`python -m prodtune.gpu [needs-cuda PROFILE | require-cuda PROFILE]` (scripts/setup_env.sh asks these).

    No argument prints what this machine would do; `needs-cuda` exits 0 for a GPU profile, 1 otherwise;
    `require-cuda` exits 0 where CUDA is there, else prints one line saying what to do and exits 2.
    """
    import json

    if not argv:
        print(json.dumps(describe_machine(), indent=2))
        return 0
    cmd, profile = argv[0], (argv[1] if len(argv) > 1 else "cpu")
    try:
        if cmd == "needs-cuda":
            return 0 if profile_needs_cuda(profile) else 1
        if cmd == "require-cuda":
            require_cuda(profile)
            return 0
    except UserError as e:
        print(f"prodtune: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"usage: python -m prodtune.gpu [needs-cuda PROFILE | require-cuda PROFILE]; got {argv}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
