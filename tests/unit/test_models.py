"""Model loading and generation on CPU with a tiny random Llama (SmolLM2's tokenizer) built in the test.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_models.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prodtune import models as MD
from prodtune import prompts as P

TITLES = ["Birchmont Extra Thick Exercise Mat 5mm", "Mug", "The Hidden Garden: A Novel, first edition, hardcover", "USB-C Cable (2 m)", "Tea"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return MD.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(MD.DEFAULT_TARGET_MODULES), "seed": 3407}


def test_cpu_train_model_has_lora_on_all_projections(tiny_dir: Path) -> None:
    model, tok, backend = MD.load_train_model(str(tiny_dir), max_seq_length=64, lora=LORA, device="cpu")
    assert backend == "cpu" and tok.pad_token is not None
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    for proj in MD.DEFAULT_TARGET_MODULES:  # 2 layers x (A, B) per projection
        assert sum(f".{proj}.lora_" in n for n in trainable) == 4, proj
    assert next(model.parameters()).dtype == torch.float32  # bf16 matmuls crawl on CPUs without AMX


def test_lora_seed_makes_init_reproducible(tiny_dir: Path) -> None:
    a, _, _ = MD.load_train_model(str(tiny_dir), max_seq_length=64, lora=LORA, device="cpu")
    b, _, _ = MD.load_train_model(str(tiny_dir), max_seq_length=64, lora=LORA, device="cpu")
    c, _, _ = MD.load_train_model(str(tiny_dir), max_seq_length=64, lora={**LORA, "seed": 1}, device="cpu")
    name = next(n for n, _ in a.named_parameters() if "lora_A" in n)
    pa, pb, pc = (dict(m.named_parameters())[name] for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)


@pytest.mark.parametrize("bad", [{"rank": 8}, {"r": 8, "lora_alpha": 16}])
def test_lora_config_rejects_unknown_keys(bad: dict) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        MD.lora_config(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("name", ["unsloth/llama-3-8b-bnb-4bit", "unsloth/DeepSeek-R1-Distill-Llama-8B-bnb-4bit"])
def test_4bit_hub_model_on_cpu_fails_clearly(name: str) -> None:
    with pytest.raises(RuntimeError, match="CUDA"):
        MD.load_train_model(name, max_seq_length=64, lora=LORA)
    with pytest.raises(RuntimeError, match="CUDA"):
        MD.load_for_inference(name)


def test_load_tokenizer_adds_missing_pad(tiny_dir: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "tok"
    tok = MD.load_tokenizer(tiny_dir)
    tok.pad_token = None
    tok.save_pretrained(cfg_path)
    assert MD.load_tokenizer(cfg_path).pad_token == tok.eos_token


@pytest.fixture(scope="module")
def tiny_model(tiny_dir: Path):
    return MD.load_for_inference(str(tiny_dir))


def test_generate_batched_equals_one_by_one(tiny_model) -> None:
    model, tok = tiny_model
    prompts = TITLES + [P.alpaca_prompt(t) for t in TITLES[:2]]  # lengths from 1 to ~70 tokens
    batched = MD.generate(model, tok, prompts, max_new_tokens=12, batch_size=4, progress=False)
    single = MD.generate(model, tok, prompts, max_new_tokens=12, batch_size=1, progress=False)
    assert [r["text"] for r in batched] == [r["text"] for r in single]  # left padding changes nothing
    assert len({r["text"] for r in batched[:5]}) == 5  # different prompts, different continuations
    assert tok.padding_side == "right"  # restored after generation
    for r in batched:
        assert set(r) == {"text", "new_tokens", "seconds", "finished"}
        assert 1 <= r["new_tokens"] <= 12 and r["seconds"] > 0


def test_generate_token_budget_batches(tiny_model, monkeypatch) -> None:
    model, tok = tiny_model
    prompts = TITLES + [P.alpaca_prompt(t) for t in TITLES[:2]]  # lengths from 1 to ~70 tokens
    sizes: list[int] = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: sizes.append(kw["input_ids"].shape[0]) or real(**kw))
    lengths = [len(x) for x in tok(prompts)["input_ids"]]
    budget = 2 * (max(lengths) + 8)  # room for two of the longest prompts, more of the short ones
    out = MD.generate(model, tok, prompts, max_new_tokens=8, batch_size=16, max_batch_tokens=budget, progress=False,
                      engine="transformers")  # counted through model.generate
    single = MD.generate(model, tok, prompts, max_new_tokens=8, batch_size=1, progress=False, engine="transformers")
    assert [r["text"] for r in out] == [r["text"] for r in single[: len(prompts)]]
    assert sum(sizes[: len(sizes) - len(prompts)]) == len(prompts) and max(sizes) > 2  # short prompts share a batch
    assert len(sizes) - len(prompts) >= 2  # the long ones were split off


def test_generate_keeps_input_order(tiny_model) -> None:
    model, tok = tiny_model
    prompts = TITLES
    fwd = MD.generate(model, tok, prompts, max_new_tokens=6, batch_size=2, progress=False)
    rev = MD.generate(model, tok, prompts[::-1], max_new_tokens=6, batch_size=2, progress=False)
    assert [r["text"] for r in fwd] == [r["text"] for r in rev][::-1]


def test_generate_stop_strings_and_sampling(tiny_model) -> None:
    model, tok = tiny_model
    greedy = MD.generate(model, tok, TITLES, max_new_tokens=10, progress=False)
    assert not any(r["finished"] for r in greedy)  # a random model does not emit EOS: it runs to max_new_tokens
    assert all(r["new_tokens"] == 10 for r in greedy)
    stop = greedy[0]["text"].split()[2]  # a word in the middle of the first continuation
    stopped = MD.generate(model, tok, TITLES, max_new_tokens=10, stop=[stop], progress=False)
    assert stopped[0]["text"] == greedy[0]["text"].split(stop, 1)[0] and stopped[0]["finished"]
    assert stopped[0]["new_tokens"] < 10
    s1 = MD.generate(model, tok, TITLES, max_new_tokens=10, temperature=1.0, seed=1, progress=False)
    s2 = MD.generate(model, tok, TITLES, max_new_tokens=10, temperature=1.0, seed=1, progress=False)
    assert [r["text"] for r in s1] == [r["text"] for r in s2]  # seeded sampling is reproducible
    assert [r["text"] for r in s1] != [r["text"] for r in greedy]
    with pytest.raises(ValueError):
        MD.generate(model, tok, TITLES, max_new_tokens=0)


def test_load_for_inference_applies_adapter(tiny_dir: Path, tmp_path: Path) -> None:
    model, tok, _ = MD.load_train_model(str(tiny_dir), max_seq_length=64, lora=LORA, device="cpu")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)  # a non-zero adapter (B starts at zero)
    model.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == LORA["r"]
    assert MD.adapter_base_model(tmp_path / "adapter") == str(tiny_dir)

    tuned, tok2 = MD.load_for_inference(str(tiny_dir), tmp_path / "adapter")
    base, _ = MD.load_for_inference(str(tiny_dir))
    ids = tok2([P.alpaca_prompt("Mug")], return_tensors="pt")
    with torch.no_grad():
        lt, lb = tuned(**ids).logits, base(**ids).logits
        with tuned.disable_adapter():
            ld = tuned(**ids).logits
    assert not torch.allclose(lt, lb, atol=1e-3)
    assert torch.allclose(ld, lb, atol=1e-5)  # disable_adapter() gives the base model back
    assert not tuned.training


@pytest.mark.parametrize(
    "name, cuda, asked, n_params, expected",
    [
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", True, None, None, True),  # not pre-quantised: 16 GB in 16 bits
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", True, None, 8_030_261_248, True),
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", True, False, None, False),  # the caller asks for 16 bits
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", False, None, None, False),  # CPU: never (bitsandbytes needs CUDA)
        ("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", False, True, None, False),
        ("unsloth/llama-3-8b-bnb-4bit", True, None, None, True),
        ("unsloth/llama-3-8b-bnb-4bit", True, False, None, True),  # its weights are stored in 4-bit
        ("/models/smollm2-135m-instruct", True, None, 134_515_008, False),  # small: its 16-bit weights fit any card
        ("/models/smollm2-135m-instruct", True, True, 134_515_008, True),
    ],
)
def test_inference_4bit_decision(name: str, cuda: bool, asked: bool | None, n_params: int | None,
                                 expected: bool) -> None:
    assert MD.inference_4bit(name, cuda, asked, n_params=n_params) is expected


def test_local_param_count_reads_the_headers(tiny_dir: Path) -> None:
    model, _ = MD.load_for_inference(str(tiny_dir))
    assert MD.local_param_count(tiny_dir) == sum(p.numel() for p in model.parameters())
    assert MD.local_param_count("deepseek-ai/DeepSeek-R1-Distill-Llama-8B") is None  # a hub id: nothing downloaded
    # the tiny model would stay 16-bit on CUDA; an 8B folder of the real shape would not
    assert MD.inference_4bit(str(tiny_dir), True, n_params=MD.local_param_count(tiny_dir)) is False


def test_with_loaded_model_frees_each_model_before_the_next(tiny_dir: Path, tmp_path: Path) -> None:
    import weakref

    model, tok, _ = MD.load_train_model(str(tiny_dir), max_seq_length=64, lora=LORA, device="cpu")
    model.save_pretrained(tmp_path / "adapter")  # a peft model, as stage 06 loads
    del model
    refs: list[weakref.ref] = []

    def work(model, tok) -> list[bool]:
        refs.append(weakref.ref(model))
        return [r() is None for r in refs[:-1]]  # are the earlier models gone while this one runs?

    assert MD.with_loaded_model(str(tiny_dir), tmp_path / "adapter", work) == []
    assert MD.with_loaded_model(str(tiny_dir), tmp_path / "adapter", work) == [True]
    assert refs[-1]() is None
    held: list = []
    MD.with_loaded_model(str(tiny_dir), None, lambda m, t: held.append(m))  # work that keeps the model keeps it
    assert held and held[0] is not None


def test_no_repeat_ngram_and_repetition_penalty_stop_loops(tiny_model) -> None:
    """A random model's greedy text loops; the anti-loop decoding a run card records takes the loop away."""
    model, tok = tiny_model
    enc = tok([P.alpaca_prompt(TITLES[0])], return_tensors="pt")

    def new_ids(**kw) -> list[int]:
        with torch.inference_mode():
            out = model.generate(**enc, **MD.generation_kwargs(model, tok, max_new_tokens=60,
                                                               prompt_length=enc["input_ids"].shape[1], **kw))
        return out[0, enc["input_ids"].shape[1]:].tolist()

    def repeated_bigrams(seq: list[int]) -> int:
        grams = list(zip(seq, seq[1:]))
        return len(grams) - len(set(grams))

    plain = new_ids()
    assert repeated_bigrams(plain) > 0  # the premise: greedy decoding of a random model loops
    assert repeated_bigrams(new_ids(no_repeat_ngram_size=2)) == 0
    assert len(set(new_ids(no_repeat_ngram_size=1))) == 60  # no token twice
    assert repeated_bigrams(new_ids(repetition_penalty=1.5)) < repeated_bigrams(plain)
    with pytest.raises(ValueError, match="prompt_length"):
        MD.generation_kwargs(model, tok, max_new_tokens=4, no_repeat_ngram_size=2)
    assert MD.generation_kwargs(model, tok, max_new_tokens=4, repetition_penalty=1.0) == MD.generation_kwargs(
        model, tok, max_new_tokens=4)  # 1.0 / 0: off, the settings of every older run
    texts = MD.generate(model, tok, [P.alpaca_prompt(t) for t in TITLES], max_new_tokens=60, no_repeat_ngram_size=2,
                        progress=False)  # the batched path takes the settings too
    plain_texts = MD.generate(model, tok, [P.alpaca_prompt(t) for t in TITLES], max_new_tokens=60, progress=False)
    assert [r["text"] for r in texts] != [r["text"] for r in plain_texts]


