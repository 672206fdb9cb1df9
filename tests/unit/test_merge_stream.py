"""`prodtune export --to merged` tensor by tensor (`merge_stream`): the same weights as peft's merge of the loaded model,
for a float base and for a bitsandbytes nf4 checkpoint (dequantised on the CPU), sharded or not; what it cannot merge
falls back to peft.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_merge_stream.py -q          # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from prodtune import export as E
from prodtune import merge_stream as MS
from prodtune import models as MD
from prodtune import prompts as P
from prodtune.io import UserError
from test_assistant import make_run


def weights(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def reference(base: torch.nn.Module, run: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """peft's merge_and_unload of the loaded float32 base, rounded once to `dtype`: what `--method load` writes."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(run)).merge_and_unload()
    return {k: v.to(dtype) for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MD.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def run(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_run(tiny, tmp_path_factory.mktemp("models") / "llama", "llama", str(tiny), scale=0.2)


def test_streamed_merge_equals_peft_merge_and_reloads(run: Path, tiny: Path, tmp_path: Path) -> None:
    res = E.export(run, to="merged", device="cpu", dtype="float16")
    assert res["method"] == "stream" and res["merged_modules"] == 2 * 7 and res["dequantised"] == 0
    dest = Path(res["path"])
    got = weights(dest)
    want = reference(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32), run, torch.float16)
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the folder is a model: config without quantisation, the track's template, greedy equals the loaded merge
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["dtype"] == "float16" and "quantization_config" not in cfg
    back = AutoModelForCausalLM.from_pretrained(dest, dtype=torch.float32)
    tok = MD.load_tokenizer(dest)
    assert tok.chat_template == P.export_chat_template("llama", tok)
    loaded = E.merge_run(run, device="cpu")[0]
    with torch.no_grad():
        for p in loaded.parameters():
            p.copy_(p.half().float())
    ids = tok(P.alpaca_prompt("Stainless steel water bottle"), return_tensors="pt")
    a = back.generate(**ids, max_new_tokens=12, do_sample=False)
    b = loaded.generate(**ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(a, b)


def test_shards_and_their_index_load_as_one_model(run: Path, tmp_path: Path) -> None:
    dest = tmp_path / "merged"
    info = MS.merge_to_folder(run, dest, dtype="bfloat16", device="cpu", max_shard_bytes=4 * 2**20, progress=False)
    files = sorted(p.name for p in dest.glob("*.safetensors"))
    assert info["shards"] == len(files) >= 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files) and not list(dest.glob(".part-*"))
    back = AutoModelForCausalLM.from_pretrained(dest)
    assert back.dtype == torch.bfloat16 and len(index["weight_map"]) == len(back.state_dict())


def test_an_nf4_checkpoint_is_dequantised_and_merged_on_the_cpu(tiny: Path, tmp_path: Path) -> None:
    """A pre-quantised base like `unsloth/llama-3-8b-bnb-4bit`, saved by transformers + bitsandbytes on this CPU."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    nf4 = tmp_path / "llama-bnb-4bit"
    AutoModelForCausalLM.from_pretrained(tiny, quantization_config=q, dtype=torch.bfloat16).save_pretrained(nf4)
    MD.load_tokenizer(tiny).save_pretrained(nf4)
    run = make_run(tiny, tmp_path / "run", "llama", str(nf4), scale=0.2)
    res = E.export(run, to="merged", device="cpu", dtype="bfloat16")
    assert res["method"] == "stream" and res["dequantised"] == 2 * 7
    # reference: transformers' own dequantisation of the same checkpoint, merged by peft in float32
    base = AutoModelForCausalLM.from_pretrained(nf4, dtype=torch.bfloat16).dequantize().float()
    want = reference(base, run, torch.bfloat16)
    got = weights(Path(res["path"]))
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert "quantization_config" not in json.loads((Path(res["path"]) / "config.json").read_text())


def test_what_it_cannot_stream_is_refused_or_falls_back_to_peft(run: Path, tiny: Path, tmp_path: Path) -> None:
    dora = tmp_path / "dora"
    shutil.copytree(run, dora, ignore=shutil.ignore_patterns("export"))
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    with pytest.raises(MS.Unsupported, match="use_dora"):
        MS.read_adapter(dora)
    with pytest.raises(UserError, match="--method stream: .*use_dora"):
        E.export(dora, to="merged", device="cpu", method="stream")
    assert not (dora / "export").exists()  # a refused export leaves nothing behind
    # a base without safetensors (here pytorch_model.bin; the embedded SmolLM2 is a GGUF): auto merges with peft
    bin_base = tmp_path / "bin-base"
    shutil.copytree(tiny, bin_base)
    torch.save(load_file(str(bin_base / "model.safetensors")), bin_base / "pytorch_model.bin")
    (bin_base / "model.safetensors").unlink()
    assert MS.base_files(str(bin_base)) is None
    plain = tmp_path / "plain"
    shutil.copytree(run, plain, ignore=shutil.ignore_patterns("export"))
    card = json.loads((plain / "run_card.json").read_text())
    (plain / "run_card.json").write_text(json.dumps({**card, "base_model": str(bin_base)}))
    res = E.export(plain, to="merged", device="cpu", dtype="float16")
    assert res["method"] == "load"
    streamed = weights(Path(E.export(run, to="merged", device="cpu", dtype="float16")["path"]))
    assert all(torch.equal(v, streamed[k]) for k, v in weights(Path(res["path"])).items())


ROOT = Path(__file__).parents[2]
GPU_RESULTS = ROOT / "benchmarks/results/bench_export_gpu.json"


def test_the_gpu_measurement_backs_the_stated_memory() -> None:
    """What README.md and benchmarks/README.md state of the streamed merge on the lent H100 (bench_export_gpu.json):
    both backends' 8B runs merged under the 8 GB cap, far below `--method load`, the same weights, each reloaded."""
    s = json.loads(GPU_RESULTS.read_text())["summary_stream_at_da77289"]
    assert s["device"].startswith("NVIDIA H100") and s["commit"] == "da77289"
    for backend in ("unsloth", "bnb"):
        stream = next(e for e in s["backends"][backend]["exports"] if e["method"] == "stream")
        assert stream["finished"] and stream["logits_finite"] and stream["cap_gb"] == 8.0
        assert stream["merged_modules"] == stream["dequantised"] == 224 and stream["merged_dtype"] == "bfloat16"
        assert stream["export_peak_reserved_gib"] < 1.1 and stream["export_device_used_peak_gib"] < 1.8
    load = next(e for e in s["backends"]["bnb"]["exports"] if e["method"] == "load")
    assert load["finished"] and round(load["export_peak_reserved_gib"], 1) == 19.3
    same = s["backends"]["bnb"]["stream_vs_load"]
    assert same["same_names"] and same["tensors"] == 291 and same["max_abs_diff"] == 0.0


def test_the_benchmark_records_the_commit_it_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the lent machine the copy's .git named an older commit than the working tree sent: $PRODTUNE_COMMIT wins."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_export_gpu", ROOT / "benchmarks/bench_export_gpu.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setenv("PRODTUNE_COMMIT", "abc1234")
    assert bench.commit() == "abc1234"
    monkeypatch.delenv("PRODTUNE_COMMIT")
    got = bench.commit()
    assert got is None or (len(got) >= 7 and got != "abc1234")
