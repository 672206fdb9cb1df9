"""Export a trained run: base + LoRA merged into one 16-bit model, or a GGUF file (plus an Ollama Modelfile).

    prodtune export --run models/cpu/llama --to merged                  # -> models/cpu/llama/export/merged/
    prodtune export --run models/cpu/llama --to gguf --ollama           # -> .../export/gguf/llama-f16.gguf + Modelfile
    prodtune export --run models/cpu/deepseek --to gguf --quant q8_0 --ollama
    ollama create prodtune-llama -f models/cpu/llama/export/gguf/Modelfile && ollama run prodtune-llama "<title>"

The merged export streams (`merge_stream`): the base's safetensors are read one tensor at a time, a bitsandbytes
4-bit tensor (`*-bnb-4bit` bases) is dequantised, its LoRA pair is added in float32 and the sum is rounded once, so an
8B run merges on the T4 or RTX 4060 that trained it or on a CPU, for runs of the unsloth and the transformers +
bitsandbytes backends alike: for the Llama-3-8B nf4 shape on the lent H100 under an 8 GB cap, 1.07 GiB of GPU memory
reserved (1.74 GiB with the CUDA context) and a 7.9 GiB peak RSS, in 32-38 s, where `--method load` needed 19.3 GiB;
for the bnb run the two wrote identical weights (benchmarks/README.md, `bench_export_gpu.py`). What it cannot stream
(a GGUF base such as the embedded SmolLM2, DoRA) and the GGUF export use peft's `merge_and_unload` on a loaded 16-bit
(on CPU, float32) copy of the base (`merge_run`). The GGUF is written with the `gguf` package (llama.cpp's
own writer; nothing is built or downloaded) for the Llama architecture, as llama.cpp's `convert_hf_to_gguf.py` writes
it: tensor names from `gguf.get_tensor_name_map`, Q/K rows permuted to llama.cpp's rotary layout, norms in F32, the
GPT-2-style BPE vocabulary with its merges, the tokenizer's EOS (what every training example ends with), and the
track's chat template (`prodtune.prompts.chat_template`). The Modelfile's TEMPLATE, stop strings and parameters come
from the same prompts and the run card.

Every file is written into a temporary folder inside `<run>/export/` and moved into place at the end: a failed or
interrupted export leaves the run folder as it was (an older export included).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

from prodtune import merge_stream as MS
from prodtune import models as MD
from prodtune import prompts as P
from prodtune.gpu import cuda_supports_bf16
from prodtune.assistant import generation_settings, read_card
from prodtune.io import UserError, log, write_text

TARGETS = ("merged", "gguf")
QUANTS = ("f16", "q8_0")
DTYPES = ("float16", "bfloat16")
METHODS = ("auto", "stream", "load")


# ----------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------


def is_quantized_checkpoint(base_id: str) -> bool:
    """True when a base checkpoint stores bitsandbytes weights (its config has a `quantization_config`)."""
    from transformers import AutoConfig

    return getattr(AutoConfig.from_pretrained(base_id), "quantization_config", None) is not None


def merge_run(run_dir: str | os.PathLike, *, device: str = "auto", dtype: str | None = None) -> tuple[Any, Any, dict]:
    """Load a run's base model and adapter and merge them (peft `merge_and_unload`).

    On CPU the base is loaded in float32 and merged there (one rounding, at save time). On CUDA it is loaded in
    `dtype`; a base that exists only in bitsandbytes 4-bit (`*-bnb-4bit`) is loaded that way and dequantised
    (`model.dequantize()`) before the adapter is merged, since peft cannot merge into 4-bit weights without rounding
    them again.

    Args:
        run_dir: folder written by `prodtune train`.
        device: `"auto"`, `"cpu"` or `"cuda"`.
        dtype: weights' dtype on CUDA (default bfloat16 where supported, else float16).

    Returns:
        `(merged_model, tokenizer, run_card)`; the model is a plain `LlamaForCausalLM` (no peft wrapper).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    card = read_card(run_dir)
    on_cuda = device == "cuda" or (device == "auto" and MD.cuda_available())
    base_id = MD.resolve_model_id(card["base_model"])
    tok = MD.load_tokenizer(run_dir if (Path(run_dir) / "tokenizer_config.json").is_file() else base_id)
    quantized = is_quantized_checkpoint(base_id)
    if on_cuda:
        dtype = dtype or ("bfloat16" if cuda_supports_bf16() else "float16")  # a T4: float16
        base = AutoModelForCausalLM.from_pretrained(base_id, device_map={"": 0}, dtype=getattr(torch, dtype))
        if quantized or getattr(base, "hf_quantizer", None) is not None:
            log.info("dequantising the 4-bit base %s to %s before merging", base_id, dtype)
            base = base.dequantize()
            base.to(getattr(torch, dtype))
            drop_load_conversions(base)
    else:
        if quantized:
            raise UserError(f"{card['base_model']} holds bitsandbytes 4-bit weights, which load only on a CUDA GPU; "
                            "export this run on a GPU machine")
        base = AutoModelForCausalLM.from_pretrained(base_id, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, str(run_dir)).merge_and_unload()
    merged.eval()
    # What the exported model stops on and is prompted with: the tokenizer's EOS and the track's template.
    merged.generation_config.eos_token_id = tok.eos_token_id
    merged.generation_config.pad_token_id = tok.pad_token_id
    merged.config.eos_token_id = tok.eos_token_id
    tok.chat_template = P.export_chat_template(card["track"], tok)  # deepseek: the template it trained through
    return merged, tok, card


