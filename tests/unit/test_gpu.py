"""CPU-side checks of the GPU path: clear errors without CUDA, dtype/backend choice, LoRA settings, and the GPU
profiles against what the lent H100 measured (benchmarks/results/bench_train_gpu_memcap.json).

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_gpu.py -q

The one test that loads a model needs CUDA (marker `gpu`) and is skipped elsewhere.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from prodtune import gpu  # noqa: E402
from prodtune.io import project_root, read_json  # noqa: E402

NO_CUDA = not gpu.cuda_available()
needs_no_cuda = pytest.mark.skipif(not NO_CUDA, reason="checks the messages of a machine without CUDA")
GPU_PROFILES = ("colab-t4", "rtx4060-8gb", "h100")


@needs_no_cuda
@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_require_cuda_names_the_profile_and_the_way_out(profile):
    with pytest.raises(gpu.CudaRequiredError) as e:
        gpu.require_cuda(profile)
    msg = str(e.value)
    assert repr(profile) in msg and "torch.cuda.is_available() is False" in msg
    assert "requirements-gpu.txt" in msg and "PROFILE='cpu'" in msg and "--profile cpu" in msg


@needs_no_cuda
def test_without_cuda_nothing_is_imported_or_loaded():
    assert gpu.cuda_supports_bf16() is False
    assert gpu.unsloth_status(force=True) == (False, "no CUDA device")
    assert gpu.gpu_memory_report() == {"cuda": False}
    info = gpu.describe_machine()
    assert info["cuda"] is False and info["backend"] is None
    with pytest.raises(gpu.CudaRequiredError):
        gpu.load_gpu_model("unsloth/llama-3-8b-bnb-4bit", max_seq_length=1024, lora={})


@pytest.mark.parametrize(
    "dtype, bf16, expected",
    [
        ("auto", True, "bfloat16"),      # Ampere / Ada / Hopper
        ("auto", False, "float16"),      # T4 (Turing) has no bf16
        (None, False, "float16"),
        ("fp16", True, "float16"),
        ("bf16", True, "bfloat16"),
        ("torch.bfloat16", True, "bfloat16"),
        ("float32", False, "float32"),
        ("bfloat16", False, ValueError),  # asked for bf16 on a T4: an error, not a 10x slowdown
        ("int8", True, ValueError),
    ],
)
def test_resolve_dtype(dtype, bf16, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            gpu.resolve_dtype(dtype, bf16_supported=bf16)
    else:
        assert gpu.resolve_dtype(dtype, bf16_supported=bf16) == expected


@pytest.mark.parametrize(
    "requested, unsloth_ok, expected",
    [
        ("auto", True, "unsloth"),   # the fastest path that is present
        ("auto", False, "bnb"),      # unsloth missing or failing to import: transformers + peft + bitsandbytes
        ("bnb", True, "bnb"),
        ("unsloth", True, "unsloth"),
        ("unsloth", False, RuntimeError),
        ("cuda", True, ValueError),
    ],
)
def test_choose_backend(requested, unsloth_ok, expected):
    if isinstance(expected, type):
        with pytest.raises(expected):
            gpu.choose_backend(requested, unsloth_ok=unsloth_ok, reason="not installed")
    else:
        assert gpu.choose_backend(requested, unsloth_ok=unsloth_ok) == expected


@pytest.mark.parametrize(
    "lora, expected",
    [
        ({}, gpu.LORA_DEFAULTS),
        ({"r": 8, "target_modules": "all-linear"}, {**gpu.LORA_DEFAULTS, "r": 8}),
        ({"dropout": None, "seed": 1}, {**gpu.LORA_DEFAULTS, "seed": 1}),
        ({"rank": 8}, ValueError),
        ({"dropout": 1.0}, ValueError),
        ({"r": 0}, ValueError),
    ],
)
def test_check_lora(lora, expected):
    if expected is ValueError:
        with pytest.raises(ValueError):
            gpu.check_lora(lora)
    else:
        assert gpu.check_lora(lora) == expected


def _track(profile: str, track: str):
    from prodtune.config import load_config
    from prodtune.train import TrainConfig

    return load_config(TrainConfig, profile, track=track)


@pytest.mark.parametrize("profile", GPU_PROFILES)
@pytest.mark.parametrize("track", ["llama", "deepseek"])
def test_gpu_profiles_ask_for_cuda_4bit_and_a_dtype_the_card_has(profile, track):
    cfg = _track(profile, track)
    assert cfg.device == "cuda" and cfg.load_in_4bit and cfg.backend == "auto"
    # 8-bit AdamW where memory is short; the H100 has room for fused fp32 AdamW (less host time per step)
    assert cfg.optim == ("adamw_torch_fused" if profile == "h100" else "adamw_8bit")
    assert cfg.fp16 != cfg.bf16
    has_bf16 = profile != "colab-t4"
    dtype = "bfloat16" if cfg.bf16 else "float16"
    assert gpu.resolve_dtype(dtype, bf16_supported=has_bf16) == dtype
    assert cfg.gradient_checkpointing == "unsloth"  # unsloth's recommended (offloaded) mode on every card


@pytest.mark.parametrize("profile,track,grad_dtype", [("cpu", "llama", None), ("colab-t4", "llama", "fp16"),
                                                       ("h100", "deepseek", "bf16")])
def test_gpu_profiles_compress_ddp_gradients(profile, track, grad_dtype):
    # the gloo test compares exact fp32 runs; T4s have no bf16
    assert _track(profile, track).ddp_grad_dtype == grad_dtype


@pytest.mark.parametrize("profile", GPU_PROFILES)
def test_gpu_profiles_generate_with_a_real_model_and_bounded_sizes(profile):
    """Stage 02 writes with a 4-bit 8B instruct model (the cpu profile keeps its offline template); what stages 02, 06
    and notebooks 03/04 generate is bounded (a whole split of the real dump would be thousands of 8B generations)."""
    from prodtune.config import load_config
    from prodtune.cot import CoTConfig
    from prodtune.evaluate import EvalConfig
    from prodtune.models import inference_4bit

    c = load_config(CoTConfig, profile)
    assert c.backend == "local" and c.model_name == "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
    assert inference_4bit(c.model_name, use_cuda=True) and c.n is not None and c.n <= 500
    assert load_config(CoTConfig, "cpu").backend == "template"
    server = load_config(CoTConfig, profile, base_url="http://localhost:8000/v1", backend="openai")
    assert server.model_name == "gpt-4o-mini"  # the local model id is not sent to a server
    ev = load_config(EvalConfig, profile)
    assert ev.n_test is not None and ev.n_test <= {"colab-t4": 64, "rtx4060-8gb": 32, "h100": 500}[profile]
    for track in ("llama", "deepseek"):
        cfg = _track(profile, track)
        assert cfg.n_eval is not None and cfg.n_eval <= 32 and cfg.max_eval_rows is not None and cfg.max_eval_rows <= 200
        # both 8B bases, pre-quantised or not, load in 4-bit for the before/after cells and stage 06
        assert inference_4bit(cfg.base_model, use_cuda=True)


MEMCAP = project_root() / "benchmarks/results/bench_train_gpu_memcap.json"


@pytest.mark.skipif(not MEMCAP.is_file(), reason="no memory-cap measurement committed")
@pytest.mark.parametrize("profile", ["colab-t4", "rtx4060-8gb"])
@pytest.mark.parametrize("track", ["llama", "deepseek"])
def test_small_card_profiles_stay_within_what_fit_under_the_cap(profile, track):
    """batch x sequence length of each track is at most what trained without OOM under the card's memory cap."""
    res = read_json(MEMCAP)["results"][f"cap-{profile}"]
    shape = res["shapes"]["llama-3-8b"]
    assert not shape.get("oom") and shape["full"]["finite"]
    assert shape["full"]["peak_reserved_gib"] < res["cap_gib"]
    cfg = _track(profile, track)
    assert cfg.per_device_train_batch_size * cfg.max_seq_length <= shape["batch"] * shape["seq"]
    assert cfg.max_seq_length <= shape["seq"]
    if profile == "colab-t4":
        assert shape["dtype"] == "float16" and cfg.fp16


