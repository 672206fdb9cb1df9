"""Ask a trained model: a product description (Llama track) or a shopper's answer with its reasoning (DeepSeek track).

    prodtune generate --run models/cpu/llama --title "Birchmont Extra Thick Exercise Mat 5mm"
    prodtune generate --run models/cpu/llama --title "Birchmont Exercise Mat" --rag --stream
    prodtune generate --run models/cpu/deepseek --question "Is the Birchmont mat thick enough for kneeling?" --json
    prodtune chat --run models/cpu/deepseek          # a terminal loop (prodtune.chat); `exit` or Ctrl-D ends it

A run folder is what `prodtune train` writes: the LoRA adapter, the tokenizer and `run_card.json` (its `track` and
`base_model` say what to load). The model is prompted exactly as in training (`prodtune.prompts`): the Alpaca prompt
for a title (with `--rag`, `alpaca_rag_prompt` with the retrieved descriptions), the R1 prompt for a question.
Decoding is greedy unless the run card (`generation: {temperature, top_p, max_new_tokens}`) or a flag says otherwise;
the study sampled at 0.2 (Llama track) and 0.7 (DeepSeek track).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from prodtune import models as MD
from prodtune import prompts as P
from prodtune.io import UserError, read_json

# Longest reply when neither the run card nor the caller says: stage 06's defaults (evaluate.EvalConfig).
DEFAULT_MAX_NEW_TOKENS = {"llama": 160, "deepseek": 256}
TRACKS = ("llama", "deepseek")


@dataclass
class Run:
    """A loaded training run: its card, track, model (base + adapter, eval mode), tokenizer and decoding settings."""

    run_dir: Path
    card: dict[str, Any]
    track: str
    model: Any
    tokenizer: Any
    generation: dict[str, Any] = field(default_factory=dict)


def read_card(run_dir: str | os.PathLike) -> dict[str, Any]:
    """The run card of a training run folder, checked for the keys inference needs.

    Raises:
        UserError: the folder, its run card or its adapter is missing, or the track is unknown.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} does not exist; train one with `prodtune train --track llama`")
    card_path = run_dir / "run_card.json"
    if not card_path.is_file():
        raise UserError(f"{run_dir} holds no run_card.json: not a folder written by `prodtune train`")
    card = read_json(card_path)
    if card.get("track") not in TRACKS:
        raise UserError(f"{card_path}: track {card.get('track')!r} is not one of {TRACKS}")
    if not card.get("base_model"):
        card["base_model"] = MD.adapter_base_model(run_dir)
    if not card.get("base_model"):
        raise UserError(f"{card_path}: no base_model, and the adapter does not name one")
    if not (run_dir / "adapter_config.json").is_file():
        raise UserError(f"{run_dir} holds no adapter_config.json: did training finish?")
    return card


def generation_settings(card: dict[str, Any]) -> dict[str, Any]:
    """Decoding settings of a run: the card's `generation` section (or the same keys in its `config`), else greedy."""
    from prodtune.evaluate.generate import decoding_of  # lazily: pandas and the scorers are not needed to chat

    track = card["track"]
    found = {**{k: v for k, v in (card.get("config") or {}).items() if k in ("temperature", "top_p", "max_new_tokens")},
             **(card.get("generation") or {})}
    return {"temperature": float(found.get("temperature") or 0.0), "top_p": float(found.get("top_p") or 1.0),
            "max_new_tokens": int(found.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS[track]),
            **decoding_of(card)}  # the anti-loop decoding chosen on validation, as stage 06 reads it


def load_run(run_dir: str | os.PathLike, *, device: str = "auto") -> Run:
    """Load a training run for inference: the base model of its run card plus its LoRA adapter.

    Args:
        run_dir: a folder written by `prodtune train` (e.g. `models/cpu/llama`).
        device: `"auto"` (CUDA when present), `"cuda"` or `"cpu"`.

    Returns:
        A `Run` to pass to `answer`.
    """
    card = read_card(run_dir)
    model, tok = MD.load_for_inference(card["base_model"], run_dir, device=device)
    return Run(Path(run_dir), card, card["track"], model, tok, generation_settings(card))


