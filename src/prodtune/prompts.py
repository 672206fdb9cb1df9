"""Prompt templates: THE one place where prompt text lives (training, inference, RAG, evaluation).

    python -m prodtune.prompts   # prints one rendered prompt of each kind

Two tracks, each with one template used both to build training texts and inference prompts, so the
model is always asked exactly what it was trained on:

* Llama track (Alpaca): instruction `GET THE DESCRIPTION OF THIS PRODUCT`, input = the product title,
  response = the description. A RAG variant puts retrieved descriptions under `Context:` in the input.
* DeepSeek track (R1 style): the shopper's question as the one user message of the tokenizer's own chat template (the
  R1 distill's, `<｜User｜>...<｜Assistant｜><think>\\n`; DeepSeek advises no system prompt for it), and a response
  `<think>\\n{cot}\\n</think>\\n\\n{answer}` whose `<think>\\n` is the template's when its generation prompt opens
  one (R1) and the model's own first words otherwise (ChatML, e.g. the embedded SmolLM2): never doubled, never
  missing, and an exported model is prompted by its own template exactly as in training. A tokenizer without a chat
  template gets the study's hand-written R1 prompt (`r1_prompt`), which is then written as its template on export.

Training examples are split into `prompt` / `completion` (TRL's prompt-completion format), the
completion ends with the tokenizer's EOS, and the split point is a newline, so the tokenized prompt is
always a prefix of the tokenized prompt+completion (no BPE merge across the boundary).
Bump `PROMPT_VERSION` whenever a template changes: run cards and caches record it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

PROMPT_VERSION = "2026.2"  # 2026.2: the DeepSeek track is prompted through the tokenizer's chat template

# ----------------------------------------------------------------------------------------------
# Llama track: Alpaca
# ----------------------------------------------------------------------------------------------

ALPACA_INSTRUCTION = "GET THE DESCRIPTION OF THIS PRODUCT"

ALPACA_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n"
    "### Response:\n"
)
ALPACA_RESPONSE_MARKER = "### Response:\n"

RAG_CONTEXT_HEADER = "Context:"


def alpaca_prompt(title: str, instruction: str = ALPACA_INSTRUCTION) -> str:
    """The Alpaca inference prompt for one product title (ends right where the description starts).

    Args:
        title: product title (the Alpaca input).
        instruction: the instruction line; the study's one by default.

    Returns:
        The prompt text, ending with `### Response:\\n`.
    """
    return ALPACA_TEMPLATE.format(instruction=instruction, input=title.strip())


def alpaca_rag_prompt(
    title: str,
    contexts: Iterable[str],
    instruction: str = ALPACA_INSTRUCTION,
    max_context_chars: int = 600,
) -> str:
    """The Alpaca prompt with retrieved descriptions added to the input, for RAG (stages 05/06).

    The input holds the title, then a `Context:` block with one `- ` line per retrieved description
    (each cut to `max_context_chars`). With no contexts it is exactly `alpaca_prompt(title)`.

    Args:
        title: product title.
        contexts: retrieved descriptions of similar products, best first.
        instruction: the instruction line.
        max_context_chars: longest context kept per item (keeps prompts within small models' windows).

    Returns:
        The prompt text, ending with `### Response:\\n`.
    """
    ctx = [" ".join(c.split())[:max_context_chars] for c in contexts if c and c.strip()]
    if not ctx:
        return alpaca_prompt(title, instruction)
    body = title.strip() + "\n\n" + RAG_CONTEXT_HEADER + "\n" + "\n".join(f"- {c}" for c in ctx)
    return ALPACA_TEMPLATE.format(instruction=instruction, input=body)


def shown_contexts(hits: Iterable[dict], min_score: float = 0.0) -> list[str]:
    """The retrieved descriptions a RAG prompt shows, best first: hits whose title similarity (`score`, cosine) is
    below `min_score` are left out, so a product with no close neighbour gets the plain prompt (`alpaca_rag_prompt`
    with nothing to show is `alpaca_prompt`). Training (RAFT-style, `train.rag_k`) and inference use this one rule."""
    return [h["content"] for h in hits if h.get("content") and float(h.get("score", 1.0)) >= min_score]


def alpaca_example(title: str, description: str, eos_token: str, instruction: str = ALPACA_INSTRUCTION,
                   contexts: Sequence[str] = (), max_context_chars: int = 600) -> dict[str, str]:
    """One Llama-track training example in TRL's prompt-completion format, EOS appended.

    Args:
        title: product title.
        description: the product description the model must learn to write.
        eos_token: the tokenizer's EOS string (e.g. `<|im_end|>`, `<|end_of_text|>`).
        instruction: the instruction line.
        contexts: retrieved descriptions of *other* products (retrieval-augmented fine-tuning: the model learns to
            use a close neighbour and to ignore a far one); empty: the plain Alpaca prompt.
        max_context_chars: longest context kept per item (as at inference).

    Returns:
        `{"prompt": alpaca_rag_prompt(title, contexts), "completion": description + eos_token}`.
    """
    if not eos_token:
        raise ValueError("eos_token is empty: the model would never learn to stop")
    return {"prompt": alpaca_rag_prompt(title, contexts, instruction, max_context_chars),
            "completion": description.strip() + eos_token}


def parse_alpaca_response(text: str, eos_token: str | None = None) -> str:
    """The description from a full Alpaca text or from a generated continuation.

    Takes what follows the last `### Response:` (if present), cuts at the EOS string and at a new
    `### ` section (a model that keeps going past its answer), and strips whitespace.
    """
    if ALPACA_RESPONSE_MARKER in text:
        text = text.rsplit(ALPACA_RESPONSE_MARKER, 1)[1]
    if eos_token and eos_token in text:
        text = text.split(eos_token, 1)[0]
    cut = text.find("\n### ")
    if cut >= 0:
        text = text[:cut]
    return text.strip()


# ----------------------------------------------------------------------------------------------
# DeepSeek track: R1-style reasoning
# ----------------------------------------------------------------------------------------------

R1_SYSTEM = (
    "You are a friendly, knowledgeable sales assistant for an online store. Answer the shopper's question "
    "about the product using only facts you are sure of, and recommend it honestly."
)

R1_TEMPLATE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request. Before answering, think carefully about "
    "the question and create a step-by-step chain of thoughts to ensure a logical and accurate response.\n\n"
    "### Instruction:\n{system}\n\n"
    "### Question:\n{question}\n\n"
    "### Response:\n<think>\n"
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def r1_prompt(question: str, system: str = R1_SYSTEM) -> str:
    """The R1-style inference prompt for one shopper question; it ends inside an open `<think>`.

    Args:
        question: the shopper's question (it names the product).
        system: the instruction line (the sales-assistant role).

    Returns:
        The prompt text, ending with `### Response:\\n<think>\\n`.
    """
    return R1_TEMPLATE.format(system=system, question=question.strip())


def r1_messages(question: str, system: str | None = None) -> list[dict[str, str]]:
    """The chat messages of one shopper question: the question as the user message (a system message only if given)."""
    msgs = [{"role": "system", "content": system.strip()}] if system else []
    return msgs + [{"role": "user", "content": question.strip()}]


def has_chat_template(tokenizer: object) -> bool:
    """True when the tokenizer carries a chat template (`tokenizer.chat_template`)."""
    return bool(getattr(tokenizer, "chat_template", None))


def adds_bos(tokenizer: object) -> bool:
    """True when encoding text with special tokens puts the BOS token first (Llama-3, the R1 distills)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]  # type: ignore[operator]
    return bool(ids) and ids[0] == bos


