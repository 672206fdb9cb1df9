"""The pruned greedy loop (`greedy.greedy_stream`, `models.generate(engine="pruned")`: continuous batching) against
transformers' `generate` on a tiny random Llama (SmolLM2's tokenizer) built in the test, plain and with a LoRA
adapter, and the decoding processors (`decoding`) on it.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_decoding.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from prodtune import models as MD
from prodtune import prompts as P
from prodtune.decoding import ThinkBeforeEOS

TITLES = ["Birchmont Extra Thick Exercise Mat 5mm", "Mug", "The Hidden Garden: A Novel, first edition, hardcover",
          "USB-C Cable (2 m)", "Tea", "Stainless steel water bottle, 750 ml, keeps drinks cold for 24 hours"]
PROMPTS = TITLES + [P.alpaca_prompt(t) for t in TITLES[:3]]  # 1 to ~70 tokens: the batch is left-padded


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model with extra EOS ids taken from its own greedy output, so that rows end at different steps
    (a random model never writes the real EOS): the pruned loop drops rows while others go on."""
    model, tok = MD.load_for_inference(str(MD.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")))
    free = MD.generate(model, tok, PROMPTS, max_new_tokens=16, progress=False, engine="transformers")
    extra = set()
    for k, r in enumerate(free[:4]):  # row k's token at step 2 + 3k ends it (and whichever rows write it too)
        extra.add(tok(r["text"], add_special_tokens=False)["input_ids"][min(2 + 3 * k, 12)])
    model.generation_config.eos_token_id = sorted({tok.eos_token_id, *extra})
    return model, tok


def _both(model, tok, **kw):
    pruned = MD.generate(model, tok, PROMPTS, max_new_tokens=16, progress=False, engine="pruned", **kw)
    ref = MD.generate(model, tok, PROMPTS, max_new_tokens=16, progress=False, engine="transformers", **kw)
    return pruned, ref


@pytest.mark.parametrize("batch_size", [16, 3])
@pytest.mark.parametrize("decoding", [{}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.3},
                                      {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}])
def test_pruned_loop_gives_transformers_tokens(tiny, decoding, batch_size) -> None:
    """All rows at once (16), or 3 at a time, refilled as rows end: the tokens of transformers' batches."""
    model, tok = tiny
    pruned, ref = _both(model, tok, batch_size=batch_size, **decoding)
    keys = ("text", "new_tokens", "finished")
    assert [[r[k] for k in keys] for r in pruned] == [[r[k] for k in keys] for r in ref]
    ends = sorted({r["new_tokens"] for r in pruned if r["finished"]})
    assert len(ends) >= 2 and not all(r["finished"] for r in pruned)  # rows left the batch at different steps


def test_pruned_loop_with_a_lora_adapter(tiny) -> None:
    model, tok = tiny
    lora = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": list(MD.DEFAULT_TARGET_MODULES), "seed": 1}
    from peft import get_peft_model

    peft_model = get_peft_model(model, MD.lora_config(lora))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.2)  # B starts at zero: make the adapter change the answers
    peft_model.eval()
    try:
        pruned, ref = _both(peft_model, tok, batch_size=4, no_repeat_ngram_size=2)
        with peft_model.disable_adapter():
            base, _ = _both(peft_model, tok, batch_size=4, no_repeat_ngram_size=2)
    finally:
        peft_model.unload()  # the module-scoped tiny model goes back to plain layers
    assert [r["text"] for r in pruned] == [r["text"] for r in ref]
    assert [r["text"] for r in pruned] != [r["text"] for r in base]


def test_auto_engine_and_its_limits(tiny, monkeypatch) -> None:
    model, tok = tiny
    calls: list[int] = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(1) or real(**kw))
    MD.generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False)  # greedy on a CPU: the pruned loop
    assert calls == []
    MD.generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False, temperature=0.7)  # sampling: generate
    MD.generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False, stop=["x"])  # stop strings: generate
    assert len(calls) == 2
    with pytest.raises(ValueError, match="greedily"):
        MD.generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False, engine="pruned", temperature=0.7)
    with pytest.raises(ValueError, match="engine"):
        MD.generate(model, tok, PROMPTS[:2], max_new_tokens=4, progress=False, engine="vllm")