def drop_load_conversions(model: Any) -> None:
    """Forget the weight conversions a 4-bit checkpoint was loaded through, once the model is dequantised.

    transformers 5 records how each checkpoint tensor was converted on load (`model._weight_conversions`) and
    reverses that on `save_pretrained`; bitsandbytes' deserialisation has no reverse, and `dequantize()` leaves it
    recorded, so saving a dequantised base raises NotImplementedError (seen on the lent H200, transformers 5.17).
    The dequantised weights need no conversion: irreversible entries are dropped, renamings are kept.
    """
    convs = getattr(model, "_weight_conversions", None)
    if not convs:
        return
    keep = []
    for conv in convs:
        try:
            conv.reverse_transform()
        except NotImplementedError:
            log.info("export: dropping the load-time conversion %s (nothing left to convert after dequantising)",
                     getattr(conv, "source_patterns", conv))
            continue
        keep.append(conv)
    model._weight_conversions = keep


def write_merged(model: Any, tok: Any, dest: Path, dtype: str) -> None:
    """Save a merged model in `dtype` (safetensors) with its tokenizer into `dest`."""
    import torch

    model.to(getattr(torch, dtype)).save_pretrained(str(dest))
    tok.save_pretrained(str(dest))


# ----------------------------------------------------------------------------------------------
# GGUF
# ----------------------------------------------------------------------------------------------