def r1_chat_prompt(tokenizer: object | None, question: str, system: str | None = None) -> str:
    """The DeepSeek-track prompt for one shopper question: THE function training, inference and export share.

    With a chat template: `apply_chat_template(r1_messages(question), add_generation_prompt=True)` exactly, less a
    leading BOS text when the tokenizer adds BOS itself on encoding (else BOS would be doubled). It ends where the
    reply starts: inside `<think>\\n` for the R1 distill's template, after `<|im_start|>assistant\\n` for ChatML
    (the reply then opens `<think>` itself, see `r1_completion`). Without a chat template (or without a tokenizer):
    the study's prompt `r1_prompt(question, system or R1_SYSTEM)`.

    Args:
        tokenizer: the model's tokenizer, or None for the study's prompt.
        question: the shopper's question (it names the product).
        system: a system message; None (DeepSeek's advice for the R1 distills: no system prompt).
    """
    if tokenizer is None or not has_chat_template(tokenizer):
        return r1_prompt(question, system or R1_SYSTEM)
    text = tokenizer.apply_chat_template(r1_messages(question, system), tokenize=False,  # type: ignore[attr-defined]
                                         add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def opens_think(prompt: str) -> bool:
    """True when a prompt already opens the reasoning block (ends with `<think>` and whitespace)."""
    return prompt.rstrip().endswith(THINK_OPEN)


def r1_completion(prompt: str, cot: str, answer: str, eos_token: str) -> str:
    """The DeepSeek-track training target after `prompt`: `<think>\\n` unless the prompt opened it, then the reasoning,
    `\\n</think>\\n\\n`, the answer and EOS (R1's own layout)."""
    if not eos_token:
        raise ValueError("eos_token is empty: the model would never learn to stop")
    opener = "" if opens_think(prompt) else THINK_OPEN + "\n"
    return f"{opener}{cot.strip()}\n{THINK_CLOSE}\n\n{answer.strip()}{eos_token}"


def r1_example(question: str, cot: str, answer: str, eos_token: str, tokenizer: object | None = None,
               system: str | None = None) -> dict[str, str]:
    """One DeepSeek-track training example: `r1_chat_prompt` and its `r1_completion` (prompt-completion format).

    Args:
        question: the shopper's question.
        cot: the reasoning (Complex_CoT).
        answer: the final answer (Response).
        eos_token: the tokenizer's EOS string.
        tokenizer: whose chat template renders the prompt; None: the study's prompt `r1_prompt`.
        system: a system message (None: none with a chat template, `R1_SYSTEM` in the study's prompt).
    """
    prompt = r1_chat_prompt(tokenizer, question, system)
    return {"prompt": prompt, "completion": r1_completion(prompt, cot, answer, eos_token)}


def parse_r1_response(text: str, eos_token: str | None = None) -> tuple[str, str]:
    """Split an R1-style text (a full training text, or the generated continuation of an R1 prompt) into (cot, answer).

    The reasoning is what follows the last `<think>` before `</think>` (the prompt's or the reply's own); the answer
    what follows `</think>`, cut at EOS. Without a closing `</think>` (an untrained base model, or a reply cut by
    max_new_tokens) the cot is empty and the text after any `<think>` is taken as the answer, so metrics still see
    something.
    """
    if "### Response:\n" in text:
        text = text.rsplit("### Response:\n", 1)[1]
    close = text.find(THINK_CLOSE)
    opened = (text if close < 0 else text[:close]).rfind(THINK_OPEN)  # a chat prompt's EOS-like turn ends come before
    if opened >= 0:
        text = text[opened + len(THINK_OPEN):]
    if eos_token and eos_token in text:
        text = text.split(eos_token, 1)[0]
    if THINK_CLOSE not in text:
        return "", text.strip()
    cot, answer = text.split(THINK_CLOSE, 1)
    return cot.strip(), answer.strip()


# ----------------------------------------------------------------------------------------------
# Helpers shared by both tracks
# ----------------------------------------------------------------------------------------------


def full_text(example: dict[str, str]) -> str:
    """The whole training text of a prompt-completion example (what `loss_on="all"` trains on)."""
    return example["prompt"] + example["completion"]


def build_examples(track: str, rows: Sequence[dict], tokenizer: object, contexts: Sequence[Sequence[str]] | None = None,
                   max_context_chars: int = 600) -> list[dict[str, str]]:
    """Training examples of a track from data rows, EOS from the tokenizer.

    Args:
        track: `llama` (rows with title, content: Alpaca) or `deepseek` (rows with Question, Complex_CoT, Response:
            the tokenizer's chat template, `r1_example`).
        rows: dict-like rows.
        tokenizer: the model's tokenizer (its `eos_token`, and its chat template on the deepseek track).
        contexts: llama track: retrieved descriptions per row for the RAG prompt (`alpaca_example`); None: plain.
        max_context_chars: longest context kept per item.
    """
    eos = getattr(tokenizer, "eos_token", None) or ""
    if track == "llama":
        ctx = contexts if contexts is not None else [()] * len(rows)
        if len(ctx) != len(rows):
            raise ValueError(f"contexts: {len(ctx)} lists for {len(rows)} rows")
        return [alpaca_example(r["title"], r["content"], eos, contexts=c, max_context_chars=max_context_chars)
                for r, c in zip(rows, ctx)]
    if track == "deepseek":
        return [r1_example(r["Question"], r["Complex_CoT"], r["Response"], eos, tokenizer) for r in rows]
    raise ValueError(f"unknown track {track!r}; expected 'llama' or 'deepseek'")


def track_prompt(track: str, text: str, tokenizer: object | None = None) -> str:
    """The inference prompt of a track for a product title (llama: Alpaca) or a shopper's question (deepseek:
    `r1_chat_prompt` through the tokenizer's chat template; the study's prompt without one)."""
    if track == "llama":
        return alpaca_prompt(text)
    if track == "deepseek":
        return r1_chat_prompt(tokenizer, text)
    raise ValueError(f"unknown track {track!r}; expected 'llama' or 'deepseek'")


def inference_prompt(track: str, row: dict, tokenizer: object | None = None) -> str:
    """The inference prompt of a track for one data row (title for llama, Question for deepseek)."""
    return track_prompt(track, row["title"] if track == "llama" else row["Question"], tokenizer)


def reference_answer(track: str, row: dict) -> str:
    """The text a generation is compared with: the description (llama) or the Response (deepseek)."""
    return row["content"] if track == "llama" else row["Response"]


def parse_answer(track: str, generated: str, eos_token: str | None = None) -> str:
    """The answer part of a generated continuation: the description (llama) or the text after `</think>`."""
    if track == "llama":
        return parse_alpaca_response(generated, eos_token)
    return parse_r1_response(generated, eos_token)[1]


# ----------------------------------------------------------------------------------------------
# Stage 02: CoT-generation prompts (the CoT engineer's section; add COT_* templates below this line)
# ----------------------------------------------------------------------------------------------

# Bump when any COT_* text changes: stage 02 writes it into every row, stats.json and the dataset card.
COT_PROMPT_VERSION = "cot-2026.1"

# Question styles, picked per product with a seeded hash (prodtune.cot.style_for); value = what the shopper asks.
COT_STYLES: dict[str, str] = {
    "fit_use": "whether the product suits a particular use, person or situation",
    "comparison": "how this product compares with a typical alternative, judged only from this product's own facts",
    "gift": "whether the product would make a good gift, and for whom",
    "specs": "one concrete specification such as a size, capacity, power, material or quantity",
}

COT_SYSTEM = (
    "You are a sales assistant for an online shop who writes training data. For one product you write a realistic "
    "shopper question, your step-by-step reasoning, and a short, friendly answer. Use only facts stated in the "
    "product title and description: never invent numbers, prices, materials, features or reviews. "
    "Reply with one JSON object with exactly the keys Question, Complex_CoT and Response."
)

COT_USER_TEMPLATE = (
    "Title: {title}\n"
    "Description: {content}\n"
    "Question style: {style} - the shopper asks {style_hint}.\n"
    "Question: one or two sentences in the shopper's own words, naming the product.\n"
    "Complex_CoT: three to six short reasoning steps that restate facts from the description.\n"
    "Response: one to three sentences that answer the question from those facts."
)

# One worked example (few-shot) of a product unlike the sample's (so its facts do not leak into similar products);
# its numbers all come from its own description.
COT_EXAMPLE = {
    "title": "Stormlite Compact Travel Umbrella, Navy",
    "content": (
        "Opens and closes with one button. Eight fiberglass ribs bend in strong wind instead of breaking. Folds to "
        "29 cm and weighs 340 g, so it fits in a backpack side pocket. Comes with a zip pouch."
    ),
    "style": "fit_use",
    "answer": {
        "Question": "I walk to work on windy days. Is the Stormlite umbrella sturdy enough and easy to carry?",
        "Complex_CoT": (
            "The shopper needs an umbrella that survives wind and is easy to carry. The description says the "
            "fiberglass ribs bend in strong wind instead of breaking. It also says it folds to 29 cm and weighs 340 g, "
            "so it fits in a backpack side pocket. Both needs are covered by stated facts, so the answer is yes."
        ),
        "Response": (
            "Yes. Its fiberglass ribs bend in strong wind instead of breaking, and it folds to 29 cm and weighs only "
            "340 g, so it slips into a backpack side pocket."
        ),
    },
}


# Starts of the three values that the local backend forces (`local_mode: fields`): a 135M model completes a
# started sentence far better than it invents one, and "The description says" steers it to copy facts.
COT_LOCAL_STARTERS = {
    "Question": {
        "fit_use": "Is the {name} a good fit for",
        "comparison": "How does the {name} compare with",
        "gift": "Would the {name} make a good gift for",
        "specs": "Can you tell me the",
    },
    "Complex_CoT": "The shopper asks about the {name}. The description says",
    "Response": "",
}


def cot_user_prompt(title: str, content: str, style: str) -> str:
    """The user message asking for one CoT row about a product.

    Args:
        title: product title.
        content: product description (the only source of facts).
        style: a key of `COT_STYLES`.
    """
    if style not in COT_STYLES:
        raise ValueError(f"unknown CoT question style {style!r}; known: {sorted(COT_STYLES)}")
    return COT_USER_TEMPLATE.format(title=title.strip(), content=content.strip(), style=style, style_hint=COT_STYLES[style])


def cot_messages(title: str, content: str, style: str, few_shot: bool = True) -> list[dict[str, str]]:
    """Chat messages (system, optional worked example, user) for OpenAI-compatible APIs and chat templates.

    Args:
        title: product title.
        content: product description.
        style: a key of `COT_STYLES`.
        few_shot: include `COT_EXAMPLE` as a user/assistant pair (small local models need it to follow the format).
    """
    import json

    msgs = [{"role": "system", "content": COT_SYSTEM}]
    if few_shot:
        ex = COT_EXAMPLE
        msgs.append({"role": "user", "content": cot_user_prompt(ex["title"], ex["content"], ex["style"])})
        msgs.append({"role": "assistant", "content": json.dumps(ex["answer"], ensure_ascii=False)})
    msgs.append({"role": "user", "content": cot_user_prompt(title, content, style)})
    return msgs



# ----------------------------------------------------------------------------------------------
# Export: the tracks' prompts as chat templates (Jinja for HF tokenizers and GGUF, Go for Ollama)
# ----------------------------------------------------------------------------------------------
# The Llama track's exported template is made from ALPACA_TEMPLATE (one user message renders `alpaca_prompt(title)`).
# The DeepSeek track keeps the tokenizer's own template (what it trained through, `r1_chat_prompt`); only a tokenizer
# without one gets `chat_template("deepseek")`, the study's R1 prompt (a system message replaces R1_SYSTEM). The
# prompt always ends where the model's reply starts.

# Lines that start a new prompt section: a model that runs past its answer is stopped there (Ollama's `stop`).
SECTION_STOPS = ("### Instruction:", "### Input:", "### Question:", "### Response:")


def chat_template(track: str) -> str:
    """The Jinja chat template of a track (HF `tokenizer.chat_template`, GGUF `tokenizer.chat_template`).

    Args:
        track: `llama` (Alpaca: the user message is the product title) or `deepseek` (R1: the shopper's question).

    Returns:
        A template for which `apply_chat_template([{"role": "user", "content": x}], tokenize=False)` equals
        `alpaca_prompt(x)` or `r1_prompt(x)`.
    """
    content = "{{ message['content'] | trim }}"
    if track == "llama":
        head, turn = "", ALPACA_TEMPLATE.format(instruction=ALPACA_INSTRUCTION, input=content)
    elif track == "deepseek":
        head = ("{%- set system = namespace(text=" + repr(R1_SYSTEM) + ") -%}"
                "{%- for message in messages if message['role'] == 'system' -%}"
                "{%- set system.text = message['content'] | trim -%}{%- endfor -%}")
        turn = R1_TEMPLATE.format(system="{{ system.text }}", question=content)
    else:
        raise ValueError(f"unknown track {track!r}; expected 'llama' or 'deepseek'")
    # No `-` before the tags that follow the turn text: it must keep its final newline (HF's Jinja environment
    # also sets trim_blocks/lstrip_blocks, which touch only whitespace after a tag or before one on its own line).
    return (head + "{%- for message in messages -%}{%- if message['role'] == 'user' -%}" + turn
            + "{% elif message['role'] == 'assistant' %}{{ message['content'] | trim }}{{ eos_token }}"
            "{% endif %}{%- endfor -%}")


def export_chat_template(track: str, tokenizer: object | None = None) -> str:
    """The Jinja chat template an exported model carries: the Alpaca one (llama); the tokenizer's own (deepseek,
    the one it trained through), or the study's R1 prompt as a template when the tokenizer has none."""
    if track == "deepseek" and tokenizer is not None and has_chat_template(tokenizer):
        return tokenizer.chat_template  # type: ignore[attr-defined,return-value]
    return chat_template(track)


_PROMPT, _SYSTEM = "\x00prodtune-prompt\x00", "\x00prodtune-system\x00"  # stand-ins rendered, then made Go fields


def ollama_template(track: str, tokenizer: object | None = None) -> str:
    """The Ollama Modelfile TEMPLATE (Go template) of a track: the text `track_prompt` gives, with the user's message
    as `{{ .Prompt }}` and an optional system message as `{{ .System }}`.

    The deepseek track's is rendered from the same `r1_chat_prompt` (the tokenizer's template) with stand-in strings
    for the message, so it cannot drift from training; BOS is left to the GGUF's `add_bos_token`, as in training.

    Args:
        track: `llama` or `deepseek`.
        tokenizer: the run's tokenizer (deepseek track); None: the study's R1 prompt.
    """
    if track == "llama":
        return ALPACA_TEMPLATE.format(instruction=ALPACA_INSTRUCTION, input="{{ .Prompt }}") + "{{ .Response }}"
    if track != "deepseek":
        raise ValueError(f"unknown track {track!r}; expected 'llama' or 'deepseek'")
    if tokenizer is None or not has_chat_template(tokenizer):
        system = "{{ if .System }}{{ .System }}{{ else }}" + R1_SYSTEM + "{{ end }}"
        return R1_TEMPLATE.format(system=system, question="{{ .Prompt }}") + "{{ .Response }}"
    bare = r1_chat_prompt(tokenizer, _PROMPT).replace(_PROMPT, "{{ .Prompt }}")
    with_system = r1_chat_prompt(tokenizer, _PROMPT, _SYSTEM)
    if _SYSTEM not in with_system:  # a template that drops system messages
        return bare + "{{ .Response }}"
    with_system = with_system.replace(_PROMPT, "{{ .Prompt }}").replace(_SYSTEM, "{{ .System }}")
    return "{{ if .System }}" + with_system + "{{ else }}" + bare + "{{ end }}{{ .Response }}"


def stop_strings(track: str, tokenizer: object) -> list[str]:
    """Where an exported model's reply must stop (Ollama's `stop`): EOS, and the start of a next turn: the Alpaca /
    R1 prompt's section headers, or the chat template's user-turn marker (`<|im_start|>`, `<｜User｜>`)."""
    eos = getattr(tokenizer, "eos_token", None)
    stops = [eos] if eos else []
    if track == "llama" or not has_chat_template(tokenizer):
        return stops + list(SECTION_STOPS)
    turn = r1_chat_prompt(tokenizer, _PROMPT).split(_PROMPT, 1)[0]  # what opens the user's turn, after any system part
    marker = turn.rstrip().rsplit("\n", 1)[-1].strip()
    return stops + ([marker] if marker and marker not in stops else [])


# Where a prompt's own text about the product sits: after the last of these headers (Alpaca's input, the R1
# prompt's question, a chat template's user turn), up to the first of the ends that follows.
_GROUNDING_OPEN = ("### Input:\n", "### Question:\n", "<|im_start|>user\n", "<｜User｜>", "<|start_header_id|>user<|end_header_id|>")
_GROUNDING_CLOSE = ("\n\n### Response:", "<|im_end|>", "<｜Assistant｜>", "<|eot_id|>")


def grounding_text(prompt: str) -> str:
    """What a prompt says about the product: the Alpaca input (the title, and with RAG the retrieved products), the
    R1 question, or a chat template's user message; the whole prompt when it has none of these headers. The
    template's own words (instruction, system prompt) are left out: they are no source of facts about a product
    (`decoding.GroundedClaims` lets an answer state only the claims this text holds)."""
    starts = [(prompt.rfind(h), h) for h in _GROUNDING_OPEN if h in prompt]
    if not starts:
        return prompt
    pos, head = max(starts)
    body = prompt[pos + len(head):]
    ends = [body.find(e) for e in _GROUNDING_CLOSE if e in body]
    return body[: min(ends)] if ends else body


if __name__ == "__main__":
    print(alpaca_prompt("Birchmont Extra Thick Exercise Mat 5mm"))
    print("-" * 60)
    print(alpaca_rag_prompt("Birchmont Extra Thick Exercise Mat 5mm", ["Non-slip TPE mat, 6 mm.", "Foam yoga block."]))
    print("-" * 60)
    print(r1_prompt("Is the Birchmont exercise mat thick enough for kneeling?"))
    print("-" * 60)
    from prodtune.models import load_tokenizer

    print(r1_chat_prompt(load_tokenizer("embedded:smollm2-135m-instruct"), "Is the Birchmont mat thick enough?"))