@pytest.mark.gpu
@pytest.mark.skipif(NO_CUDA, reason="needs CUDA")
def test_load_gpu_model_trains_a_tiny_llama(tmp_path):  # pragma: no cover, runs on CUDA machines only
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prodtune.models import embedded_llm_dir

    tok = AutoTokenizer.from_pretrained(embedded_llm_dir())
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok2, used = gpu.load_gpu_model(str(tmp_path), max_seq_length=256, lora={"r": 8}, backend="auto")
    assert used in ("unsloth", "bnb") and model.training and tok2.pad_token is not None
    ids = torch.randint(0, len(tok), (2, 64), device="cuda")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with torch.autocast("cuda", dtype=getattr(torch, gpu.resolve_dtype("auto"))):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0).step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.requires_grad)
    assert gpu.gpu_memory_report()["peak_allocated_gib"] > 0


def test_emulated_t4_answers_fp16_on_a_bf16_card(monkeypatch):
    """gpu_pipeline.py proves colab-t4 on an H100: PRODTUNE_EMULATE_NO_BF16 turns every dtype decision to fp16."""
    import torch

    monkeypatch.setattr(gpu, "cuda_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100's answer
    monkeypatch.delenv("PRODTUNE_EMULATE_NO_BF16", raising=False)
    assert gpu.cuda_supports_bf16() is True and gpu.resolve_dtype("auto") == "bfloat16"
    monkeypatch.setenv("PRODTUNE_EMULATE_NO_BF16", "1")
    assert gpu.cuda_supports_bf16() is False and gpu.resolve_dtype("auto") == "float16"
    with pytest.raises(ValueError, match="no native bf16"):
        gpu.resolve_dtype("bfloat16")
    monkeypatch.setenv("PRODTUNE_EMULATE_NO_BF16", "0")
    assert gpu.cuda_supports_bf16() is True