def _permute(w: Any, n_head: int, n_head_kv: int | None) -> Any:
    """llama.cpp's rotary layout for Q/K rows (`LlamaModel.permute` in convert_hf_to_gguf.py); transformers'
    GGUF loader undoes it (`LlamaTensorProcessor._reverse_permute_weights`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tokenizer_pre(tok: Any) -> str:
    """llama.cpp's pre-tokenizer name for a BPE tokenizer (`tokenizer.ggml.pre`), read from its pre-tokenizer.

    `llama-bpe` (Llama 3 and the DeepSeek R1 Llama distills: one Split regex with `\\p{N}{1,3}`), `smollm` (digits
    split, then GPT-2's byte-level regex, as SmolLM2 on the Hub), `gpt-2` (the byte-level regex alone: the embedded
    SmolLM2, whose tokenizer transformers rebuilt from a GGUF, so what its adapters were trained on).
    """
    pre = json.loads(tok.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    kinds = [p.get("type") for p in parts]
    text = json.dumps(pre)
    if "Split" in kinds and "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    raise UserError(f"no llama.cpp pre-tokenizer name known for this tokenizer's pre-tokenizer {kinds}: the GGUF would "
                    "split text differently from training")


def _vocab(tok: Any, n_vocab: int) -> tuple[list[str], list[int]]:
    """Tokens and token types, as llama.cpp's `get_vocab_base`: added special tokens CONTROL, other added tokens
    USER_DEFINED, ids past the tokenizer (padded embedding rows) UNUSED `[PAD<id>]`."""
    import gguf

    reverse = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(reverse[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _rope_freqs(cfg: Any, head_dim: int) -> Any | None:
    """Llama 3.1's `rope_freqs` tensor (per-frequency divisors), as llama.cpp writes it; None without llama3 scaling."""
    import numpy as np

    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) != "llama3":
        return None
    base = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / high:
            out.append(1.0)
        elif wavelen > old_ctx / low:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _gguf_tensors(model: Any, quant: str) -> Iterator[tuple[str, Any, Any]]:
    """(gguf name, data, raw dtype or None) of every tensor, converted as llama.cpp's convert script does."""
    import gguf
    import numpy as np

    cfg = model.config
    n_head, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue  # tied: llama.cpp reads the head from token_embd (no output.weight), as transformers does
        stem, suffix = hf_name.rsplit(".", 1)
        name = names.get_name(stem)
        if name is None:
            raise UserError(f"GGUF export: tensor {hf_name} has no llama.cpp name (not a Llama-architecture model?)")
        data = t.detach().float().cpu().numpy()
        if stem.endswith("q_proj"):
            data = _permute(data, n_head, n_head)
        elif stem.endswith("k_proj"):
            data = _permute(data, n_head, n_kv)
        name = f"{name}.{suffix}"
        if data.ndim <= 1:  # norms and biases stay F32 (llama.cpp does the same)
            yield name, data.astype(np.float32), None
        elif quant == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            yield name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
        else:  # f16, or a row too short for Q8_0 blocks (llama.cpp's fallback too)
            yield name, data.astype(np.float16), None


