"""`prodtune export`: merged 16-bit, GGUF (f16, q8_0) read back by transformers, the Ollama Modelfile, and a failed
export that leaves the run folder as it was.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_export.py -x -q                # ~2 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_export.py -x -q -m "not slow"  # the tiny-Llama tests

The round trip runs on the embedded SmolLM2-135M with a LoRA adapter of random non-zero weights on all 7 projections:
the GGUF is loaded back with `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` (transformers' own reader,
which undoes llama.cpp's Q/K permutation) and compared with the merged 16-bit export.
Tolerance for q8_0 (measured: mean |dlogit| 0.12-0.14 with logits of std ~6.4, KL <= 0.011 nats, top-1 agreement
0.95-0.98 on the prompt positions): mean |dlogit| < 0.25, KL(merged || q8_0) < 0.05 nats at every position, top-1
agreement >= 0.9.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prodtune import export as E
from prodtune import models as MD
from prodtune import prompts as P
from prodtune.io import UserError
from test_assistant import make_run

ROOT = Path(__file__).parents[2]
TITLES = ["Birchmont Extra Thick Exercise Mat 5mm, 183 x 61 cm", "Stainless steel water bottle", "Kids rain boots, yellow"]


def snapshot(d: Path) -> dict[str, str]:
    """Every file and folder under d with the sha256 of its bytes (folders: 'dir')."""
    return {str(p.relative_to(d)): ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(d.rglob("*"))}


def field(path: Path, key: str):
    return gguf.GGUFReader(str(path)).fields[key].contents()


def logits(model, tok, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(**tok(text, return_tensors="pt")).logits[0]


# ----------------------------------------------------------------------------------------------
# Tiny Llama (fast): GQA with 4 heads / 2 KV heads, untied head
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tiny = MD.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")
    return make_run(tiny, tmp_path_factory.mktemp("models") / "deepseek", "deepseek", str(tiny), scale=0.2)


def test_tiny_gguf_reads_back_with_the_same_logits_and_template(tiny_run: Path) -> None:
    res = E.export(tiny_run, to="gguf", quant="f16", device="cpu")
    path = Path(res["path"])
    assert path == tiny_run / "export" / "gguf" / "deepseek-f16.gguf" and res["size_mb"] > 0
    merged, tok, _ = E.merge_run(tiny_run, device="cpu")
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    assert back.config.tie_word_embeddings is False and back.config.num_key_value_heads == 2
    text = P.r1_prompt("Is it good?")
    with torch.no_grad():  # the GGUF holds f16 weights (parameters only: the rotary buffer stays float32)
        for p in merged.parameters():
            p.copy_(p.half().float())
    assert torch.equal(logits(back, tok, text), logits(merged, tok, text))
    run_tok = MD.load_tokenizer(tiny_run)  # the DeepSeek track ships the template it trained through, its tokenizer's
    assert field(path, "tokenizer.chat_template") == run_tok.chat_template == P.export_chat_template("deepseek", run_tok)
    assert "<|im_start|>" in run_tok.chat_template
    assert field(path, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    names = {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.attn_q.weight", "blk.1.ffn_down.weight"} <= names


def test_bad_quant_target_and_flags_are_user_errors_and_write_nothing(tiny_run: Path) -> None:
    before = snapshot(tiny_run)
    for kw, said in [({"quant": "q4_k"}, "q4_k"), ({"to": "onnx"}, "onnx"), ({"to": "merged", "ollama": True}, "--ollama")]:
        with pytest.raises(UserError, match=said):
            E.export(tiny_run, **{"to": "gguf", **kw})
    assert snapshot(tiny_run) == before


def test_a_failure_while_writing_leaves_the_run_folder_unchanged(tiny_run: Path, tmp_path: Path) -> None:
    run = tmp_path / "deepseek"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    E.export(run, to="merged", device="cpu")  # an older export that must survive
    (run / "export" / "gguf").write_text("in the way")  # the GGUF folder cannot be made: the last step fails
    before = snapshot(run)
    with pytest.raises(FileExistsError):
        E.export(run, to="gguf", quant="q8_0", ollama=True, device="cpu")
    assert snapshot(run) == before  # no temporary folder left, the merged export intact
    # a fresh folder without export/: a failed export does not leave an empty export/ behind
    run2 = tmp_path / "fresh"
    shutil.copytree(tiny_run, run2, ignore=shutil.ignore_patterns("export"))
    before = snapshot(run2)
    (run2 / "adapter_model.safetensors").rename(run2 / "a.bin")  # the adapter cannot be loaded
    with pytest.raises(Exception):
        E.export(run2, to="gguf", device="cpu")
    (run2 / "a.bin").rename(run2 / "adapter_model.safetensors")
    assert snapshot(run2) == before


def test_modelfile_matches_the_track(tiny_run: Path) -> None:
    tok = MD.load_tokenizer(tiny_run)
    for track, temp in (("llama", 0.0), ("deepseek", 0.7)):
        card = {"track": track, "base_model": "b", "generation": {"temperature": temp}, "config": {"max_seq_length": 4096}}
        text = E.modelfile(track, f"{track}-f16.gguf", tok, card)
        assert f"FROM ./{track}-f16.gguf\n" in text
        assert f'TEMPLATE """{P.ollama_template(track, tok)}"""' in text
        assert 'PARAMETER stop "<|im_end|>"' in text
        # a next turn stops the reply: the Alpaca sections (llama) or the chat template's user turn (deepseek)
        assert ('PARAMETER stop "### Instruction:"' in text) == (track == "llama")
        assert ('PARAMETER stop "<|im_start|>user"' in text) == (track == "deepseek")
        assert f"PARAMETER temperature {temp}" in text and "PARAMETER num_ctx 4096" in text
        assert ("PARAMETER top_k 1" in text) == (temp == 0)
    assert P.ollama_template("llama").replace("{{ .Prompt }}", "T").replace("{{ .Response }}", "") == P.alpaca_prompt("T")
    r1 = P.ollama_template("deepseek").replace("{{ .Prompt }}", "Q").replace("{{ .Response }}", "")  # no chat template
    assert r1.replace("{{ if .System }}{{ .System }}{{ else }}", "").replace("{{ end }}", "") == P.r1_prompt("Q")
    chat = P.ollama_template("deepseek", tok).split("{{ else }}", 1)[1].split("{{ end }}", 1)[0]
    assert chat.replace("{{ .Prompt }}", "Q") == P.r1_chat_prompt(tok, "Q")


@pytest.mark.parametrize("track", ["llama", "deepseek"])
def test_chat_template_renders_the_training_prompt(track: str, tiny_run: Path) -> None:
    tok = MD.load_tokenizer(tiny_run)
    build = P.alpaca_prompt if track == "llama" else P.r1_prompt  # the fallback of a tokenizer without a template
    for text in ["Birchmont Mat 5mm ", "Ünïcode “quoted” 'it''s' \\ {braces}"]:
        got = tok.apply_chat_template([{"role": "user", "content": text}], chat_template=P.chat_template(track),
                                      tokenize=False, add_generation_prompt=True)
        assert got == build(text)


# ----------------------------------------------------------------------------------------------
# The embedded SmolLM2 (slow): merged vs GGUF f16 / q8_0
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = make_run(MD.embedded_llm_dir(), tmp_path_factory.mktemp("models") / "llama", "llama", MD.EMBEDDED_LLM)
    out = {"run": run}
    for key, kw in {"merged": {"to": "merged"}, "f16": {"to": "gguf", "quant": "f16", "ollama": True},
                    "q8_0": {"to": "gguf", "quant": "q8_0"}}.items():
        out[key] = E.export(run, device="cpu", **kw)
    print("\nexport figures:", json.dumps({k: {x: v[x] for x in ("seconds", "size_mb")} for k, v in out.items() if k != "run"}))
    return out


@pytest.fixture(scope="module")
def merged(smol: dict):
    d = smol["merged"]["path"]
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32), AutoTokenizer.from_pretrained(d)


@pytest.mark.slow
def test_merged_export_is_the_adapter_run_in_16_bit(smol: dict, merged) -> None:
    from prodtune.assistant import answer, load_run

    assert smol["merged"]["dtype"] == "float16"
    model, tok = merged
    assert json.loads((Path(smol["merged"]["path"]) / "config.json").read_text())["dtype"] == "float16"
    assert tok.apply_chat_template([{"role": "user", "content": TITLES[0]}], tokenize=False) == P.alpaca_prompt(TITLES[0])
    run = load_run(smol["run"], device="cpu")  # base + adapter, unmerged, float32
    want = [answer(run, title=t, max_new_tokens=16)["text"] for t in TITLES]
    got = MD.generate(model, tok, [P.alpaca_prompt(t) for t in TITLES], max_new_tokens=16, progress=False)
    assert [P.parse_alpaca_response(g["text"]) for g in got] == want


@pytest.mark.slow
def test_gguf_f16_round_trip_greedy_equals_the_merged_model(smol: dict, merged) -> None:
    model, tok = merged
    path = Path(smol["f16"]["path"])
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    back_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    prompts = [P.alpaca_prompt(t) for t in TITLES]
    for p in prompts:
        assert back_tok(p)["input_ids"] == tok(p)["input_ids"]
        assert torch.equal(logits(back, tok, p), logits(model, tok, p))  # the same f16 weights, read back exactly
    a = MD.generate(model, tok, prompts, max_new_tokens=32, progress=False)
    b = MD.generate(back, tok, prompts, max_new_tokens=32, progress=False)
    assert [x["text"] for x in a] == [x["text"] for x in b] and all(x["text"] for x in a)
    assert back_tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False) == P.alpaca_prompt("x")
    assert field(path, "tokenizer.ggml.eos_token_id") == tok.eos_token_id == 2  # <|im_end|>, what training ends with
    assert field(path, "tokenizer.ggml.model") == "gpt2" and field(path, "tokenizer.ggml.pre") == "gpt-2"
    assert field(path, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(path)).tensors}  # tied head, as SmolLM2
    assert (path.parent / "Modelfile").read_text().startswith("# Ollama Modelfile of the prodtune llama track")


@pytest.mark.slow
def test_gguf_q8_0_stays_within_the_stated_logit_tolerance(smol: dict, merged) -> None:
    model, tok = merged
    path = Path(smol["q8_0"]["path"])
    assert smol["q8_0"]["size_mb"] < 0.6 * smol["f16"]["size_mb"]
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    for t in TITLES:
        ref, q = logits(model, tok, P.alpaca_prompt(t)), logits(back, tok, P.alpaca_prompt(t))
        lp, lq = ref.log_softmax(-1), q.log_softmax(-1)
        kl = (lp.exp() * (lp - lq)).sum(-1)
        assert (ref - q).abs().mean() < 0.25
        assert kl.max() < 0.05
        assert (ref.argmax(-1) == q.argmax(-1)).float().mean() >= 0.9


@pytest.mark.slow
def test_export_command_prints_its_result_and_errors_exit_2(smol: dict, tmp_path: Path) -> None:
    def prodtune(*args: str) -> subprocess.CompletedProcess:
        import os

        return subprocess.run([sys.executable, "-m", "prodtune", "export", *args], capture_output=True, text=True,
                              cwd=ROOT, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    res = prodtune("--run", str(smol["run"]), "--to", "gguf", "--quant", "q8_0", "--ollama")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["path"].endswith("export/gguf/llama-q8_0.gguf") and out["modelfile"].endswith("Modelfile")
    assert "FROM ./llama-q8_0.gguf" in Path(out["modelfile"]).read_text()
    res = prodtune("--run", str(tmp_path / "none"), "--to", "gguf")
    assert res.returncode == 2 and "does not exist" in res.stderr and res.stderr.strip().count("\n") == 0


def test_a_dequantised_base_saves_despite_its_4bit_load_conversion(tmp_path):
    """transformers 5 keeps bitsandbytes' load-time deserialisation on a model after `dequantize()` and tries to
    reverse it on save (NotImplementedError on the lent H200): export drops it and the weights save and reload."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    from transformers.core_model_loading import WeightConverter
    from transformers.integrations.bitsandbytes import Bnb4bitDeserialize

    from prodtune.export import drop_load_conversions

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    # what loading a *-bnb-4bit checkpoint leaves behind (quantizer_bnb_4bit.get_weight_conversions)
    model._weight_conversions = [*(getattr(model, "_weight_conversions", None) or []), WeightConverter(
        source_patterns=["weight.absmax", "weight.quant_map", "weight"], target_patterns="weight",
        operations=[Bnb4bitDeserialize(None)])]
    with pytest.raises(NotImplementedError):
        model.save_pretrained(tmp_path / "broken")
    drop_load_conversions(model)
    model.save_pretrained(tmp_path / "ok")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ok")
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), n
