"""Stage 02's `local` backend with a tiny random Llama (SmolLM2's tokenizer): the forced JSON skeleton holds.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_cot_local.py -q

A random model emits near-uniform tokens, the worst case for structure: in `fields` mode every reply must
still parse as the three-key object (the gates then reject the nonsense), while `free` mode fails and says so.
The real SmolLM2 runs in tests/functional/test_nb_02.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prodtune import cot, prompts
from prodtune.cot import CoTConfig
from prodtune.cot.local import LocalBackend


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from prodtune.models import embedded_llm_dir

    tok = AutoTokenizer.from_pretrained(embedded_llm_dir())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    out = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _cfg(model: Path, data: Path, out: Path, **kw) -> CoTConfig:
    return CoTConfig(**{"backend": "local", "model": str(model), "n": 4, "local_batch_size": 4, "local_threads": 1,
                        "local_question_tokens": 12, "local_cot_tokens": 24, "local_response_tokens": 16,
                        "data_dir": str(data), "out_dir": str(out), "progress": False, **kw})


def test_fields_mode_always_yields_the_json_object(tiny_model: Path, prepared_dir: Path) -> None:
    items = cot.load_products(prepared_dir)[:4]
    backend = LocalBackend(_cfg(tiny_model, prepared_dir, prepared_dir / "unused"))
    assert backend.run_info() == {"device": "cpu", "load_in_4bit": False, "dtype": "float32"}  # load_for_inference
    outs = backend.generate(items)
    assert len(outs) == 4
    for it, (raw, truncated, cut) in zip(items, outs):
        obj = json.loads(raw, strict=False)  # structurally valid whatever the model wrote
        assert list(obj) == list(cot.FIELDS)
        name = cot.short_name(it.title)
        assert obj["Question"].startswith(prompts.COT_LOCAL_STARTERS["Question"][it.style].format(name=name))
        assert obj["Complex_CoT"].startswith(prompts.COT_LOCAL_STARTERS["Complex_CoT"].format(name=name))
        assert set(truncated) <= set(cut) <= set(cot.FIELDS)


def test_free_mode_failures_are_counted_with_a_reason(tiny_model: Path, prepared_dir: Path, tmp_path: Path) -> None:
    stats = cot.run(_cfg(tiny_model, prepared_dir, tmp_path, local_mode="free"))
    assert stats["complete"] and stats["rows"] == 0 and stats["rejected"] == 4
    assert set(stats["rejected_by_reason"]) <= {"truncated", "invalid_json", "schema_violation"}
    assert stats["funnel"][1] == ["valid answer", 0]


def test_a_local_run_is_gated_resumable_and_labelled(tiny_model: Path, prepared_dir: Path, tmp_path: Path) -> None:
    stats = cot.run(_cfg(tiny_model, prepared_dir, tmp_path))
    assert stats["complete"] and stats["rows"] + stats["rejected"] == 4
    # Random tokens parse (the skeleton is forced) but never make a row: cut values or failed gates.
    assert stats["rows"] == 0 and stats["funnel"][0] == ["products attempted", 4]
    assert set(stats["rejected_by_reason"]) <= set(cot.GATES) | {"truncated", "schema_violation"}
    assert stats["model"] == str(tiny_model) and "local" in (tmp_path / "README.md").read_text()
    assert (stats["backend"], stats["this_run"]["device"]) == ("local", "cpu")  # what notebook 02 shows
    again = cot.run(_cfg(tiny_model, prepared_dir, tmp_path, n=6))
    assert again["this_run"]["resumed_done"] == 4 and again["this_run"]["generated"] == 2
    assert again["rows"] + again["rejected"] == 6


def test_cuda_out_of_memory_halves_the_batch_and_loses_no_product(tiny_model: Path, prepared_dir: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A card with less free memory than its profile assumed: batches shrink until they fit, every product is answered."""
    import torch

    real = LocalBackend.generate
    sizes: list[int] = []

    def tight_card(self, batch):  # the real generate, behind a card that holds 2 rows
        sizes.append(len(batch))
        if len(batch) > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, batch)

    monkeypatch.setattr(LocalBackend, "generate", tight_card)
    stats = cot.run(_cfg(tiny_model, prepared_dir, tmp_path, n=6, local_batch_size=4))
    assert stats["complete"] and stats["rows"] + stats["rejected"] == 6  # no product lost to the OOM
    assert sizes == [4, 2, 2, 2]  # 4 fails once, then 2 sticks for the rest of the run
    assert stats["this_run"]["oom_batch_size"] == 2

    def no_room(self, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(LocalBackend, "generate", no_room)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one row does not fit either: the error reaches the user
        cot.run(_cfg(tiny_model, prepared_dir, tmp_path / "again", n=2))
