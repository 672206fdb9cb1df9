"""Asking a trained run (`prodtune.assistant`, `prodtune generate`, `prodtune chat`): prompts, tracks, decoding
settings, streaming, RAG and the commands.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_assistant.py -x -q               # ~2 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_assistant.py -x -q -m "not slow" # the in-process tests

Run folders are real: a tiny random Llama (SmolLM2's tokenizer) with a saved peft LoRA adapter whose B matrices are
random and non-zero (so the adapter changes the output), its tokenizer and a minimal run_card.json.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from prodtune import assistant as A
from prodtune import models as MD
from prodtune import prompts as P
from prodtune.io import UserError

ROOT = Path(__file__).parents[2]
TITLE = "Birchmont Extra Thick Exercise Mat 5mm"
QUESTION = "Is the Birchmont exercise mat thick enough for kneeling?"


def make_run(base_dir: Path, out: Path, track: str, base_model: str, *, seed: int = 0, scale: float = 0.02,
             card: dict | None = None) -> Path:
    """A run folder as `prodtune train` writes it: a LoRA adapter (random non-zero B), the tokenizer, run_card.json."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, MD.lora_config({"r": 8, "alpha": 16}))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, scale)
    peft_model.save_pretrained(out)
    MD.load_tokenizer(base_dir).save_pretrained(out)
    (out / "run_card.json").write_text(json.dumps({"track": track, "base_model": base_model, "backend": "cpu",
                                                   "config": {"max_seq_length": 512}, **(card or {})}))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return MD.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def runs(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """models/<profile>/{llama,deepseek} on the tiny base; the store goes in models/<profile>/chroma when built."""
    root = tmp_path_factory.mktemp("models")
    return {track: make_run(tiny, (root / track), track, str(tiny), seed=i) for i, track in enumerate(A.TRACKS)}


@pytest.fixture(scope="module")
def loaded(runs: dict[str, Path]) -> dict[str, A.Run]:
    return {track: A.load_run(d, device="cpu") for track, d in runs.items()}


# ----------------------------------------------------------------------------------------------
# In-process
# ----------------------------------------------------------------------------------------------


def test_llama_track_answers_a_title_with_the_alpaca_prompt_greedily(loaded: dict[str, A.Run]) -> None:
    run = loaded["llama"]
    out = A.answer(run, title=TITLE + "  ", max_new_tokens=12)
    assert out["track"] == "llama" and out["prompt"] == P.alpaca_prompt(TITLE)
    assert out["temperature"] == 0.0 and out["max_new_tokens"] == 12
    assert isinstance(out["text"], str) and "thinking" not in out and "retrieved" not in out
    assert A.answer(run, title=TITLE, max_new_tokens=12)["text"] == out["text"]  # greedy: the same text again
    # what models.generate gives for the same prompt (stage 06's path), cut as stage 06 cuts it
    ref = MD.generate(run.model, run.tokenizer, [out["prompt"]], max_new_tokens=12, progress=False)[0]["text"]
    assert out["text"] == P.parse_alpaca_response(ref, run.tokenizer.eos_token)


def test_the_adapter_is_applied(loaded: dict[str, A.Run]) -> None:
    run = loaded["llama"]
    enc = run.tokenizer(P.alpaca_prompt(TITLE), return_tensors="pt")
    with torch.no_grad():
        tuned = run.model(**enc).logits
        with run.model.disable_adapter():
            base = run.model(**enc).logits
    assert (tuned - base).abs().max() > 1e-3


def test_deepseek_track_answers_a_question_with_thinking_and_answer(loaded: dict[str, A.Run]) -> None:
    run = loaded["deepseek"]
    out = A.answer(run, question=QUESTION, max_new_tokens=10)
    assert out["prompt"] == P.track_prompt("deepseek", QUESTION, run.tokenizer)  # the chat template it trained through
    assert out["prompt"].endswith(QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
    assert set(out) >= {"text", "thinking", "answer"}
    assert (out["thinking"], out["answer"]) == P.parse_r1_response(out["text"])


@pytest.mark.parametrize("track", A.TRACKS)
def test_streaming_hands_over_pieces_and_gives_the_same_text(loaded: dict[str, A.Run], track: str) -> None:
    run = loaded[track]
    kw = {"title": TITLE} if track == "llama" else {"question": QUESTION}
    pieces: list[str] = []
    streamed = A.answer(run, stream=pieces.append, max_new_tokens=10, **kw)
    plain = A.answer(run, max_new_tokens=10, **kw)
    assert pieces and streamed["text"] == plain["text"]
    raw = "".join(pieces)
    assert (P.parse_alpaca_response(raw) if track == "llama" else raw.strip()) == plain["text"]


@pytest.mark.parametrize(("track", "kw", "said"), [
    ("llama", {"question": QUESTION}, "answers a title"),
    ("deepseek", {"title": TITLE}, "answers a question"),
    ("llama", {"title": "   "}, "needs a title"),
    ("deepseek", {"question": QUESTION, "rag": True}, "--rag"),
])
def test_inputs_that_do_not_fit_the_track_are_user_errors(loaded: dict[str, A.Run], track: str, kw: dict, said: str) -> None:
    with pytest.raises(UserError, match=said):
        A.answer(loaded[track], **kw)


def test_decoding_settings_come_from_the_run_card_then_the_caller(tiny: Path, tmp_path: Path) -> None:
    off = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}  # the anti-loop decoding: off unless the card says
    assert A.generation_settings({"track": "llama"}) == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 160, **off}
    assert A.generation_settings({"track": "deepseek"})["max_new_tokens"] == 256
    d = make_run(tiny, tmp_path / "run", "llama", str(tiny), card={"generation": {"temperature": 0.2, "max_new_tokens": 7}})
    run = A.load_run(d, device="cpu")
    assert run.generation == {"temperature": 0.2, "top_p": 1.0, "max_new_tokens": 7, **off}
    looped = make_run(tiny, tmp_path / "loop", "llama", str(tiny), card={"generation": {"no_repeat_ngram_size": 1,
                                                                                        "max_new_tokens": 80}})
    lr = A.load_run(looped, device="cpu")
    plain = A.answer(lr, title=TITLE, max_new_tokens=80, stream=False)
    streamed: list[str] = []
    norep = A.answer(lr, title=TITLE, stream=streamed.append)  # streamed and plain replies decode the same way
    assert lr.generation["no_repeat_ngram_size"] == 1 and "".join(streamed).strip() == norep["text"].strip()
    ids = lr.tokenizer(norep["text"], add_special_tokens=False)["input_ids"]
    assert norep["no_repeat_ngram_size"] == 1 and plain["text"] == norep["text"] and len(ids) >= 2
    greedy = A.answer(run, title=TITLE, temperature=0, max_new_tokens=80)["text"]  # the same model without the setting
    assert greedy != norep["text"]  # the card's decoding took effect
    out = A.answer(run, title=TITLE)
    assert (out["temperature"], out["max_new_tokens"]) == (0.2, 7)
    assert A.answer(run, title=TITLE)["text"] == out["text"]  # seeded sampling: reproducible
    assert A.answer(run, title=TITLE, temperature=0, max_new_tokens=5)["temperature"] == 0.0