def test_anti_loop_decoding_ignores_the_prompt() -> None:
    """The prompt's n-grams and tokens stay allowed (a RAG answer may quote its context, a description its title);
    only what was generated is banned from repeating or penalised."""
    prompt, generated = [5, 6, 7, 8], [9, 5, 6]
    ids = torch.tensor([prompt + generated])
    scores = torch.zeros(1, 12)
    (ngram,) = MD.anti_loop_processors(len(prompt), no_repeat_ngram_size=2)
    assert torch.isfinite(ngram(ids, scores.clone())).all()  # "5 6 -> 7" is a prompt bigram: not banned
    again = torch.tensor([prompt + [5, 6, 1, 5]])  # the generated text holds "5 6" ... and now ends with 5
    assert torch.isinf(ngram(again, scores.clone())[0, 6]) and torch.isfinite(ngram(again, scores.clone())[0, 7])
    (pen,) = MD.anti_loop_processors(len(prompt), repetition_penalty=2.0)
    out = pen(ids, torch.ones(1, 12))
    assert out[0, 9] == 0.5 and out[0, 5] == 0.5 and out[0, 7] == 1.0 and out[0, 8] == 1.0  # 7, 8: prompt only
    assert len(MD.anti_loop_processors(4)) == 0


def test_think_before_eos_bans_eos_until_the_reasoning_is_closed_and_answered(tiny_model) -> None:
    """The DeepSeek track's decoding: a reply may not stop inside `<think>` or right after `</think>`; each row of a
    batch is judged on its own generated text (never the prompt's), and a satisfied row is left alone."""
    model, tok = tiny_model
    eos = tok.eos_token_id
    prompt = tok("A shopper asks: is it </think> waterproof? answer", add_special_tokens=False)["input_ids"]

    def ids(*replies: str) -> torch.Tensor:
        rows = [tok(r, add_special_tokens=False)["input_ids"] for r in replies]
        width = max(map(len, rows))
        return torch.tensor([prompt + [tok.pad_token_id] * (width - len(r)) + r for r in rows])  # left-padded

    (proc,) = MD.anti_loop_processors(len(prompt), think_before_eos=True, tokenizer=tok, eos_ids=[eos])
    batch = ids("<think>\nIt is a mat.", "<think>\nIt is a mat.\n</think>\n\n", "<think>\nIt is a mat.\n</think>\n\nYes, it is.")
    out = proc(batch, torch.zeros(3, len(tok)))
    assert torch.isinf(out[0, eos]) and torch.isinf(out[1, eos])  # inside the reasoning; closed but no answer yet
    assert out[2, eos] == 0 and torch.isfinite(out[0, :eos]).all()  # answered: EOS allowed; other tokens untouched
    with pytest.raises(ValueError, match="tokenizer"):
        MD.anti_loop_processors(len(prompt), think_before_eos=True)
    # Through generate: make the token the random model writes first an EOS, so a plain reply stops at once; with
    # the ban it cannot stop before a closed, answered block, which a random model never writes.
    first = tok(MD.generate(model, tok, ["<think>"], max_new_tokens=1, progress=False)[0]["text"],
                add_special_tokens=False)["input_ids"][0]
    saved = model.generation_config.eos_token_id
    try:
        model.generation_config.eos_token_id = [eos, first]
        plain = MD.generate(model, tok, ["<think>"], max_new_tokens=8, progress=False)
        banned = MD.generate(model, tok, ["<think>"], max_new_tokens=8, progress=False, think_before_eos=True)
    finally:
        model.generation_config.eos_token_id = saved
    assert plain[0]["finished"] and plain[0]["new_tokens"] == 1
    assert not banned[0]["finished"] and banned[0]["new_tokens"] == 8
