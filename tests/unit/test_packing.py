"""Packed (padding-free) batches give every token the same loss as padded ones, with completion-only masking.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_packing.py -q

The data go through TRL 1.14.2's own SFTTrainer preparation (prompt-completion format, completion_only_loss=True;
packing=True uses BFD packing and the padding-free collator that emits position_ids), the model is a tiny
LlamaForCausalLM with SmolLM2's tokenizer, and the texts are real Alpaca-formatted rows of the committed sample.
A negative control drops the position_ids: then documents attend across their boundaries and the losses differ,
so the comparison can fail.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")
datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

from prodtune.data import clean_text, parse_line, truncate_text  # noqa: E402
from prodtune.io import project_root  # noqa: E402
from prodtune.models import embedded_llm_dir  # noqa: E402
from prodtune.prompts import alpaca_example  # noqa: E402

N_ROWS = 9
MAX_LEN = 384


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_llm_dir())


@pytest.fixture(scope="module")
def rows(tokenizer) -> list[dict[str, str]]:
    """Alpaca prompt/completion rows from the committed sample, of varied lengths."""
    out = []
    for raw in (project_root() / "data/sample/trn_sample.jsonl").read_bytes().splitlines():
        parsed = parse_line(raw)  # the sample keeps broken lines on purpose: skip them as stage 01 does
        if isinstance(parsed, str):
            continue
        title, content = clean_text(parsed[1]), clean_text(parsed[2])
        if title and len(content) >= 100:
            # varied lengths: cut descriptions to 100..700 characters so documents differ in size
            keep = 100 + (len(out) * 97) % 600
            out.append(alpaca_example(title, truncate_text(content, keep), tokenizer.eos_token))
        if len(out) == N_ROWS:
            break
    assert len(out) == N_ROWS
    return out


def tiny_llama(vocab: int, attn: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = attn
    model = LlamaForCausalLM(cfg).eval()
    # random init has tiny weights, so every token's loss is ~ln(vocab); larger weights make positions distinguishable
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module")
def prepared(tokenizer, rows, tmp_path_factory) -> dict[bool, tuple]:
    """{packing: (TRL's prepared dataset, its collator)}: built once, they depend on the tokenizer, not the weights."""
    tmp = tmp_path_factory.mktemp("sft")
    model = tiny_llama(len(tokenizer), "sdpa")
    return {packing: prepare(model, tokenizer, rows, tmp, packing) for packing in (False, True)}


def prepare(model, tokenizer, rows, tmp_path: Path, packing: bool):
    """TRL's prepared dataset and collator for these rows (no training)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / f"sft-{packing}"), max_length=MAX_LEN, packing=packing,
                     packing_strategy="bfd", completion_only_loss=True, per_device_train_batch_size=4, report_to="none",
                     use_cpu=True, bf16=False, fp16=False, shuffle_dataset=False, dataset_num_proc=None, seed=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    return trainer.train_dataset, trainer.data_collator


def token_losses(model, batch: dict, use_cache: bool = False) -> torch.Tensor:
    """Per-position loss of predicting labels[t] from tokens <= t-1 (0 where the label is -100).

    `use_cache=False` as SFTTrainer.compute_loss passes it: transformers only builds the per-document mask from
    position_ids when no KV cache is in play.
    """
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=use_cache).logits.float()
    labels = batch["labels"]
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].clamp(min=0), reduction="none")
    return torch.nn.functional.pad(losses * (labels[:, 1:] != -100), (1, 0))


def by_document(model, prepared, *, packing: bool, position_ids: bool = True, use_cache: bool = False) -> dict[tuple, dict]:
    """{input_ids: {"labels", "loss"}} for every document, computed in padded or packed batches."""
    model_ds, collator = prepared[packing]
    docs = {}
    examples = [model_ds[i] for i in range(len(model_ds))]
    for start in range(0, len(examples), 4):
        chunk = examples[start:start + 4]
        batch = collator(chunk)
        if packing and not position_ids:
            batch = {k: v for k, v in batch.items() if k != "position_ids"}
        losses = token_losses(model, batch, use_cache)
        if packing:
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch  # one flat row, no padding
            lengths = [n for ex in chunk for n in ex["seq_lengths"]]
            offset = 0
            for n in lengths:
                ids = tuple(batch["input_ids"][0, offset:offset + n].tolist())
                docs[ids] = {"labels": batch["labels"][0, offset:offset + n], "loss": losses[0, offset:offset + n]}
                offset += n
        else:
            for i, ex in enumerate(chunk):
                n = len(ex["input_ids"])
                ids = tuple(batch["input_ids"][i, :n].tolist())
                docs[ids] = {"labels": batch["labels"][i, :n], "loss": losses[i, :n]}
    return docs


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padded_give_the_same_per_token_loss(tokenizer, prepared, attn):
    model = tiny_llama(len(tokenizer), attn)
    padded = by_document(model, prepared, packing=False)
    packed = by_document(model, prepared, packing=True)
    assert set(packed) == set(padded) and len(padded) == N_ROWS  # every document once, none cut
    assert len(prepared[True][0]) < N_ROWS  # several documents really share a packed row
    for ids, ref in padded.items():
        got = packed[ids]
        # completion-only: prompt tokens masked in both layouts, the same tokens count, and at least one does
        assert torch.equal(got["labels"][1:], ref["labels"][1:])
        assert (ref["labels"] != -100).sum() > 0 and ref["labels"][0] == -100
        torch.testing.assert_close(got["loss"], ref["loss"], atol=2e-5, rtol=1e-4)
    total_padded = sum(float(d["loss"].sum()) for d in padded.values())
    total_packed = sum(float(d["loss"].sum()) for d in packed.values())
    assert total_packed == pytest.approx(total_padded, rel=1e-5)


def test_completion_only_masks_the_prompt(tokenizer, prepared):
    model = tiny_llama(len(tokenizer), "sdpa")
    for ids, doc in by_document(model, prepared, packing=True).items():
        text = tokenizer.decode(list(ids))
        n_prompt = len(tokenizer(text[: text.index("### Response:\n") + len("### Response:\n")])["input_ids"])
        assert (doc["labels"][:n_prompt] == -100).all()  # nothing of the prompt is learned
        assert (doc["labels"][n_prompt + 1:] != -100).all()  # every description token (and EOS) is
        assert doc["labels"][-1] == tokenizer.eos_token_id


def test_model_loss_on_a_packed_batch_is_the_mean_over_its_documents(tokenizer, prepared):
    model = tiny_llama(len(tokenizer), "sdpa")
    padded = by_document(model, prepared, packing=False)
    ds, collator = prepared[True]
    batch = collator([ds[0], ds[1]])
    with torch.no_grad():
        loss = float(model(**batch, use_cache=False).loss)  # what SFTTrainer.compute_loss back-propagates
    lengths = [n for i in (0, 1) for n in ds[i]["seq_lengths"]]
    offset, total, count = 0, 0.0, 0
    for n in lengths:
        ref = padded[tuple(batch["input_ids"][0, offset:offset + n].tolist())]
        total += float(ref["loss"].sum())
        count += int((ref["labels"][1:] != -100).sum())
        offset += n
    assert loss == pytest.approx(total / count, rel=1e-4)


@pytest.mark.parametrize("how", ["no position_ids", "use_cache=True"])
def test_without_document_boundaries_documents_leak_into_each_other(tokenizer, prepared, how):
    """Negative controls: without position_ids, or with a KV cache in play (transformers then skips the packed
    mask), a flat row is one long causal sequence and the losses change. SFTTrainer passes use_cache=False."""
    model = tiny_llama(len(tokenizer), "sdpa")
    padded = by_document(model, prepared, packing=False)
    leaky = by_document(model, prepared, packing=True, position_ids=how != "no position_ids",
                        use_cache=how == "use_cache=True")
    worst = max(float((leaky[ids]["loss"] - ref["loss"]).abs().max()) for ids, ref in padded.items())
    assert worst > 1e-2