def test_think_before_eos_follows_the_pruning(tiny) -> None:
    """A stateful processor renumbers its rows when finished ones leave the batch: row 2 was satisfied; after rows
    0 and 1 leave, it is row 0, still satisfied; an unsatisfied row stays banned."""
    _, tok = tiny
    proc = ThinkBeforeEOS(tok, 0, [tok.eos_token_id])
    proc.done = {2, 3}
    proc.select([2, 4])
    assert proc.done == {0}
    rows = [tok(t, add_special_tokens=False)["input_ids"] for t in ("<think>a</think>yes", "<think>still")]
    width = max(map(len, rows))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
    out = proc(ids, torch.zeros(2, len(tok)))
    assert out[0, tok.eos_token_id] == 0 and torch.isinf(out[1, tok.eos_token_id])


def test_rows_with_their_own_token_limits_share_a_batch(tiny) -> None:
    """One batch, a limit per row (stage 06 pools systems of different lengths): each row gets what a batch of its
    own limit gives, from either engine."""
    model, tok = tiny
    limits = [3, 16, 7, 16, 1, 11, 16, 5, 9]
    mixed = MD.generate(model, tok, PROMPTS, max_new_tokens=limits, batch_size=16, progress=False, engine="pruned")
    grouped = MD.generate(model, tok, PROMPTS, max_new_tokens=limits, batch_size=16, progress=False,
                          engine="transformers")
    for lim in sorted(set(limits)):
        own = MD.generate(model, tok, PROMPTS, max_new_tokens=lim, batch_size=16, progress=False, engine="transformers")
        for i in (i for i, x in enumerate(limits) if x == lim):
            assert mixed[i]["text"] == own[i]["text"] == grouped[i]["text"]
            assert mixed[i]["new_tokens"] == own[i]["new_tokens"] <= lim
    assert any(not r["finished"] and r["new_tokens"] == lim for r, lim in zip(mixed, limits) if lim < 16)
    with pytest.raises(ValueError, match="one per prompt"):
        MD.generate(model, tok, PROMPTS, max_new_tokens=[4, 4], progress=False)


def test_growing_cache_writes_in_place_and_keeps_the_values(tiny) -> None:
    from transformers import DynamicCache

    from prodtune.greedy import growing_cache

    model, tok = tiny
    enc = tok(["Mug", "A longer title for a mug"], return_tensors="pt", padding=True)
    grow, plain = growing_cache(model.config, reserve=4), DynamicCache(config=model.config)
    assert type(grow.layers[0]).__name__ == "GrowingLayer"
    with torch.inference_mode():
        for cache in (grow, plain):
            model(**enc, past_key_values=cache, use_cache=True)
        buf = grow.layers[0]._k.data_ptr()
        for step in range(4):  # within the reserve: the same buffer
            ids = torch.full((2, 1), 42 + step)
            mask = torch.ones((2, enc["input_ids"].shape[1] + step + 1), dtype=torch.long)
            for cache in (grow, plain):
                model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)
        assert grow.layers[0]._k.data_ptr() == buf
        grow.batch_select_indices(torch.tensor([1]))
        plain.batch_select_indices(torch.tensor([1]))
        model(input_ids=torch.full((1, 1), 7), attention_mask=torch.ones((1, mask.shape[1] + 1), dtype=torch.long),
              past_key_values=grow, use_cache=True)  # past the reserve: grown once more
        model(input_ids=torch.full((1, 1), 7), attention_mask=torch.ones((1, mask.shape[1] + 1), dtype=torch.long),
              past_key_values=plain, use_cache=True)
    assert grow.get_seq_length() == plain.get_seq_length() == enc["input_ids"].shape[1] + 5
    for g, p in zip(grow.layers, plain.layers):
        assert torch.equal(g.keys, p.keys) and torch.equal(g.values, p.values)


