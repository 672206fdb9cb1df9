"""A merged 16-bit export that never holds the model: base checkpoint + LoRA adapter, one tensor at a time.

`prodtune export --to merged` of an 8B run used to load the whole base, dequantise it and merge with peft: 19.3 GiB of
GPU memory on the lent H100 for the Llama-3-8B shape, so it could not run on the T4 or the RTX 4060 that trained it,
and a bitsandbytes 4-bit base would not load on a CPU at all. Here each tensor of the base's safetensors files is
read, dequantised when it is bitsandbytes 4-bit (`bitsandbytes.functional.dequantize_4bit`, CPU or CUDA), merged with
its LoRA pair in float32 (`W + scale * B @ A`, peft's formula for a plain LoRA) and rounded once to the export dtype,
then written into a shard. Memory: one tensor on the device, one shard (default 2 GB) in RAM. Measured for the
Llama-3-8B nf4 shape on the lent H100 (`benchmarks/bench_export_gpu.py`, 8 GB cap): 1.07 GiB of GPU memory reserved,
1.74 GiB with the CUDA context, peak RSS 7.9 GiB (the resident pages of the memory-mapped checkpoint likely included),
26-32 s; for the bnb run the same weights, bit for bit, as `--method load` (19.3 GiB).

Only plain LoRA is merged this way; an adapter with DoRA, rank/alpha patterns, embedding LoRA or extra trained
modules raises `Unsupported`, and `prodtune export` then falls back to peft's `merge_and_unload` (`export.merge_run`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from prodtune import models as MD
from prodtune import prompts as P
from prodtune.assistant import read_card
from prodtune.io import UserError, read_json, write_json

log = logging.getLogger("prodtune")

QUANT_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
                  "quant_state.bitsandbytes__fp4")
ADAPTER_PREFIX = "base_model.model."


class Unsupported(ValueError):
    """The run cannot be merged tensor by tensor (why is in the message); use peft's merge instead."""


def base_files(base_id: str) -> tuple[Path, list[Path]] | None:
    """The folder and safetensors files of a base checkpoint (a local folder, or a hub id from the cache / the hub).

    None when the base has no safetensors weights (a GGUF file such as the embedded SmolLM2, or `.bin` files).
    """
    path = Path(base_id)
    if not path.is_dir():
        if path.exists() or base_id.count("/") != 1:
            return None
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(base_id, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(path.glob("*.safetensors"))
    return (path, files) if files and (path / "config.json").is_file() else None


def read_adapter(run_dir: Path) -> tuple[dict[str, tuple[Any, Any]], float]:
    """`{module path: (lora_A, lora_B)}` and the scale `alpha / r` (`alpha / sqrt(r)` with rsLoRA) of a run's adapter."""
    from safetensors.torch import load_file

    cfg = read_json(run_dir / "adapter_config.json")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise Unsupported(f"{run_dir}/adapter_config.json: peft_type {cfg.get('peft_type')!r} is not LoRA")
    for key in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "trainable_token_indices",
                "fan_in_fan_out", "lora_bias", "layer_replication"):
        if cfg.get(key):
            raise Unsupported(f"{run_dir}/adapter_config.json: {key}={cfg[key]!r} is not merged tensor by tensor")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    pairs: dict[str, dict[str, Any]] = {}
    for key, t in load_file(str(run_dir / "adapter_model.safetensors")).items():
        for part in ("lora_A", "lora_B"):
            tail = f".{part}.weight"
            if key.startswith(ADAPTER_PREFIX) and key.endswith(tail):
                pairs.setdefault(key[len(ADAPTER_PREFIX):-len(tail)], {})[part] = t
                break
        else:
            raise Unsupported(f"{run_dir}/adapter_model.safetensors: {key} is not a LoRA A/B matrix of a linear layer")
    bad = [m for m, ab in pairs.items() if set(ab) != {"lora_A", "lora_B"}]
    if bad:
        raise Unsupported(f"{run_dir}/adapter_model.safetensors: {bad[0]} lacks its lora_A or lora_B")
    return {m: (ab["lora_A"], ab["lora_B"]) for m, ab in pairs.items()}, scale


