"""Stage 02 without a model: answer parsing, quality gates, near-duplicates, storage, and the template backend.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_cot.py -q
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from prodtune import cot, prompts
from prodtune.config import ConfigError
from prodtune.cot import CoTAnswer, CoTConfig, Gates, Item, QuestionIndex, parse_answer

GOOD = {"Question": "Is it warm?", "Complex_CoT": "The description says it is wool.", "Response": "Yes, it is wool."}


# ----------------------------------------------------------------------------------------------
# Parsing and validation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, reason",
    [
        (json.dumps(GOOD), None),
        ("```json\n" + json.dumps(GOOD) + "\n```", None),  # fenced
        ("<think>let me see {</think>" + json.dumps(GOOD), None),  # a reasoning model's preamble
        ("Sure! Here it is: " + json.dumps(GOOD) + " Hope it helps.", None),
        ('{"Question": "a", "Complex_CoT": "b\nc", "Response": "d"}', None),  # raw newline inside a string
        ('{"Question": "Is it any good?", "Complex_CoT": "Because the descr', "invalid_json"),
        ("no json at all", "invalid_json"),
        ("", "invalid_json"),
        ('{"question": "a", "answer": "b"}', "schema_violation"),
        (json.dumps({**GOOD, "Extra": "x"}), "schema_violation"),
        (json.dumps({"Question": "a", "Complex_CoT": "b"}), "schema_violation"),
        (json.dumps({**GOOD, "Complex_CoT": ["step 1", "step 2"]}), "schema_violation"),
        (json.dumps({**GOOD, "Response": 42}), "schema_violation"),
        (json.dumps({**GOOD, "Response": "   "}), "schema_violation"),
        ("[1, 2]", "invalid_json"),  # no object at all
    ],
)
def test_parse_answer(text: str, reason: str | None) -> None:
    ans, why, detail = parse_answer(text)
    assert why == reason
    if reason is None:
        assert isinstance(ans, CoTAnswer) and ans.Question and ans.Response
    else:
        assert ans is None and detail


def test_the_schema_sent_matches_the_pydantic_model() -> None:
    schema = cot.answer_schema()
    assert set(schema["properties"]) == set(CoTAnswer.model_fields) == set(schema["required"])
    assert schema["additionalProperties"] is False
    assert cot.response_format("json_schema")["json_schema"]["strict"] is True
    assert cot.response_format("json_object") == {"type": "json_object"} and cot.response_format("none") is None


# ----------------------------------------------------------------------------------------------
# Gates
# ----------------------------------------------------------------------------------------------

ITEM = Item(
    uid="u1", title="Nordvik Laptop Backpack 18 L, Crimson Red", split="train", style="fit_use", order=0,
    content="Breathable mesh back panel and padded shoulder straps. Water-resistant 600D polyester shell and YKK zips. "
    "Luggage strap slides over a suitcase handle. 18 L main compartment with a padded sleeve for laptops up to 14 inches.",
)
COT = "The shopper asks about commuting. The description says the shell is water-resistant. The sleeve fits laptops up to 14 inches."


@pytest.mark.parametrize(
    "question, reasoning, response, gate",
    [
        ("Will my laptop fit in this backpack?", COT, "Yes: the padded sleeve fits laptops up to 14 inches.", None),
        # A number the shopper states is a premise the answer may repeat.
        ("My laptop is 13 inches. Will it fit?", COT, "Yes: a 13 inch laptop fits the sleeve for laptops up to 14 inches.", None),
        # Step numbers in the reasoning are not facts.
        ("Will my laptop fit?", "1. The shopper asks about fit.\n2. The sleeve fits laptops up to 14 inches.\nStep 3 concludes.",
         "Yes, the padded sleeve fits laptops up to 14 inches.", None),
        ("Hi?", COT, "Yes: the padded sleeve fits laptops up to 14 inches.", "length"),
        ("Will my laptop fit in this backpack?", "Short.", "Yes: the padded sleeve fits laptops up to 14 inches.", "length"),
        ("Will my laptop fit in this backpack?", COT, "Yes.", "length"),
        ("Will my laptop fit in this backpack?", COT, "Yes: it fits laptops up to 16 inches.", "ungrounded_number"),
        ("Will my laptop fit in this backpack?", COT + " It holds 25 litres.", "Yes: the padded sleeve fits laptops up to 14 inches.",
         "ungrounded_number"),
        ("Will my laptop fit in this backpack?", COT, "Absolutely, customers adore its gorgeous vintage leather styling.", "low_overlap"),
        ("Will my laptop fit in this backpack?", COT, "Yes. The answer is yes, and the answer is no.", "low_overlap"),
        ("Will my laptop fit in this backpack?", COT, "Yes. " + ITEM.content, "copies_description"),
        ("Will my laptop fit in this backpack?", "The answer is yes. " * 12, "Yes: the padded sleeve fits laptops up to 14 inches.",
         "repetitive"),
    ],
)
def test_gates(question: str, reasoning: str, response: str, gate: str | None) -> None:
    ans = CoTAnswer(Question=question, Complex_CoT=reasoning, Response=response)
    reason, detail = Gates(CoTConfig()).check(ITEM, ans)
    assert reason == gate, detail
    assert (detail == "") == (gate is None)


@pytest.mark.parametrize(
    "text, expected",
    [("1,000 mAh and 5.0 V", {"1000", "5"}), ("2–4 minutes at 90 °C", {"2", "4", "90"}), ("no numbers", set()),
     ("18/8 steel, 3.5 kg", {"18", "8", "3.5"})],
)
def test_numbers_in(text: str, expected: set[str]) -> None:
    assert cot.numbers_in(text) == expected


@pytest.mark.parametrize(
    "a, b, dup",
    [
        ("Would the Nordvik backpack make a good gift?", "Would the Nordvik backpack make a good gift?", True),
        ("Would the Nordvik backpack make a good gift?", "would the nordvik backpack make a good gift", True),  # case, punctuation
        ("Would the Nordvik backpack make a good gift for my dad?", "Would the Nordvik backpack make a good gift for my mum?", True),
        ("Would the Nordvik backpack make a good gift?", "What size laptop fits in the Nordvik backpack?", False),
        ("Is the Lumora pan oven-safe?", "Is the Kestrel pan oven-safe?", False),  # another product
    ],
)
def test_near_duplicate_questions(a: str, b: str, dup: bool) -> None:
    idx = QuestionIndex(0.8)
    idx.add(a, "first")
    sim, who = idx.nearest(b)
    assert (sim >= 0.8) == dup
    assert who == ("first" if sim > 0 else None)


def test_copy_ratio_and_overlap() -> None:
    src = ITEM.content
    assert cot.copy_ratio(src, src) == 1.0
    assert cot.copy_ratio("Padded shoulder straps.", src) < 0.2
    assert cot.overlap("padded straps and water-resistant polyester", src) == 1.0
    assert cot.overlap("gorgeous vintage leather", src) == 0.0


def test_styles_are_seeded_per_product() -> None:
    styles = list(prompts.COT_STYLES)
    uids = [f"B{i:09d}" for i in range(400)]
    a = [cot.style_for(u, 1, styles) for u in uids]
    assert a == [cot.style_for(u, 1, styles) for u in uids]  # reproducible
    assert a != [cot.style_for(u, 2, styles) for u in uids]  # seeded
    assert set(a) == set(styles)
    assert min(a.count(s) for s in styles) > 60  # roughly uniform


@pytest.mark.parametrize(
    "bad, field",
    [({"backend": "gpt"}, "backend"), ({"styles": ["haiku"]}, "styles"), ({"styles": []}, "styles"), ({"n": 0}, "n"),
     ({"concurrency": 0}, "concurrency"), ({"structured_output": "xml"}, "structured_output"),
     ({"local_mode": "json"}, "local_mode"), ({"timeout_s": 0}, "timeout_s"), ({"max_retries": -1}, "max_retries"),
     ({"min_response_chars": 50, "max_response_chars": 10}, "min_response_chars"), ({"max_copy_ratio": 0.0}, "max_copy_ratio"),
     ({"min_overlap": 1.5}, "min_overlap"), ({"push_to_hub": "no-slash"}, "push_to_hub")],
)
def test_config_errors_name_the_field(bad: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=f"CoTConfig.{field}"):
        CoTConfig(**bad)


def test_config_is_the_stage_contract() -> None:
    import dataclasses

    from transformers import HfArgumentParser

    assert cot.Config is CoTConfig and CoTConfig.SECTION == "cot" and callable(cot.run)
    assert all(f.metadata.get("help") for f in dataclasses.fields(CoTConfig))
    assert "OPENAI_API_KEY" == CoTConfig().api_key_env  # the config names the variable, never holds the key
    (cfg,) = HfArgumentParser(CoTConfig).parse_args_into_dataclasses(
        ["--backend", "openai", "--n", "3", "--styles", "gift", "specs", "--push_to_hub", "me/cot", "--no_progress"])
    assert (cfg.backend, cfg.n, cfg.styles, cfg.push_to_hub, cfg.progress) == ("openai", 3, ["gift", "specs"], "me/cot", False)
    assert cfg.out_dir == "{data_dir}/cot" and cfg.data_dir == "{data_dir}/prepared"  # templates the loader fills


@pytest.mark.parametrize(
    "backend, base_url, expected",
    [(None, None, None),                                # the profile's choice (cpu: template, GPU profiles: local)
     (None, "http://localhost:8000/v1", "openai"),      # a server given: that is the backend meant
     ("local", "http://localhost:8000/v1", "local"),    # a backend named wins
     ("template", None, "template")],
)
def test_pick_backend(backend: str | None, base_url: str | None, expected: str | None) -> None:
    assert cot.pick_backend(backend, base_url) == expected


def test_local_model_is_the_local_backends_default_only() -> None:
    gpu_model = "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit"
    assert CoTConfig(backend="local").model_name == cot.DEFAULT_MODELS["local"]
    assert CoTConfig(backend="local", local_model=gpu_model).model_name == gpu_model
    assert CoTConfig(backend="openai", local_model=gpu_model).model_name == "gpt-4o-mini"  # not sent to a server
    assert CoTConfig(backend="local", local_model=gpu_model, model="mine").model_name == "mine"


def test_a_path_template_left_unfilled_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CoTConfig.data_dir: '{data_dir}/prepared' still holds a template"):
        cot.run(CoTConfig(out_dir=str(tmp_path)))


def test_a_hub_push_without_a_token_fails_before_generating(prepared_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(ConfigError, match=r"CoTConfig.push_to_hub: .*\$HF_TOKEN"):
        cot.run(CoTConfig(data_dir=str(prepared_dir), out_dir=str(tmp_path / "o"), push_to_hub="me/cot", progress=False))
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------
# Storage
# ----------------------------------------------------------------------------------------------


def test_store_repairs_a_torn_line_and_never_yields_a_product_twice(tmp_path: Path) -> None:
    row = {"uid": "a", "Question": "q", "split": "train"}
    (tmp_path / "cot.jsonl").write_bytes(
        json.dumps(row).encode() + b"\n" + json.dumps({**row, "Question": "again"}).encode() + b"\n" + b'{"uid": "b", "Quest'
    )
    (tmp_path / "rejects.jsonl").write_bytes(
        json.dumps({"uid": "c", "reason": "low_overlap", "retryable": False}).encode() + b"\n"
        + json.dumps({"uid": "d", "reason": "retries_exhausted:429", "retryable": True}).encode() + b"\n"
    )
    store = cot.CoTStore(tmp_path)
    assert list(store.rows) == ["a"] and store.rows["a"]["Question"] == "q"
    assert store.done() == {"a", "c"}  # d failed on transient errors: the next run tries it again
    store.add_row({**row, "uid": "b"})
    store.add_row({**row, "uid": "a"})  # already there: ignored
    store.close()
    lines = (tmp_path / "cot.jsonl").read_bytes().splitlines()
    assert [json.loads(x)["uid"] for x in lines] == ["a", "a", "b"]  # torn tail cut, append-only
    assert list(cot.CoTStore(tmp_path).rows) == ["a", "b"]


# ----------------------------------------------------------------------------------------------
# The template backend end to end
# ----------------------------------------------------------------------------------------------


def _cfg(data: Path, out: Path, **kw) -> CoTConfig:
    return CoTConfig(data_dir=str(data), out_dir=str(out), progress=False, **kw)


@pytest.fixture(scope="module")
def template_run(prepared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("cot_template")
    stats = cot.run(_cfg(prepared_dir, out))
    return stats, out


def test_template_covers_every_product_and_keeps_stage_01_splits(template_run, prepared_dir: Path) -> None:
    stats, out = template_run
    n = {s: pq.read_metadata(prepared_dir / f"{s}.parquet").num_rows for s in cot.SPLITS}
    assert stats["complete"] and stats["products_selected"] == sum(n.values())
    assert stats["rows"] + stats["rejected"] == sum(n.values())
    assert stats["rows"] >= 0.97 * sum(n.values())  # grounded by construction; only near-duplicate titles drop
    assert set(stats["rejected_by_reason"]) <= {"near_duplicate"}
    assert stats["funnel"][0] == ["products attempted", sum(n.values())] and stats["funnel"][-1][1] == stats["rows"]
    for s in cot.SPLITS:
        prepared = set(pq.read_table(prepared_dir / f"{s}.parquet", columns=["uid"]).column("uid").to_pylist())
        t = pq.read_table(out / f"{s}.parquet")
        assert t.column_names == list(cot.SPLIT_COLUMNS)
        uids = t.column("uid").to_pylist()
        assert len(uids) == len(set(uids)) == stats["splits"][s] and set(uids) <= prepared
    assert set(pq.read_table(out / "cot.parquet").column("backend").to_pylist()) == {"template"}
    assert set(stats["styles"]) == set(prompts.COT_STYLES)


def test_template_rows_are_grounded_and_deterministic(template_run, prepared_dir: Path, tmp_path: Path) -> None:
    stats, out = template_run
    rows = cot.load_rows(out)
    assert rows[["Question", "Complex_CoT", "Response"]].map(len).min().min() > 10
    products = {it.uid: it for it in cot.load_products(prepared_dir)}
    for r in rows.itertuples():  # checked here independently of the gates that passed them
        p = products[r.uid]
        src = cot.numbers_in(p.title + " " + p.content)
        assert cot.numbers_in(r.Response) <= src and cot.numbers_in(r.Complex_CoT) <= src
        assert cot.copy_ratio(r.Response, p.content) < 0.8 and r.title in r.Question
    again = cot.run(_cfg(prepared_dir, tmp_path))
    assert again["rows"] == stats["rows"]
    assert cot.load_rows(tmp_path).equals(rows)


def test_the_output_is_a_loadable_hf_dataset_with_a_card(template_run) -> None:
    from datasets import load_dataset

    stats, out = template_run
    ds = load_dataset(str(out))
    assert {k: len(v) for k, v in ds.items()} == stats["splits"]
    assert set(cot.FIELDS) <= set(ds["train"].column_names)
    card = (out / "README.md").read_text()
    assert "Template rows, not LLM output" in card and stats["prompt_version"] in card and "backend-template" in card
    assert f"| rows | {stats['rows']} " in card


def test_a_rerun_refuses_to_mix_backends(template_run, tmp_path: Path, prepared_dir: Path) -> None:
    _, out = template_run
    shutil.copytree(out, tmp_path / "o")
    with pytest.raises(ConfigError, match="CoTConfig.out_dir: .* holds rows made with backend='template'"):
        cot.run(_cfg(prepared_dir, tmp_path / "o", backend="local", n=1))
    # A template run never discards another backend's rows either.
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    (tmp_path / "o" / "run.json").write_text(json.dumps({**run, "backend": "openai", "model": "gpt-4o-mini"}))
    with pytest.raises(ConfigError, match="backend='openai'"):
        cot.run(_cfg(prepared_dir, tmp_path / "o"))


def test_missing_stage_01_output_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train.parquet: missing; run stage 01"):
        cot.run(_cfg(tmp_path, tmp_path / "o"))