@pytest.mark.parametrize(("setup", "said"), [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "no run_card.json"),
    (lambda d: (d.mkdir(), (d / "run_card.json").write_text('{"track": "gpt", "base_model": "x"}')), "track 'gpt'"),
    (lambda d: (d.mkdir(), (d / "run_card.json").write_text('{"track": "llama", "base_model": "x"}')), "adapter_config"),
])
def test_a_folder_that_is_not_a_finished_run_is_a_user_error(tmp_path: Path, setup, said: str) -> None:
    d = tmp_path / "run"
    setup(d)
    with pytest.raises(UserError, match=said):
        A.read_card(d)


@pytest.fixture(scope="module")
def store_dir(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Chroma store of 6 products beside the runs (models/<profile>/chroma), embedded with the offline MiniLM."""
    from prodtune import rag as R

    data = tmp_path_factory.mktemp("prepared")
    titles = [TITLE, "Birchmont Yoga Block Foam", "Stainless Steel Water Bottle 750 ml", "Kids Rain Boots Yellow",
              "Cast Iron Skillet 26 cm", "Wireless Computer Mouse"]
    pd.DataFrame({"uid": [f"U{i}" for i in range(len(titles))], "title": titles,
                  "content": [f"{t}. A dependable product described in plain words for shoppers." for t in titles]}
                 ).to_parquet(data / "train.parquet")
    persist = runs["llama"].parent / "chroma"
    R.build_store(R.RagConfig(data_dir=str(data), persist_dir=str(persist), out_dir=str(data / "out"), splits=["train"],
                              device="cpu", progress=False))
    return persist


@pytest.mark.slow
def test_rag_puts_the_retrieved_descriptions_in_the_prompt_and_returns_them(loaded: dict[str, A.Run], store_dir: Path) -> None:
    out = A.answer(loaded["llama"], title=TITLE, rag=True, k=2, max_new_tokens=8)  # True: the chroma/ beside the run
    hits = out["retrieved"]
    assert [h["uid"] for h in hits][:1] == ["U0"] and len(hits) == 2
    assert set(hits[0]) == {"uid", "title", "score", "content"}
    assert out["prompt"] == P.alpaca_rag_prompt(TITLE, [h["content"] for h in hits])
    assert A.answer(loaded["llama"], title=TITLE, rag=str(store_dir), k=2, max_new_tokens=8)["retrieved"] == hits
    with pytest.raises(UserError, match="no RAG store"):
        A.answer(loaded["llama"], title=TITLE, rag=str(store_dir.parent / "nowhere"))


# ----------------------------------------------------------------------------------------------
# The commands (subprocess, as a user runs them)
# ----------------------------------------------------------------------------------------------


def prodtune(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prodtune", *args], capture_output=True, text=True, input=stdin,
                          cwd=ROOT, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.slow
def test_generate_json_prints_one_object_per_track(runs: dict[str, Path]) -> None:
    res = prodtune("generate", "--run", str(runs["llama"]), "--title", TITLE, "--json", "--max_new_tokens", "8",
                   "--device", "cpu")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # the whole stdout is one JSON object
    assert out["track"] == "llama" and isinstance(out["text"], str) and out["prompt"] == P.alpaca_prompt(TITLE)
    res = prodtune("generate", "--run", str(runs["deepseek"]), "--question", QUESTION, "--json", "--max_new_tokens", "8")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"text", "thinking", "answer"} <= set(out)


@pytest.mark.slow
def test_generate_streams_and_shows_retrieved_products_with_rag(runs: dict[str, Path], store_dir: Path) -> None:
    res = prodtune("generate", "--run", str(runs["llama"]), "--title", TITLE, "--rag", "--k", "2", "--stream",
                   "--max_new_tokens", "8")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("retrieved:") and "(U0)" in res.stdout
    res = prodtune("generate", "--run", str(runs["llama"]), "--title", TITLE, "--rag", "--store", str(store_dir),
                   "--json", "--max_new_tokens", "8")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["retrieved"][0]["uid"] == "U0"


@pytest.mark.slow
def test_generate_user_errors_are_one_line_and_exit_2(runs: dict[str, Path], tmp_path: Path) -> None:
    res = prodtune("generate", "--run", str(tmp_path / "none"), "--title", TITLE)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "does not exist" in res.stderr
    res = prodtune("generate", "--run", str(runs["deepseek"]), "--title", TITLE)
    assert res.returncode == 2 and "answers a question" in res.stderr


@pytest.mark.slow
def test_chat_answers_each_line_until_exit(runs: dict[str, Path]) -> None:
    res = prodtune("chat", "--run", str(runs["deepseek"]), "--max_new_tokens", "6",
                   stdin=f"{QUESTION}\n\nIs it machine washable?\nexit\nnever asked\n")
    assert res.returncode == 0, res.stderr
    assert res.stdout.count("> ") == 4  # two questions, the blank line, exit; the line after exit is never read
    assert "never asked" not in res.stdout
    res = prodtune("chat", "--run", str(runs["llama"]), "--max_new_tokens", "6", "--no_stream", stdin=f"{TITLE}\n")
    assert res.returncode == 0, res.stderr  # EOF ends it too
    assert res.stdout.count("> ") == 1
