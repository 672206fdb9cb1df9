"""Prompt templates: round trips, EOS, inference == training prompt, clean token boundaries.

    .venv/bin/pytest tests/unit/test_prompts.py -q
"""

from __future__ import annotations

import pytest

from prodtune import metrics as M
from prodtune import prompts as P

EOS = "<|im_end|>"

DESCRIPTIONS = [
    ("Birchmont Extra Thick Exercise Mat 5mm", "Measures 183 × 61 cm; weighs 1.4 kg. Textured, non-slip surface."),
    ("The Hidden Garden: A Novel", '"Impossible to put down" — readers on the first edition. 288 pages.'),
    ("Café Crème Mug, 350 ml", "Dishwasher-safe stoneware.\nHolds 350 ml; microwave-safe."),
    ("  Title with spaces  ", "  Leading and trailing spaces are stripped.  "),
    ("USB-C Cable (2 m)", "100W PD; 480 Mbps; braided nylon — works with laptops & phones."),
]

R1_ROWS = [
    ("Is the mat thick enough for kneeling?", "The description says 5 mm TPE foam.\nThat cushions knees.", "Yes: 5 mm foam cushions knees."),
    ("What size is the Solstice bottle?", "It holds 750 ml.", "It holds 750 ml, enough for a hike."),
    ("Gift for a reader?", "A novel of 288 pages; warm and funny.", "Yes, a warm, funny 288-page novel."),
]


@pytest.mark.parametrize("title,description", DESCRIPTIONS)
def test_alpaca_round_trip(title: str, description: str) -> None:
    ex = P.alpaca_example(title, description, EOS)
    assert ex["completion"].endswith(EOS) and ex["completion"].count(EOS) == 1
    assert ex["prompt"] == P.alpaca_prompt(title)  # training and inference share one template
    assert title.strip() in ex["prompt"] and P.ALPACA_INSTRUCTION in ex["prompt"]
    assert P.parse_alpaca_response(P.full_text(ex), EOS) == description.strip()
    # a generated continuation (no prompt) parses the same way
    assert P.parse_alpaca_response(ex["completion"], EOS) == description.strip()


@pytest.mark.parametrize("question,cot,answer", R1_ROWS)
def test_r1_round_trip_without_a_chat_template(question: str, cot: str, answer: str) -> None:
    ex = P.r1_example(question, cot, answer, EOS)  # no tokenizer: the study's hand-written R1 prompt
    assert ex["prompt"] == P.r1_prompt(question) == P.r1_chat_prompt(None, question)
    assert ex["prompt"].endswith("### Response:\n<think>\n")
    assert P.R1_SYSTEM in ex["prompt"] and "### Question:\n" + question in ex["prompt"]
    assert ex["completion"] == f"{cot}\n</think>\n\n{answer}{EOS}"  # the prompt opened <think>: not again
    assert P.parse_r1_response(P.full_text(ex), EOS) == (cot, answer)
    assert P.parse_r1_response(ex["completion"], EOS) == (cot, answer)
    assert P.parse_answer("deepseek", ex["completion"], EOS) == answer


@pytest.mark.parametrize(
    "generated,expected",
    [
        ("A fine mat.<|im_end|>junk after eos", "A fine mat."),
        ("A fine mat.\n### Instruction:\nGET THE...", "A fine mat."),
        ("  spaced  ", "spaced"),
        ("", ""),
    ],
)
def test_parse_alpaca_cuts_eos_and_new_sections(generated: str, expected: str) -> None:
    assert P.parse_alpaca_response(generated, EOS) == expected


@pytest.mark.parametrize(
    "generated,expected",
    [
        ("no think block at all", ("", "no think block at all")),  # base model: whole text is the answer
        ("<think>\nreason\n</think>\nanswer", ("reason", "answer")),
        ("reason only, cut by max_new_tokens", ("", "reason only, cut by max_new_tokens")),
        ("a</think>b</think>c", ("a", "b</think>c")),
    ],
)
def test_parse_r1_edge_cases(generated: str, expected: tuple[str, str]) -> None:
    assert P.parse_r1_response(generated) == expected


def test_rag_prompt_holds_title_and_contexts() -> None:
    ctx = ["Non-slip TPE mat, 6 mm.", "  Foam   yoga block.  ", "", "x" * 2000]
    p = P.alpaca_rag_prompt("Birchmont Mat", ctx, max_context_chars=100)
    body = p.split("### Input:\n", 1)[1].split("\n\n### Response:", 1)[0]
    assert body.startswith("Birchmont Mat\n\nContext:\n")
    assert "- Non-slip TPE mat, 6 mm." in body and "- Foam yoga block." in body
    assert "- " + "x" * 100 + "\n" not in body and body.endswith("- " + "x" * 100)  # cut to 100 chars
    assert body.count("\n- ") == 3  # the empty context is dropped
    assert p.endswith(P.ALPACA_RESPONSE_MARKER)
    assert P.alpaca_rag_prompt("Birchmont Mat", []) == P.alpaca_prompt("Birchmont Mat")