def test_rows_are_admitted_while_others_generate(tiny) -> None:
    """Continuous batching: with 3 rows at most, new prompts are prefilled while earlier rows are still generating
    and join their batch (a decode step holds rows of two admissions); no step holds more than 3 rows; every prompt
    is reported once through `on_result` as it ends, with the result `generate` returns."""
    model, tok = tiny
    calls: list[tuple[int, bool]] = []  # (rows, prefill) per forward pass

    def hook(module, args, kwargs):
        cache = kwargs.get("past_key_values")
        calls.append((kwargs["input_ids"].shape[0], cache is None or cache.get_seq_length() == 0))

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    seen: list[tuple[int, dict]] = []
    try:
        out = MD.generate(model, tok, PROMPTS, max_new_tokens=16, batch_size=3, progress=False, engine="pruned",
                          on_result=lambda i, r: seen.append((i, r)))
    finally:
        handle.remove()
    assert max(rows for rows, _ in calls) <= 3
    prefills = [k for k, (_, pre) in enumerate(calls) if pre]
    assert len(prefills) >= 3 and prefills[1] > 1  # later admissions came after decode steps had run
    merged = any(calls[k + 1][0] > calls[k][0] and not calls[k + 1][1] and k > 0 for k in prefills)
    assert merged, calls  # the step after an admission ran the new rows with the ones already generating
    assert sorted(i for i, _ in seen) == list(range(len(PROMPTS)))
    assert all(out[i] == r for i, r in seen) and all(r["seconds"] > 0 for r in out)


def test_regroup_drops_shared_padding_and_appends_new_rows() -> None:
    """A regroup keeps chosen rows without the columns that are padding in all of them, adds another cache's rows,
    both right-aligned with zeros on the left, and leaves room to grow in place."""
    from transformers import LlamaConfig

    from prodtune.greedy import growing_cache

    cfg = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=1,
                      intermediate_size=8, vocab_size=10)
    a, b = growing_cache(cfg, reserve=3), growing_cache(cfg, reserve=3)
    ka = torch.arange(3 * 6 * 4, dtype=torch.float32).view(3, 1, 6, 4)
    kb = -torch.arange(2 * 2 * 4, dtype=torch.float32).view(2, 1, 2, 4) - 1
    a.update(ka, ka + 0.5, 0)
    b.update(kb, kb + 0.5, 0)
    layer = a.layers[0]
    layer.regroup(torch.tensor([0, 2]), 2, b.layers[0], 4, 3)  # rows 0 and 2 lose 2 columns; b's rows are padded
    assert layer.keys.shape == (4, 1, 4, 4) and layer._k.shape[-2] == 7 and a.get_seq_length() == 4
    assert torch.equal(layer.keys[:2], ka[[0, 2], :, 2:]) and torch.equal(layer.values[:2], ka[[0, 2], :, 2:] + 0.5)
    assert torch.equal(layer.keys[2:, :, 2:], kb) and not layer.keys[2:, :, :2].any()
    buf = layer._k.data_ptr()
    step = torch.ones(4, 1, 1, 4)
    a.update(step, step, 0)
    assert layer._k.data_ptr() == buf and a.get_seq_length() == 5


def test_gqa_attention_is_bit_identical_and_restored(tiny) -> None:
    """Inside `gqa_attention` a padded batch attends through grouped-query SDPA without repeating keys: the same
    logits bit for bit; the model is back on SDPA after it."""
    from prodtune.greedy import GQA_ATTENTION, gqa_attention

    model, tok = tiny
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True)
    assert model.config._attn_implementation == "sdpa" and model.config.num_key_value_heads < model.config.num_attention_heads
    with torch.inference_mode():
        plain = model(**enc).logits
        with gqa_attention(model):
            assert model.config._attn_implementation == GQA_ATTENTION
            grouped = model(**enc).logits
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(plain, grouped)


