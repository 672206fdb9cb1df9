"""`prodtune chat`: a terminal loop over a trained run (`prodtune.assistant`); `exit`, `quit` or Ctrl-D ends it.

    prodtune chat --run models/cpu/llama           # type product titles, get descriptions
    prodtune chat --run models/cpu/llama --rag     # ... written from the retrieved products, which are shown
    prodtune chat --run models/cpu/deepseek        # type shoppers' questions, get the reasoning and the answer

Each line is one independent request (the study's prompts are single-turn). Replies stream as they are generated.
"""

from __future__ import annotations

import argparse
import sys

from prodtune.assistant import add_run_flags, answer, load_run, open_rag_store, rag_arg, render
from prodtune.io import UserError

EXIT_WORDS = {"exit", "quit", ":q"}


def make_parser() -> argparse.ArgumentParser:
    """Flags of `prodtune chat`."""
    p = argparse.ArgumentParser(prog="prodtune chat", description="a terminal loop over a trained run: one title "
                                "(Llama track) or question (DeepSeek track) per line; `exit` or Ctrl-D ends it")
    add_run_flags(p)
    p.add_argument("--no_stream", "--no-stream", action="store_true", help="print each reply when it is complete")
    return p


def main(argv: list[str] | None = None) -> int:
    """`prodtune chat`."""
    args = make_parser().parse_args(list(argv or []))
    run = load_run(args.run, device=args.device)
    rag = rag_arg(args)
    if rag is True:
        rag = str(run.run_dir.parent / "chroma")
    if rag is not None:  # open the store once, not per line
        rag = open_rag_store(rag, run)
    ask = "product title" if run.track == "llama" else "shopper's question"
    interactive = sys.stdin.isatty()
    print(f"{run.track} track ({run.card.get('base_model')} + {run.run_dir}); type a {ask}, `exit` or Ctrl-D to end.")
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                print()
                break
        else:
            line = sys.stdin.readline()
            if not line:
                break
            print(f"> {line.rstrip()}")
        line = line.strip()
        if not line:
            continue
        if line.lower() in EXIT_WORDS:
            break
        kw = {"title": line} if run.track == "llama" else {"question": line}
        try:
            if args.no_stream:
                print(render(answer(run, rag=rag, k=args.k, max_new_tokens=args.max_new_tokens,
                                    temperature=args.temperature, **kw)))
            else:
                answer(run, rag=rag, k=args.k, stream=True, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, **kw)
                print()
        except UserError as e:
            print(f"error: {e}")
    return 0
