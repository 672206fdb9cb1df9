"""Choose a run's decoding (and the Llama track's retrieval) settings on the validation split (never the test split).

    .venv/bin/python benchmarks/tune_decoding.py --run models/real/llama --data data/real/prepared \
        --store models/real/chroma --grid 1.0:0,1.0:3,1.0:4,1.2:0 --rag 3:0.0,3:0.6,2:0.7 --out benchmarks/results/tune_real.json
    .venv/bin/python benchmarks/tune_decoding.py --track deepseek --run models/real/deepseek --data data/real/cot \
        --grid 1.0:0,1.0:4,1.1:0,1.1:0:think,1.0:4:think --max_new_tokens 384 --out benchmarks/results/tune_real_deepseek.json

With `--track deepseek` the rows are stage 02's validation CoT questions (`--data` is the CoT folder), prompted as
stage 06's `deepseek-ft-cot` system, and the best setting is the one whose replies most often hold one closed
`<think>` block and an answer (`think_ok`), ties broken by ROUGE-L of the answer; keys `train.deepseek.*`.

For each decoding setting `penalty:ngram` (`repetition_penalty`, `no_repeat_ngram_size`) the fine-tuned run (and,
with `--base`, the base model) generates for the first `--n` validation products with plain prompts; for each
retrieval setting `k:min_score` the fine-tuned run generates with the retrieved descriptions of the store's other
products (the product itself excluded, neighbours below min_score not shown), decoded with the best plain setting.
Every row is scored as stage 06 scores it (ROUGE-L, chrF, MiniLM cosine, repetition, hit the token limit, claims).
The best setting (`choose`: the highest ROUGE-L among settings that copy few claims from other products, end, and,
with `--base`, repeat themselves no more than the base does; within `--tie` of it the fewest unsupported claims) is printed with the config keys to put in the profile
(`train.llama.repetition_penalty`, `no_repeat_ngram_size`, `rag_k`, `rag_min_score`); the figures and the machine go
to `--out`. Generations are cached per setting under `<run>/tune/`, so a rerun only scores.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

HEAD = ("rouge_l", "chrf", "embed_cos", "repetition", "endless", "unsupported_rate", "copied_rate", "think_ok")


def parse_pairs(text: str, kinds: tuple[type, type]) -> list[tuple]:
    return [(kinds[0](a), kinds[1](b)) for a, b in (p.split(":") for p in text.split(",") if p)]


def parse_decoding(text: str) -> dict:
    """`penalty:ngram`, then flags: `:think` (the DeepSeek track's no-EOS-before-`</think>`), `:ground` (no number
    or brand-like word the prompt lacks, `decoding.GroundedClaims`), `:budgetN` (the DeepSeek track's reasoning
    closed after N tokens, `decoding.ThinkBudget`), `:minN` (no EOS before N new tokens)."""
    parts = text.split(":")
    dec = {"repetition_penalty": float(parts[0]), "no_repeat_ngram_size": int(parts[1])}
    flags = {"think": "think_before_eos", "ground": "ground_claims"}
    for f in parts[2:]:
        if f.startswith("budget") and f[6:].isdigit():
            dec["think_budget"] = int(f[6:])
            continue
        if f.startswith("min") and f[3:].isdigit():
            dec["min_new_tokens"] = int(f[3:])
            continue
        if f not in flags:
            raise SystemExit(f"--grid {text}: unknown flag {f!r}; expected {', '.join(flags)}")
        dec[flags[f]] = True
    return dec


def choose(rows: list[dict], tie: float, max_copied: float = 0.10, max_endless: float = 1.0,
           base_repetition: dict | None = None, rep_tol: float = 0.002) -> dict:
    """The best setting: the highest ROUGE-L among those that copy at most `max_copied` of their claims from another
    product (ROUGE-L alone rewards pasting a far neighbour's description: on real validation rows showing every
    neighbour scored 1 point higher while 27% of its claims came from other products); settings within `tie` of the
    best are a tie (68 rows cannot tell them apart), broken by the fewest unsupported claims, then repetition. A
    setting whose answers hit the token limit more often than `max_endless` is left out (a description must end:
    a longer shortest answer raises ROUGE-L and the share that never stops). With `base_repetition` (`--base`: the
    base model's repetition under each decoding, keyed by `decoding_key`), a setting whose answers repeat themselves
    more than the base's do under the same decoding (by more than `rep_tol`: one repeated 3-gram in 68 answers is
    0.01 point) is left out too: the fine-tune must not loop more than the model it started from."""
    def loops(r: dict) -> bool:
        return base_repetition is not None and r["repetition"] > base_repetition.get(decoding_key(r), float("inf")) + rep_tol

    ok = [r for r in rows if r.get("copied_rate", 0.0) <= max_copied and r.get("endless", 0.0) <= max_endless
          and not loops(r)] or rows
    top = max(r["rouge_l"] for r in ok)
    return min((r for r in ok if r["rouge_l"] >= top - tie), key=lambda r: (r["unsupported_rate"], r["repetition"]))


def decoding_key(row: dict) -> str:
    """A result row's decoding settings (`decoding.DECODING`'s keys) as one string."""
    from prodtune.decoding import DECODING

    return json.dumps({k: row.get(k, v) for k, v in DECODING.items()}, sort_keys=True)


def choose_r1(rows: list[dict], tie: float) -> dict:
    """The DeepSeek track's best setting: the most replies with one closed reasoning block and an answer (`think_ok`;
    within `tie` of the best is a tie), then the highest ROUGE-L of the answer against the reference response."""
    top = max(r["think_ok"] for r in rows)
    return max((r for r in rows if r["think_ok"] >= top - tie), key=lambda r: r["rouge_l"])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--track", choices=("llama", "deepseek"), default="llama")
    p.add_argument("--run", required=True, help="a finished run folder of that track")
    p.add_argument("--data", required=True, help="its validation.parquet's folder: stage 01's (llama), stage 02's (deepseek)")
    p.add_argument("--store", help="stage 05 Chroma folder (for --rag)")
    p.add_argument("--grid", default="1.0:0,1.0:3,1.0:4,1.2:0",
                   help="decoding settings penalty:ngram, then :think (DeepSeek: no EOS before </think>) and/or :ground "
                        "(no claim the prompt lacks)")
    p.add_argument("--rag", default="", help="retrieval settings k:min_score, tried with the best decoding")
    p.add_argument("--base", action="store_true", help="also the base model (adapter off) at each decoding setting")
    p.add_argument("--n", type=int, default=68, help="validation products")
    p.add_argument("--max_new_tokens", type=int, default=160)
    p.add_argument("--tie", type=float, default=0.005, help="ROUGE-L difference that counts as a tie")
    p.add_argument("--max_copied", type=float, default=0.10, help="most claims a setting may copy from other products")
    p.add_argument("--max_endless", type=float, default=0.20, help="most answers a setting may leave at the token limit")
    p.add_argument("--rep_tol", type=float, default=0.002, help="with --base: how much more than the base a setting may repeat")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/tune_decoding.json"))
    args = p.parse_args(argv)

    import pandas as pd
    import torch

    from prodtune import metrics as M
    from prodtune import models as MD
    from prodtune import prompts as P
    from prodtune.decoding import DECODING, decoding_settings
    from prodtune.evaluate import generate_and_score, read_run_card

    run = Path(args.run)
    card = read_run_card(run, "train it first")
    val = pd.read_parquet(Path(args.data) / "validation.parquet").iloc[: args.n].reset_index(drop=True)
    model, tok = MD.load_for_inference(card["base_model"], run)
    emb = M.Embedder()
    results: list[dict] = []
    t_all = time.perf_counter()

    def trial(system: str, dec: dict, contexts=None, rag=None, max_chars=600) -> dict:
        t = time.perf_counter()
        name = f"{system}-rp{dec['repetition_penalty']}-nr{dec['no_repeat_ngram_size']}" + (
            "-think" if dec.get("think_before_eos") else "") + ("-ground" if dec.get("ground_claims") else "") + (
            f"-budget{dec['think_budget']}" if dec.get("think_budget") else "") + (
            f"-min{dec['min_new_tokens']}" if dec.get("min_new_tokens") else "") + (
            f"-k{rag[0]}-s{rag[1]}" if rag else "")
        _, summ = generate_and_score(model, tok, val, track=args.track, contexts=contexts, max_context_chars=max_chars,
                                     max_new_tokens=args.max_new_tokens, batch_size=48, embedder=emb,
                                     cache=run / "tune" / f"{name}.jsonl", fingerprint=card.get("fingerprint", "") + system,
                                     n_boot=200, decoding=dec, desc=name, progress=False)
        row = {"system": system, **DECODING, **dec, "rag_k": rag[0] if rag else 0, "rag_min_score": rag[1] if rag else None,
               "shown": sum(1 for c in contexts if c) if contexts is not None else 0,
               **{m: round(summ[m]["mean"], 4) for m in HEAD if m in summ}, "seconds": round(time.perf_counter() - t, 1)}
        results.append(row)
        print(json.dumps(row), flush=True)
        return row

    grid = [parse_decoding(g) for g in args.grid.split(",") if g]
    for dec in grid:
        trial("fine-tuned", dec)
        if args.base:
            with model.disable_adapter():
                trial("base", dec)
    ft = [r for r in results if r["system"] == "fine-tuned"]
    base_rep = {decoding_key(r): r["repetition"] for r in results if r["system"] == "base"} if args.base else None
    best = choose_r1(ft, args.tie) if args.track == "deepseek" else choose(ft, args.tie, args.max_copied, args.max_endless,
                                                                           base_rep, args.rep_tol)
    best_dec = decoding_settings({k: best[k] for k in DECODING})
    best_rag = None
    if args.rag and args.track == "llama":
        from prodtune.rag import open_store, retrieve_context

        store = open_store(args.store)
        pairs = parse_pairs(args.rag, (int, float))
        kmax = max(k for k, _ in pairs)
        hits = [retrieve_context(store, t, k=kmax, exclude_uids=[u]) for t, u in zip(val.title, val.uid)]
        for k, s in pairs:
            ctx = [P.shown_contexts(h[:k], s) for h in hits]
            trial("fine-tuned+rag", best_dec, ctx, (k, s), (card.get("rag") or {}).get("max_chars", 600))
        rag_rows = [r for r in results if r["system"] == "fine-tuned+rag"]
        br = choose(rag_rows, args.tie, args.max_copied, args.max_endless)
        best_rag = {"rag_k": br["rag_k"], "rag_min_score": br["rag_min_score"]}
    out = {"track": args.track, "run": str(run), "run_fingerprint": card.get("fingerprint"), "trained_rag": card.get("rag"),
           "data": str(Path(args.data) / "validation.parquet"), "n": len(val), "max_new_tokens": args.max_new_tokens,
           "greedy": True, "tie": args.tie, "max_copied": args.max_copied, "max_endless": args.max_endless, "results": results, "best_decoding": best_dec, "best_rag": best_rag,
           "machine": f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads, {platform.system()}",
           "seconds": round(time.perf_counter() - t_all, 1), "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    print("best decoding:", best_dec, "best retrieval:", best_rag, "->", args.out)
    return out


if __name__ == "__main__":
    main()