def merge_to_folder(run_dir: str | os.PathLike, dest: str | os.PathLike, *, dtype: str, device: str = "auto",
                    max_shard_bytes: int = 2 * 10**9, progress: bool = True) -> dict[str, Any]:
    """Write the merged model of a run into `dest` (safetensors shards, config, generation config, tokenizer).

    Args:
        run_dir: folder written by `prodtune train`.
        dest: a new folder (the caller moves it into place).
        dtype: `float16` or `bfloat16`: the merged weights.
        device: where 4-bit weights are dequantised and merged: `auto` (CUDA when there is one), `cpu`, `cuda`.
        max_shard_bytes: a shard is written once it holds this much.

    Returns:
        `{"method": "stream", "tensors", "merged_modules", "dequantised", "shards", "device"}`.

    Raises:
        Unsupported: the base has no safetensors, or the adapter is not plain LoRA, or a LoRA module has no weight in
            the base checkpoint.
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    run_dir, dest = Path(run_dir), Path(dest)
    card = read_card(run_dir)
    found = base_files(MD.resolve_model_id(card["base_model"]))
    if found is None:
        raise Unsupported(f"{card['base_model']} has no safetensors checkpoint to stream")
    base_dir, files = found
    pairs, scale = read_adapter(run_dir)
    dev = torch.device("cuda" if device == "cuda" or (device == "auto" and MD.cuda_available()) else "cpu")
    out_dtype = getattr(torch, dtype)
    dest.mkdir(parents=True)

    handles = [safe_open(str(f), framework="pt") for f in files]
    keys = [(h, k) for h in handles for k in h.keys()]
    present = {k for _, k in keys}
    quant_aux = {f"{k}.{s}" for k in present for s in QUANT_SUFFIXES if f"{k}.{s}" in present}
    if quant_aux:
        try:
            import bitsandbytes  # noqa: F401 - dequantize_4bit below; it runs on a CPU too
        except ImportError as e:
            raise UserError(f"{card['base_model']} stores bitsandbytes 4-bit weights: `pip install bitsandbytes==0.50.2` "
                            "to dequantise them for the merged export (a CPU is enough)") from e
    used: set[str] = set()
    shard: dict[str, Any] = {}
    shard_bytes, parts, weight_map = 0, [], {}
    n_deq = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f".part-{len(parts):05d}.safetensors"
        save_file(shard, str(dest / name), metadata={"format": "pt"})
        parts.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    todo = [(h, k) for h, k in keys if k not in quant_aux]
    for h, key in tqdm(todo, desc="merge", unit="tensor", disable=not progress):
        t = h.get_tensor(key)
        qs = {s: h.get_tensor(f"{key}.{s}") for s in QUANT_SUFFIXES if f"{key}.{s}" in quant_aux}
        if qs:
            import bitsandbytes.functional as BF

            state = BF.QuantState.from_dict({s: v.to(dev) for s, v in qs.items()}, device=dev)
            t = BF.dequantize_4bit(t.to(dev), state)
            n_deq += 1
        module = key[:-len(".weight")] if key.endswith(".weight") else None
        if module in pairs:
            a, b = pairs[module]
            w = t.to(dev, torch.float32)
            w += scale * (b.to(dev, torch.float32) @ a.to(dev, torch.float32))
            t = w
            used.add(module)
        t = t.to(out_dtype) if t.is_floating_point() else t
        shard[key] = t.to("cpu").contiguous()
        shard_bytes += t.numel() * t.element_size()
        if shard_bytes >= max_shard_bytes:
            flush()
    if shard:
        flush()
    missing = sorted(set(pairs) - used)
    if missing:
        raise Unsupported(f"{run_dir}: LoRA module {missing[0]} has no `.weight` in {base_dir} "
                          f"({len(missing)} of {len(pairs)} modules unmatched)")

    total = 0
    for i, (name, names) in enumerate(parts):
        final = "model.safetensors" if len(parts) == 1 else f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        os.replace(dest / name, dest / final)
        total += (dest / final).stat().st_size
        weight_map.update({k: final for k in names})
    if len(parts) > 1:
        write_json(dest / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})

    tok = MD.load_tokenizer(run_dir if (run_dir / "tokenizer_config.json").is_file() else str(base_dir))
    config = json.loads((base_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    config.pop("torch_dtype", None)
    config.update(dtype=dtype, eos_token_id=tok.eos_token_id)
    write_json(dest / "config.json", config)
    gen = read_json(base_dir / "generation_config.json") if (base_dir / "generation_config.json").is_file() else {}
    gen.update(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    write_json(dest / "generation_config.json", gen)
    tok.chat_template = P.export_chat_template(card["track"], tok)  # deepseek: the template it trained through
    tok.save_pretrained(str(dest))
    log.info("merged %d LoRA modules into %s (%d tensors dequantised from 4-bit) on %s", len(used), dest, n_deq, dev)
    return {"method": "stream", "tensors": len(todo), "merged_modules": len(used), "dequantised": n_deq,
            "shards": len(parts), "device": str(dev)}