def test_grounded_claims_allows_only_what_the_source_holds(tiny) -> None:
    from prodtune.decoding import GroundedClaims

    _, tok = tiny
    g = GroundedClaims(tok, 0, ["Nordvik Insulated Bottle 750 ml, 2.5 L jug"])
    said = "It keeps drinks cold for hours and"
    assert g.allowed(0, said, said + " Nordvik") and g.allowed(0, said, said + " Nord")  # a word of the source, growing
    assert not g.allowed(0, said, said + " Samsung") and not g.allowed(0, said, said + " Nordic")
    assert g.allowed(0, said, said + " steel")  # lower-case words are not claims
    assert g.allowed(0, "It is cold.", "It is cold. Samsung")  # a sentence's first word is not a claim
    assert g.allowed(0, "holds", "holds 7") and g.allowed(0, "holds 7", "holds 75") and g.allowed(0, "holds 75", "holds 750")
    assert not g.allowed(0, "holds 750", "holds 7500") and not g.allowed(0, "holds", "holds 9")
    assert g.allowed(0, "holds 2", "holds 2.") and g.allowed(0, "holds 2.", "holds 2.5")
    # no second space: a banned name must not be stepped round with whitespace and punctuation
    assert not g.allowed(0, said, said + " ") and not g.allowed(0, said + " ", said + "  'A")
    assert g.allowed(0, "cold.\n", "cold.\n\n")  # paragraphs are not spaces


def test_grounded_claims_takes_the_best_supported_token(tiny) -> None:
    from prodtune.decoding import GroundedClaims

    _, tok = tiny
    rows = ["Nordvik Bottle", "Samsung Cable"]
    ids = [tok(f"Title: {t}\nIt is a", add_special_tokens=False)["input_ids"] for t in rows]
    width = max(map(len, ids))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in ids])
    sam, nord, good = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" Samsung", " Nordvik", " good"))
    scores = torch.zeros(2, len(tok))
    scores[:, sam], scores[:, nord], scores[:, good] = 3.0, 2.0, 1.0
    g = GroundedClaims(tok, width, [f"Title: {t}\nIt is a" for t in rows])
    g.start = width - 3  # the last 3 tokens are "generated"
    out = g(ids, scores.clone())
    assert out[0].argmax() == good or out[0].argmax() == nord  # " Samsung" is not in row 0's source
    assert out[1].argmax() == sam  # it is in row 1's
    g.select([1])
    assert g.numbers == [g.numbers[0]] and g(ids[1:], scores[1:].clone())[0].argmax() == sam


def test_grounded_claims_falls_back_to_a_plain_word(tiny) -> None:
    """When every token it may try states an unsupported claim, the best lower-case word is taken, not the best of
    what is left (a dash or a quote that steps round the banned name)."""
    from prodtune.decoding import GroundedClaims, lowercase_word_tokens

    _, tok = tiny
    ids = torch.tensor([tok("Title: Nordvik Bottle\nIt is a", add_special_tokens=False)["input_ids"]])
    sam, app, dash, good = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" Samsung", " Apple", "-", " good"))
    scores = torch.zeros(1, len(tok))
    scores[0, sam], scores[0, app], scores[0, dash], scores[0, good] = 4.0, 3.0, 2.0, 1.0
    g = GroundedClaims(tok, ids.shape[1] - 2, ["Title: Nordvik Bottle\nIt is a"], max_tries=2)
    assert g(ids, scores.clone())[0].argmax() == good
    safe = lowercase_word_tokens(tok)
    assert safe[good] and not safe[dash] and not safe[sam] and safe.sum() > 1000
    g.safe = None  # without the fallback: the dash
    assert g(ids, scores.clone())[0].argmax() == dash
    # a supported name may close a quote ("Times'" is Times, as metrics.claim_check reads it)
    said = "It was called 'a fine bottle' by"
    assert g.allowed(0, said + " Nordvik", said + " Nordvik'") and not g.allowed(0, said + " Nord", said + " Nordic'")
    assert not g.allowed(0, said + " Nord", said + " Nord----")  # dashes grow the word too ("The Golden Re-----")
    assert g.allowed(0, said + " Nordvik", said + " Nordvik, ")  # a comma after it does not
    # a name ends as a whole word of the source, not as the prefix it grew through ("The Sh ceilings": claim "sh")
    assert g.allowed(0, said, said + " Sh") and g.allowed(0, said + " Sh", said + " She")  # "Sh" may grow to "She"
    assert not g.allowed(0, said + " Sh", said + " Sh ceilings") and not g.allowed(0, said + " Nord", said + " Nord.")
    assert not g.allowed(0, said + " Nord", said + " Nord")  # nor stop there (EOS decodes to nothing)
    assert g.allowed(0, said + " Nordvik", said + " Nordvik jug") and g.allowed(0, said + " A", said + " A jug")
    assert g.allowed(0, "It is cold. Sh", "It is cold. Sh is")  # a sentence's first word is no claim
    assert not g.allowed(0, said + " Nord", said + " Nord'") and not g.allowed(0, said + " Nord", said + " Nord-")
    assert not g.allowed(0, said + " Nord", said + " Nord'\"") and g.allowed(0, said + " Nordvik", said + " Nordvik'\"")