def write_gguf(model: Any, tok: Any, path: Path, *, track: str, quant: str = "f16", name: str = "prodtune") -> None:
    """Write a merged Llama-architecture model and its tokenizer as one GGUF file.

    Args:
        model: merged `LlamaForCausalLM` (any float dtype).
        tok: its tokenizer (GPT-2-style byte-level BPE, as SmolLM2's and Llama 3's).
        path: file to write.
        track: `llama` or `deepseek`: which chat template goes in.
        quant: `f16` or `q8_0`.
        name: `general.name`.
    """
    import gguf

    if quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    cfg = model.config
    if cfg.model_type != "llama":
        raise UserError(f"GGUF export writes the Llama architecture; this model is {cfg.model_type!r}")
    if tok.backend_tokenizer.model.__class__.__name__ != "BPE":
        raise UserError("GGUF export writes GPT-2-style BPE tokenizers (SmolLM2, Llama 3); this one is not BPE")
    pre = tokenizer_pre(tok)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))
    w = gguf.GGUFWriter(str(path), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if quant == "f16" else gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(rope_theta))
    w.add_rope_dimension_count(head_dim)
    if head_dim != cfg.hidden_size // cfg.num_attention_heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
    elif rope.get("rope_type") not in (None, "default", "llama3"):
        raise UserError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported")
    w.add_vocab_size(cfg.vocab_size)
    # Tokenizer: gpt2-style BPE, merges and special ids from the run's tokenizer files (llama.cpp's SpecialVocab).
    tokens, types = _vocab(tok, cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=len(tokens))
    # The EOS every training example ends with (a wrong one means endless replies), the pad, and the track's template.
    special.special_token_ids.update(eos=tok.eos_token_id, pad=tok.pad_token_id)
    for key, tid in (("bos", tok.bos_token_id), ("unk", tok.unk_token_id)):
        if tid is not None:
            special.special_token_ids[key] = tid
    bos_added = bool(tok.bos_token_id is not None and tok("a")["input_ids"][:1] == [tok.bos_token_id])
    special.add_special_token = {"bos": bos_added, "eos": False}
    special.chat_template = P.export_chat_template(track, tok)
    special.add_to_gguf(w, quiet=True)
    freqs = _rope_freqs(cfg, head_dim)
    if freqs is not None:
        w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", freqs)
    for tname, data, raw in _gguf_tensors(model, quant):
        w.add_tensor(tname, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def modelfile(track: str, gguf_name: str, tok: Any, card: dict[str, Any]) -> str:
    """An Ollama Modelfile for a GGUF of the track: TEMPLATE from `prompts.ollama_template`, stops from
    `prompts.stop_strings` (EOS and the start of a next turn), decoding settings from the run card (greedy unless it says else)."""
    gen = generation_settings(card)
    ctx = int((card.get("config") or {}).get("max_seq_length") or 2048)
    lines = [
        f"# Ollama Modelfile of the prodtune {track} track ({card.get('base_model')}), written by `prodtune export`.",
        f"#   ollama create prodtune-{track} -f Modelfile && ollama run prodtune-{track}",
        "# Decoding as `prodtune generate` (the run card's settings, greedy unless set; the study sampled at 0.2 for",
        "# the Llama track and 0.7 for the DeepSeek track).",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{P.ollama_template(track, tok)}"""',
    ]
    for stop in P.stop_strings(track, tok):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines += [f"PARAMETER temperature {gen['temperature']}", f"PARAMETER top_p {gen['top_p']}",
              f"PARAMETER num_predict {gen['max_new_tokens']}", f"PARAMETER num_ctx {max(ctx, 2048)}"]
    if gen["temperature"] == 0:
        lines.append("PARAMETER top_k 1")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# The command
# ----------------------------------------------------------------------------------------------


def _size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return round(sum(p.stat().st_size for p in files) / 2**20, 1)


def export(run_dir: str | os.PathLike, *, to: str = "gguf", quant: str = "f16", ollama: bool = False,
           device: str = "auto", dtype: str | None = None, method: str = "auto") -> dict[str, Any]:
    """Export a training run into `<run_dir>/export/`: `merged/` (16-bit safetensors) or `gguf/<track>-<quant>.gguf`.

    Everything is written into `<run_dir>/export/.tmp-*` first and moved into place only when complete; on any
    error the temporary folder is removed and the run folder (an older export included) is left as it was.

    Args:
        run_dir: folder written by `prodtune train`.
        to: `merged` or `gguf`.
        quant: GGUF weights, `f16` or `q8_0` (1-D tensors stay F32).
        ollama: also write `gguf/Modelfile` (GGUF only).
        device: where the merge runs (`auto`, `cpu`, `cuda`).
        dtype: merged weights, `float16` or `bfloat16` (default bfloat16 on a CUDA GPU that has it, else float16).
        method: how `merged` is made: `stream` (`merge_stream`: tensor by tensor from the base's safetensors, a few
            GB of memory whatever the model's size), `load` (peft's `merge_and_unload` on the whole model), `auto`
            (stream where the run allows it, else load).

    Returns:
        `{"to", "path", "seconds", "size_mb", ...}` (and `modelfile`, `quant` for GGUF).
    """

    if to not in TARGETS:
        raise UserError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    if to == "gguf" and quant not in QUANTS:
        raise UserError(f"--quant {quant!r} is not supported; choose one of {', '.join(QUANTS)}")
    if ollama and to != "gguf":
        raise UserError("--ollama writes a Modelfile for the GGUF: use it with --to gguf")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    if method not in METHODS:
        raise UserError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    if method == "stream" and to != "merged":
        raise UserError("--method stream makes the merged export; a GGUF is written from the loaded model")
    run_dir = Path(run_dir)
    card = read_card(run_dir)  # a bad folder fails before anything is loaded or written
    track = card["track"]
    t0 = time.perf_counter()
    model = tok = None
    if to != "merged" or method == "load":
        model, tok, card = merge_run(run_dir, device=device, dtype=dtype)
    export_dir = run_dir / "export"
    made_export_dir = not export_dir.exists()
    export_dir.mkdir(exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=export_dir))
    result: dict[str, Any] = {"to": to, "run": str(run_dir), "track": track, "base_model": card["base_model"]}
    try:
        if to == "merged":
            on_cuda = device == "cuda" or (device == "auto" and MD.cuda_available())
            dtype = dtype or ("bfloat16" if on_cuda and cuda_supports_bf16() else "float16")
            if model is None:
                try:
                    result.update(MS.merge_to_folder(run_dir, tmp / "merged", dtype=dtype, device=device))
                except MS.Unsupported as e:
                    if method == "stream":
                        raise UserError(f"--method stream: {e}") from e
                    log.info("export: %s; merging the loaded model with peft instead", e)
                    shutil.rmtree(tmp / "merged", ignore_errors=True)
                    model, tok, card = merge_run(run_dir, device=device, dtype=dtype)
            if model is not None:
                write_merged(model, tok, tmp / "merged", dtype)
                result["method"] = "load"
            dest = export_dir / "merged"
            old = export_dir / f".merged.old-{os.getpid()}"
            if dest.exists():
                os.replace(dest, old)
            os.replace(tmp / "merged", dest)
            shutil.rmtree(old, ignore_errors=True)
            result.update(path=str(dest), dtype=dtype, size_mb=_size_mb(dest))
        else:
            name = f"{track}-{quant}.gguf"
            write_gguf(model, tok, tmp / name, track=track, quant=quant,
                       name=f"prodtune-{track} ({card['base_model']})")
            files = [name]
            if ollama:
                write_text(tmp / "Modelfile", modelfile(track, name, tok, card))
                files.append("Modelfile")
            dest = export_dir / "gguf"
            dest.mkdir(exist_ok=True)
            for f in files:  # each file replaced atomically; other quantisations already there stay
                os.replace(tmp / f, dest / f)
            result.update(path=str(dest / name), quant=quant, size_mb=_size_mb(dest / name))
            if ollama:
                result["modelfile"] = str(dest / "Modelfile")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if made_export_dir:
            shutil.rmtree(export_dir, ignore_errors=True)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    log.info("export %s: %s (%.1f MB) in %.1fs", to, result["path"], result["size_mb"], result["seconds"])
    return result


def make_parser() -> argparse.ArgumentParser:
    """Flags of `prodtune export`."""
    p = argparse.ArgumentParser(prog="prodtune export", description="merged 16-bit model or GGUF (+ Ollama "
                                "Modelfile) of a trained run, written into <run>/export/")
    p.add_argument("--run", required=True, metavar="DIR", help="training run folder (adapter + run_card.json)")
    p.add_argument("--to", required=True, choices=TARGETS, help="merged: 16-bit safetensors; gguf: one GGUF file")
    p.add_argument("--quant", default="f16", help=f"GGUF weights: {' | '.join(QUANTS)} (default f16)")
    p.add_argument("--ollama", action="store_true", help="also write an Ollama Modelfile next to the GGUF")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="merged weights (default: bfloat16 on a GPU that has it, else float16)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the merge runs")
    p.add_argument("--method", default="auto", choices=METHODS,
                   help="merged: stream (tensor by tensor, little memory), load (peft on the whole model), auto")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    """`prodtune export`."""
    args = make_parser().parse_args(list(argv or []))
    result = export(args.run, to=args.to, quant=args.quant, ollama=args.ollama, device=args.device, dtype=args.dtype,
                    method=args.method)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
