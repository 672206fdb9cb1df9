"""Token lengths of real training rows, for bench_train_gpu.py (which runs where no data or tokenizer may travel).

    python benchmarks/gpu/make_lengths.py --input ../shared/data/amazontitles_sample.jsonl \
        --tokenizer .gpu/tokenizer --out benchmarks/gpu/lengths_amazontitles.json

Cleans each row as stage 01 does (prodtune.data.clean_text, the same length limits), formats it as a training text of
each track with prodtune.prompts (Llama track: `alpaca_example`; DeepSeek track: `r1_example`), tokenizes it with a
Llama-3 tokenizer (any Llama-3.x tokenizer.json folder; SmolLM2's, from prodtune.models.embedded_llm_dir(), is the
offline fallback and is named in the output) and writes only the prompt and total token counts: no text travels.
The DeepSeek track's chain of thought comes from stage 02; without it the `<think>` block holds a stand-in of
`--cot-words` words, so those rows are a lower bound of the real length.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from prodtune.data import DataConfig, clean_text, parse_line, truncate_text
from prodtune.io import write_json
from prodtune.prompts import alpaca_example, r1_example

def rows(path: Path, cfg: DataConfig) -> list[tuple[str, str]]:
    """(title, content) of the rows stage 01 would keep, cleaned and truncated the same way."""
    out = []
    for raw in path.read_bytes().splitlines():
        parsed = parse_line(raw, uid_from_text=True)  # most rows of this sample carry a null uid
        if isinstance(parsed, str):
            continue
        _, title, content = parsed
        title, content = clean_text(title), clean_text(content)
        if not title or len(content) < cfg.min_content_chars:
            continue
        out.append((truncate_text(title, cfg.max_title_chars), truncate_text(content, cfg.max_content_chars)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", default="../shared/data/amazontitles_sample.jsonl")
    ap.add_argument("--tokenizer", default=None, help="folder with a Llama-3 tokenizer.json (default: SmolLM2's)")
    ap.add_argument("--cot-words", type=int, default=60, help="stand-in chain-of-thought length, in words")
    ap.add_argument("--out", default="benchmarks/gpu/lengths_amazontitles.json")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    if args.tokenizer:
        tok_dir, tok_name = args.tokenizer, "llama-3 (tokenizer.json of Llama-3.2, vocab 128256)"
    else:
        from prodtune.models import embedded_llm_dir

        tok_dir, tok_name = str(embedded_llm_dir()), "SmolLM2-135M-Instruct (proxy)"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    data = rows(Path(args.input), DataConfig())
    eos = tok.eos_token or ""
    stand_in = " ".join(["the product is described by its title so its use and buyer follow"] * (args.cot_words // 12 + 1)).split()[: args.cot_words]
    tracks = {}
    for track in ("llama", "deepseek"):
        prompt_n, total_n = [], []
        for title, content in data:
            ex = (alpaca_example(title, content, eos) if track == "llama"
                  else r1_example(f"Tell me about this product: {title}", " ".join(stand_in), content, eos))
            p = tok(ex["prompt"])["input_ids"]
            t = tok(ex["prompt"] + ex["completion"])["input_ids"]
            prompt_n.append(len(p))
            total_n.append(len(t))
        tracks[track] = {"prompt": prompt_n, "total": total_n,
                         "summary": {"rows": len(total_n), "mean": round(statistics.mean(total_n), 1),
                                     "median": statistics.median(total_n), "max": max(total_n), "min": min(total_n)}}
    write_json(args.out, {"source": Path(args.input).name, "tokenizer": tok_name, "cot_words": args.cot_words,
                          "prompts": "prodtune.prompts alpaca_example / r1_example",
                          "tracks": tracks})
    print(json.dumps({k: v["summary"] for k, v in tracks.items()}), "->", args.out)


if __name__ == "__main__":
    main()