def test_grounded_claims_completes_a_name_begun_from_a_prefix(tiny) -> None:
    """When the text ends in a prefix of a source word ("the Nord") and the best tokens would end it there or make
    another word of it, the rest of the source word is written ("vik"), not a lower-case word after the prefix."""
    from prodtune.decoding import GroundedClaims

    _, tok = tiny
    ids = torch.tensor([tok("It is the Nord", add_special_tokens=False)["input_ids"]])
    jug, ic = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" jug", "ic"))
    vik = tok("vik", add_special_tokens=False)["input_ids"][0]
    scores = torch.zeros(1, len(tok))
    scores[0, jug], scores[0, ic], scores[0, vik] = 3.0, 2.0, -1.0
    g = GroundedClaims(tok, 0, ["Nordvik Bottle"], max_tries=2)
    assert tok.decode([*ids[0].tolist(), vik]).endswith("Nordvik")
    assert g(ids, scores.clone())[0].argmax() == vik
    g.spelt = [[]]  # nothing to complete it with: a lower-case word (" jug" was tried and banned), and "Nord" stays
    best = int(g(ids, scores.clone())[0].argmax())
    assert best not in (vik, jug, ic) and bool(g.safe[best])


def test_grounded_decoding_writes_fewer_unsupported_claims(tiny) -> None:
    """End to end on the random model (which writes capitalised words and digits at random): grounded, its answers
    hold far fewer claims that the prompt lacks, and both greedy loops give the same tokens."""
    from prodtune.metrics import claim_check

    model, tok = tiny
    free = MD.generate(model, tok, PROMPTS, max_new_tokens=24, progress=False, engine="pruned")
    grounded = MD.generate(model, tok, PROMPTS, max_new_tokens=24, progress=False, engine="pruned", ground_claims=True)
    ref = MD.generate(model, tok, PROMPTS, max_new_tokens=24, progress=False, engine="transformers", ground_claims=True)
    assert [r["text"] for r in grounded] == [r["text"] for r in ref]
    n_free = sum(len(claim_check(r["text"], p)["unsupported"]) for r, p in zip(free, PROMPTS))
    n_grounded = sum(len(claim_check(r["text"], p)["unsupported"]) for r, p in zip(grounded, PROMPTS))
    assert n_free >= 5 and n_grounded <= n_free // 4, (n_free, n_grounded)


def test_think_budget_closes_the_reasoning_and_leaves_room_to_answer(tiny) -> None:
    """The random model never writes </think>: with a budget of 6 tokens every reply closes it right after them (R1's
    `\\n</think>\\n\\n`) and goes on to an answer; both greedy loops agree; without a budget none closes it."""
    from prodtune.metrics import think_adherence

    model, tok = tiny
    prompts = [p + "<think>\n" for p in PROMPTS]
    kw = dict(max_new_tokens=20, progress=False, think_before_eos=True)
    free = MD.generate(model, tok, prompts, engine="pruned", **kw)
    pruned = MD.generate(model, tok, prompts, engine="pruned", think_budget=6, **kw)
    ref = MD.generate(model, tok, prompts, engine="transformers", think_budget=6, **kw)
    assert [r["text"] for r in pruned] == [r["text"] for r in ref]
    assert not any("</think>" in r["text"] for r in free)
    close = tok("\n</think>\n\n", add_special_tokens=False)["input_ids"]
    for r, p in zip(pruned, prompts):
        ids = tok(r["text"], add_special_tokens=False)["input_ids"]
        assert "</think>" in r["text"] and think_adherence(r["text"], p), r["text"]
        assert len(tok(r["text"].split("</think>")[0], add_special_tokens=False)["input_ids"]) <= 6 + len(close)
        assert len(ids) > 6 + len(close)  # an answer after it