@pytest.mark.parametrize("maker", [lambda e: P.alpaca_example("t", "d", e), lambda e: P.r1_example("q", "c", "a", e)])
def test_empty_eos_is_refused(maker) -> None:
    with pytest.raises(ValueError, match="eos"):
        maker("")


def test_build_examples_and_unknown_track() -> None:
    rows = [{"title": "T", "content": "D", "Question": "Q", "Complex_CoT": "C", "Response": "R"}]
    class Eos:  # a tokenizer without a chat template: only its EOS is used
        eos_token = EOS

    assert P.build_examples("llama", rows, Eos()) == [P.alpaca_example("T", "D", EOS)]
    assert P.build_examples("deepseek", rows, Eos()) == [P.r1_example("Q", "C", "R", EOS)]
    assert P.inference_prompt("llama", rows[0]) == P.alpaca_prompt("T")
    assert P.inference_prompt("deepseek", rows[0]) == P.r1_prompt("Q")
    assert P.reference_answer("deepseek", rows[0]) == "R"
    with pytest.raises(ValueError, match="unknown track"):
        P.build_examples("mistral", rows, Eos())


@pytest.fixture(scope="module")
def smol_tokenizer():
    from prodtune.models import embedded_llm_dir, load_tokenizer

    return load_tokenizer(embedded_llm_dir())


@pytest.mark.parametrize(
    "example",
    [P.alpaca_example(t, d, EOS) for t, d in DESCRIPTIONS] + [P.r1_example(q, c, a, EOS) for q, c, a in R1_ROWS]
    + [P.alpaca_example("T", s, EOS) for s in ("123 mm", "'quoted'", "-dash", "(paren)", "...dots", "é accent")],
)
def test_prompt_tokens_are_a_prefix(smol_tokenizer, example: dict[str, str]) -> None:
    """No BPE merge across the prompt/completion boundary: TRL's completion mask starts exactly at the answer."""
    tok = smol_tokenizer
    p_ids = tok(example["prompt"])["input_ids"]
    full_ids = tok(P.full_text(example))["input_ids"]
    assert full_ids[: len(p_ids)] == p_ids
    assert full_ids[-1] == tok.eos_token_id  # the EOS string is one special token


# ----------------------------------------------------------------------------------------------
# The DeepSeek track through the tokenizer's chat template: the embedded SmolLM2's (ChatML) and R1-Distill's
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["smollm2-chatml", "r1-distill"])
def chat_tok(request, smol_tokenizer):
    from conftest import make_r1_tokenizer

    return smol_tokenizer if request.param == "smollm2-chatml" else make_r1_tokenizer()


@pytest.mark.parametrize("question,cot,answer", R1_ROWS)
def test_training_text_is_the_inference_prompt_plus_the_reply(chat_tok, question: str, cot: str, answer: str) -> None:
    tok = chat_tok
    ex = P.build_examples("deepseek", [{"Question": question, "Complex_CoT": cot, "Response": answer}], tok)[0]
    prompt = P.track_prompt("deepseek", question, tok)  # what `prodtune generate`, stage 06 and the assistant send
    assert ex["prompt"] == prompt
    rendered = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    assert rendered.endswith(prompt) and len(rendered) - len(prompt) in (0, len(tok.bos_token or ""))
    full = P.full_text(ex)
    assert full.count("<think>") == 1 and full.count("</think>") == 1  # never doubled, never missing
    assert cot in full and full.index("<think>") < full.index(cot) < full.index("</think>") < full.index(answer)
    assert ex["completion"].endswith(answer + tok.eos_token)
    assert P.parse_r1_response(full, tok.eos_token) == (cot, answer)
    assert P.parse_r1_response(ex["completion"], tok.eos_token) == (cot, answer)
    # tokens: the prompt is a prefix of the training text (the completion mask starts at the reply), one BOS at most
    p_ids, f_ids = tok(prompt)["input_ids"], tok(full)["input_ids"]
    assert f_ids[: len(p_ids)] == p_ids and f_ids[-1] == tok.eos_token_id
    assert f_ids[:2] != [tok.bos_token_id] * 2  # never a doubled BOS (the template's text + the encoder's)
    reply = ex["completion"][: -len(tok.eos_token)]
    assert M.think_adherence(reply, prompt)
    assert not M.think_adherence("<think>\n" + reply, prompt) or not P.opens_think(prompt)  # a doubled tag fails
    assert not M.think_adherence(reply.replace("<think>\n", ""), prompt) or P.opens_think(prompt)  # a missing one too


