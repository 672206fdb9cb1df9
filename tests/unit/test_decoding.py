"""The pruned greedy loop (`decoding.greedy_pruned`, `models.generate(engine="pruned")`) against transformers'
`generate` on a tiny random Llama (SmolLM2's tokenizer) built in the test, plain and with a LoRA adapter.

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


@pytest.mark.parametrize("decoding", [{}, {"no_repeat_ngram_size": 2}, {"repetition_penalty": 1.3},
                                      {"no_repeat_ngram_size": 3, "repetition_penalty": 1.2}])
def test_pruned_loop_gives_transformers_tokens(tiny, decoding) -> None:
    model, tok = tiny
    pruned, ref = _both(model, tok, batch_size=16, **decoding)
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