def open_rag_store(rag: Any, run: Run) -> Any:
    """The store `rag` names: a store object, a Chroma folder, or True (the `chroma/` folder beside the run folder)."""
    from prodtune import rag as R

    if rag is True:
        rag = run.run_dir.parent / "chroma"
    if isinstance(rag, (str, os.PathLike)):
        if not Path(rag).is_dir():
            raise UserError(f"no RAG store at {rag}: build it with `prodtune rag`, or pass --store DIR")
        return R.open_store(str(rag))
    return rag


def _decode(run: Run, prompt: str, *, max_new_tokens: int, temperature: float, top_p: float,
            on_text: Callable[[str], None] | None, **decoding: Any) -> str:
    """Generate one continuation; with `on_text`, pieces are handed over as they come (TextIteratorStreamer)."""
    if on_text is None:
        out = MD.generate(run.model, run.tokenizer, [prompt], max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, batch_size=1, progress=False, **decoding)
        return out[0]["text"]
    import torch
    from transformers import TextIteratorStreamer

    tok, model = run.tokenizer, run.model
    enc = tok([prompt], return_tensors="pt").to(next(model.parameters()).device)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    # the settings (and sampling seed) of models.generate: streamed and plain replies give the same text
    kw = {**MD.generation_kwargs(model, tok, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                 prompt_length=enc["input_ids"].shape[1], sources=[P.grounding_text(prompt)], **decoding),
          "streamer": streamer}
    failed: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode():
                model.generate(**enc, **kw)
        except BaseException as e:  # re-raised in the caller's thread below
            failed.append(e)
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    pieces = []
    for piece in streamer:
        pieces.append(piece)
        on_text(piece)
    thread.join()
    if failed:
        raise failed[0]
    return "".join(pieces)