def test_where_the_think_tag_comes_from(smol_tokenizer) -> None:
    from conftest import make_r1_tokenizer

    r1 = make_r1_tokenizer()
    r1_prompt = P.r1_chat_prompt(r1, "Is it thick?")
    assert r1_prompt == "<｜User｜>Is it thick?<｜Assistant｜><think>\n"  # R1's template opens <think>; BOS left to encoding
    assert r1(r1_prompt)["input_ids"][:2] == [r1.bos_token_id, r1.convert_tokens_to_ids("<｜User｜>")]
    assert P.r1_example("Is it thick?", "c", "a", r1.eos_token, r1)["completion"] == "c\n</think>\n\na" + r1.eos_token
    chatml = P.r1_chat_prompt(smol_tokenizer, "Is it thick?")
    assert chatml.endswith("<|im_start|>user\nIs it thick?<|im_end|>\n<|im_start|>assistant\n")
    assert P.r1_example("Is it thick?", "c", "a", EOS, smol_tokenizer)["completion"] == "<think>\nc\n</think>\n\na" + EOS
    # R1's template drops the reasoning of an assistant turn it renders: that is why the completion is built here
    convo = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nc\n</think>\n\na"}]
    assert "c\n</think>" not in r1.apply_chat_template(convo, tokenize=False)


def test_exported_templates_prompt_as_training_did(chat_tok) -> None:
    tok = chat_tok
    assert P.export_chat_template("deepseek", tok) == tok.chat_template
    assert P.export_chat_template("llama", tok) == P.chat_template("llama")
    go = P.ollama_template("deepseek", tok)
    # Ollama without a system message: the {{ else }} branch, with the question for {{ .Prompt }}
    bare = go.split("{{ else }}", 1)[1].split("{{ end }}", 1)[0]
    assert bare.replace("{{ .Prompt }}", "Is it thick?") == P.r1_chat_prompt(tok, "Is it thick?")
    with_system = go.split("{{ if .System }}", 1)[1].split("{{ else }}", 1)[0]
    assert with_system.replace("{{ .Prompt }}", "Q").replace("{{ .System }}", "S") == P.r1_chat_prompt(tok, "Q", "S")
    stops = P.stop_strings("deepseek", tok)
    assert stops[0] == tok.eos_token and stops[1] in ("<|im_start|>user", "<｜User｜>")


def test_rag_training_examples_and_the_similarity_threshold() -> None:
    hits = [{"content": "Near one.", "score": 0.91}, {"content": "Far one.", "score": 0.3}, {"content": "", "score": 0.99}]
    assert P.shown_contexts(hits) == ["Near one.", "Far one."]  # empty descriptions are never shown
    assert P.shown_contexts(hits, 0.6) == ["Near one."]
    assert P.shown_contexts(hits, 0.95) == []
    ex = P.alpaca_example("Mug", "A mug.", "</s>", contexts=["Near one."], max_context_chars=4)
    assert ex["prompt"] == P.alpaca_rag_prompt("Mug", ["Near"]) and ex["completion"] == "A mug.</s>"
    assert P.alpaca_example("Mug", "A mug.", "</s>", contexts=[])["prompt"] == P.alpaca_prompt("Mug")
    rows = [{"title": "Mug", "content": "A mug."}, {"title": "Cup", "content": "A cup."}]

    class Tok:
        eos_token = "</s>"

    built = P.build_examples("llama", rows, Tok(), contexts=[["Near one."], []])
    assert P.RAG_CONTEXT_HEADER in built[0]["prompt"] and built[1]["prompt"] == P.alpaca_prompt("Cup")
    with pytest.raises(ValueError, match="contexts"):
        P.build_examples("llama", rows, Tok(), contexts=[[]])


def test_grounding_text_is_what_the_prompt_says_about_the_product() -> None:
    from prodtune.models import load_tokenizer

    title = "Birchmont Extra Thick Exercise Mat 5mm"
    assert P.grounding_text(P.alpaca_prompt(title)) == title
    rag = P.grounding_text(P.alpaca_rag_prompt(title, ["Nordvik TPE mat, 6 mm."]))
    assert rag.startswith(title) and "Nordvik TPE mat, 6 mm." in rag and "DESCRIPTION" not in rag
    q = "Is the Birchmont mat thick enough for kneeling?"
    assert P.grounding_text(P.r1_prompt(q)) == q
    chat = P.r1_chat_prompt(load_tokenizer("embedded:smollm2-135m-instruct"), q)  # ChatML: the user's turn
    assert P.grounding_text(chat).strip() == q and P.R1_SYSTEM not in P.grounding_text(chat)
    assert P.grounding_text("just a title") == "just a title"