def answer(run: Run, *, title: str | None = None, question: str | None = None, rag: Any = None, k: int | None = None,
           stream: bool | Callable[[str], None] = False, max_new_tokens: int | None = None,
           temperature: float | None = None) -> dict[str, Any]:
    """Ask a loaded run: a description for a title (Llama track) or an answer to a question (DeepSeek track).

    Args:
        run: from `load_run`.
        title: product title (Llama track).
        question: the shopper's question, naming the product (DeepSeek track).
        rag: Llama track only: a store (`prodtune.rag.open_store`), a Chroma folder, or True (the `chroma/` folder
            beside the run folder); the `k` nearest products' descriptions go into the prompt.
        k: products retrieved with `rag`; None: the run card's (`rag.k` of a run trained with retrieved context,
            whose similarity threshold and length cap apply too), else 3.
        stream: True prints the text to stdout as it is generated (after the retrieved products, with rag); a
            callable receives each piece instead.
        max_new_tokens: longest reply; default the run card's, else 160 (llama) / 256 (deepseek).
        temperature: 0 is greedy; default the run card's, else 0.

    Returns:
        `{"track", "prompt", "text", "seconds", "new_tokens"?...}`: `text` is the description (llama) or the whole
        reply (deepseek), which also gives `thinking` and `answer` (split at `</think>`); with rag, `retrieved`
        (`uid`, `title`, `score`, `content` of each product, best first).

    Raises:
        UserError: the input does not fit the track (a question for the Llama track, no title...).
    """
    import time

    given = title if run.track == "llama" else question
    other = question if run.track == "llama" else title
    want, flag = ("a title", "--title") if run.track == "llama" else ("a question", "--question")
    if other is not None and given is None:
        raise UserError(f"the {run.track} track answers {want} ({flag}); this run cannot take the other input")
    if not given or not given.strip():
        raise UserError(f"the {run.track} track needs {want} ({flag})")
    if rag not in (None, False) and run.track != "llama":
        raise UserError("--rag adds retrieved product descriptions to the Llama track's prompt; the DeepSeek track "
                        "answers from the question alone")
    result: dict[str, Any] = {"track": run.track}
    if run.track == "llama":
        if rag not in (None, False):
            from prodtune.rag import retrieve_context

            from prodtune.evaluate.generate import rag_settings

            how = rag_settings(run.card)  # as the run was trained to read them (stage 06 does the same)
            hits = retrieve_context(open_rag_store(rag, run), given, k=k or how["k"])
            result["retrieved"] = [{key: h.get(key) for key in ("uid", "title", "score", "content")} for h in hits]
            if stream is True:  # what the description is written from, before it streams
                print(render({"track": "llama", "retrieved": result["retrieved"], "text": ""}), flush=True)
            prompt = P.alpaca_rag_prompt(given, P.shown_contexts(hits, how["min_score"]), max_context_chars=how["max_chars"])
        else:
            prompt = P.alpaca_prompt(given)
    else:
        prompt = P.r1_chat_prompt(run.tokenizer, given)  # the template it trained through
    settings = dict(run.generation)
    if max_new_tokens is not None:
        settings["max_new_tokens"] = int(max_new_tokens)
    if temperature is not None:
        settings["temperature"] = float(temperature)
    on_text = None
    if stream is True:
        def on_text(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()
    elif callable(stream):
        on_text = stream
    t0 = time.perf_counter()
    raw = _decode(run, prompt, on_text=on_text, **settings)
    result.update(prompt=prompt, seconds=round(time.perf_counter() - t0, 3), **settings)
    if run.track == "llama":
        result["text"] = P.parse_alpaca_response(raw, run.tokenizer.eos_token)
    else:
        thinking, reply = P.parse_r1_response(raw, run.tokenizer.eos_token)
        result.update(text=raw.strip(), thinking=thinking, answer=reply)
    return result


def render(result: dict[str, Any]) -> str:
    """A reply as plain text for a terminal: retrieved products, then the description or the reasoning and answer."""
    lines = []
    if result.get("retrieved") is not None:
        lines.append("retrieved:")
        lines += [f"  {h['score']:.3f}  {h['title']}  ({h['uid']})" for h in result["retrieved"]]
        lines.append("")
    if result["track"] == "deepseek":
        lines += ["thinking:", result["thinking"] or "(none: the reply has no </think>)", "", "answer:", result["answer"]]
    else:
        lines.append(result["text"])
    return "\n".join(lines)


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `prodtune generate` and `prodtune chat`."""
    p.add_argument("--run", required=True, metavar="DIR", help="training run folder (adapter + run_card.json), e.g. models/cpu/llama")
    p.add_argument("--rag", action="store_true", help="Llama track: put the retrieved products' descriptions in the prompt")
    p.add_argument("--store", metavar="DIR", default=None, help="Chroma folder for --rag (default: chroma/ beside the run folder)")
    p.add_argument("--k", type=int, default=None, help="products retrieved with --rag (default: the run card's, else 3)")
    p.add_argument("--max_new_tokens", "--max-new-tokens", type=int, default=None, help="longest reply (default: run card, else 160 / 256)")
    p.add_argument("--temperature", type=float, default=None, help="0: greedy (default: run card, else 0)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="where the model runs")
    p.add_argument("--debug", action="store_true", help="show tracebacks")


def make_parser() -> argparse.ArgumentParser:
    """Flags of `prodtune generate`."""
    p = argparse.ArgumentParser(prog="prodtune generate", description="ask a trained run once: a description for a "
                                "title (Llama track) or an answer to a question (DeepSeek track)")
    add_run_flags(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--title", help="product title (Llama track)")
    what.add_argument("--question", help="shopper's question (DeepSeek track)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--stream", action="store_true", help="print the text as it is generated")
    out.add_argument("--json", action="store_true", help="print one JSON object (text; thinking/answer; retrieved)")
    return p


def rag_arg(args: argparse.Namespace) -> Any:
    """What `answer(rag=...)` gets from the flags."""
    if args.store and not args.rag:
        raise UserError("--store is the RAG store: add --rag")
    return (args.store or True) if args.rag else None


def main(argv: list[str] | None = None) -> int:
    """`prodtune generate`."""
    args = make_parser().parse_args(list(argv or []))
    run = load_run(args.run, device=args.device)
    kw = dict(title=args.title, question=args.question, rag=rag_arg(args), k=args.k,
              max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    if args.stream:
        answer(run, stream=True, **kw)
        print()
        return 0
    result = answer(run, **kw)
    print(json.dumps(result, ensure_ascii=False) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
