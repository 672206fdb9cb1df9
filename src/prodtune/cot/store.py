"""Stage 02's storage: the resumable append-only store, the Parquet outputs, the dataset card and the Hub upload.

    python -c "from prodtune.cot import load_rows; print(load_rows('data/cpu/cot').head())"

`cot.jsonl` (accepted rows) and `rejects.jsonl` are appended one line per product and flushed at once, keyed by
uid, so a killed run resumes without duplicates or lost rows. From them `write_outputs` writes `cot.parquet`,
`{train,validation,test}.parquet` and the dataset card `README.md` (loadable with `datasets.load_dataset(out_dir)`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from prodtune.cot.config import ROW_COLUMNS, SPLIT_COLUMNS, SPLITS
from prodtune.cot.products import Item
from prodtune.io import atomic_path, log, write_json, write_text


def read_jsonl(path: Path) -> list[dict]:
    """Read a JSONL file written by `CoTStore`, first cutting a torn last line left by a killed run."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping a torn last line (%d bytes) left by an interrupted run", path, len(data) - keep)
        with open(path, "r+b") as fh:
            fh.truncate(keep)
        data = data[:keep]
    out = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            log.warning("%s: line %d is not valid JSON; skipped", path, n)
    return out


class CoTStore:
    """`cot.jsonl` (accepted rows) and `rejects.jsonl`, appended one line per product and flushed at once.

    A product is done once it has a row or a final reject; rejects marked `retryable` (retries exhausted on
    transient errors) are tried again by the next run. Rows are read back deduplicated by uid, so even a
    file concatenated by hand never yields a product twice.
    """

    def __init__(self, out: Path):
        self.rows_path, self.rejects_path = out / "cot.jsonl", out / "rejects.jsonl"
        self.rows: dict[str, dict] = {}
        for r in read_jsonl(self.rows_path):
            self.rows.setdefault(r["uid"], r)
        self.rejects: list[dict] = read_jsonl(self.rejects_path)
        self._rows_fh = open(self.rows_path, "ab")  # noqa: SIM115 - closed in close()
        self._rej_fh = open(self.rejects_path, "ab")  # noqa: SIM115

    def done(self) -> set[str]:
        """Uids with a row or a final (non-retryable) reject."""
        final = {r["uid"] for r in self.rejects if not r.get("retryable")}
        return set(self.rows) | final

    def add_row(self, row: dict) -> None:
        """Append an accepted row (ignored when the product already has one)."""
        if row["uid"] in self.rows:
            return
        self._rows_fh.write(orjson.dumps(row) + b"\n")
        self._rows_fh.flush()
        self.rows[row["uid"]] = row

    def add_reject(self, rec: dict) -> None:
        """Append a rejected answer or a failed request (the latest decision about a product counts)."""
        self._rej_fh.write(orjson.dumps(rec) + b"\n")
        self._rej_fh.flush()
        self.rejects.append(rec)

    def close(self) -> None:
        """Flush both files to disk and close them."""
        for fh in (self._rows_fh, self._rej_fh):
            if not fh.closed:
                os.fsync(fh.fileno())
                fh.close()


def _rows_table(rows: list[dict], columns: tuple[str, ...]) -> pa.Table:
    schema = pa.schema([(c, pa.string()) for c in columns])
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows], schema=schema)


def write_outputs(out: Path, store: CoTStore, products: list[Item], stats: dict[str, Any]) -> None:
    """Write `cot.parquet`, the split files, `stats.json` and the dataset card from the store (atomically)."""
    order = {it.uid: it.order for it in products}
    rows = sorted(store.rows.values(), key=lambda r: (order.get(r["uid"], len(order)), r["uid"]))
    for name, table in [("cot", _rows_table(rows, ROW_COLUMNS))] + [
        (s, _rows_table([r for r in rows if r["split"] == s], SPLIT_COLUMNS)) for s in SPLITS
    ]:
        with atomic_path(out / f"{name}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
    write_json(out / "stats.json", stats)
    write_text(out / "README.md", dataset_card(stats))


def _size_category(n: int) -> str:
    for lim, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < lim:
            return name
    return "1M<n<10M"


def dataset_card(stats: dict[str, Any]) -> str:
    """The dataset card (README.md with the Hub's YAML header) for the CoT dataset described by `stats`."""
    backend = stats["backend"]
    header = {
        "pretty_name": f"prodtune product CoT ({backend} backend)",
        "language": ["en"],
        "license": "other",
        "task_categories": ["text-generation", "question-answering"],
        "tags": ["synthetic", "chain-of-thought", "e-commerce", "prodtune", f"backend-{backend}"],
        "size_categories": [_size_category(stats["rows"])],
        # `datasets` fails on an empty split file, so only splits with rows are declared (all files exist).
        "configs": [{"config_name": "default", "data_files": [
            {"split": s, "path": f"{s}.parquet"} for s in SPLITS if stats["splits"][s] or not stats["rows"]]}],
    }
    if backend == "template":
        kind = ("**Template rows, not LLM output.** Every row was built deterministically by `prodtune.cot.template_answer` "
                "from the product's own sentences and numbers, without any language model. They let the offline pipeline "
                "run end to end; do not use them as reasoning data.")
    elif backend == "local":
        kind = (f"Generated offline by the local model `{stats['model']}` (greedy, JSON skeleton "
                f"`{stats['config'].get('local_mode')}` mode), then filtered by the quality gates below.")
    else:
        kind = f"Generated by `{stats['model']}` through an OpenAI-compatible API, then filtered by the quality gates below."
    funnel = "\n".join(f"| {step} | {n} |" for step, n in stats["funnel"])
    reasons = "\n".join(f"| {k} | {v} |" for k, v in stats["rejected_by_reason"].items()) or "| (none) | 0 |"
    return (
        "---\n" + yaml.safe_dump(header, sort_keys=False) + "---\n\n"
        f"# prodtune product CoT dataset ({backend})\n\n{kind}\n\n"
        "Each row holds a shopper's question about one product (`Question`), step-by-step reasoning that uses only "
        "the product's title and description (`Complex_CoT`) and a concise answer (`Response`), in the column layout "
        "of the study's published dataset. `uid`/`title` name the product (AmazonTitles-1.3MM via prodtune stage 01); "
        "a row's split is its product's split in stage 01, so no product appears in two splits.\n\n"
        "| field | value |\n|---|---|\n"
        f"| source | prodtune stage 01 prepared splits (`{stats['config'].get('data_dir')}`) |\n"
        f"| backend | `{backend}` |\n| model | `{stats['model']}` |\n| prompt version | `{stats['prompt_version']}` |\n"
        f"| seed | {stats['seed']} |\n| rows | {stats['rows']} ({', '.join(f'{k} {v}' for k, v in stats['splits'].items())}) |\n"
        f"| question styles | {', '.join(f'{k} {v}' for k, v in sorted(stats['styles'].items()))} |\n"
        f"| retries (HTTP / invalid answers) | {stats['retries']['http_total']} / {stats['retries']['invalid_total']} |\n\n"
        "## Quality gates\n\nAnswers must be valid JSON with exactly `Question`, `Complex_CoT`, `Response`; have bounded "
        f"lengths; not loop (at least {stats['config'].get('min_distinct'):.0%} distinct word 3-grams in reasoning and answer); "
        "use no number absent from the title, description or question; have at least "
        f"{stats['config'].get('min_overlap')} of the answer's content words in the source; reproduce less than "
        f"{stats['config'].get('max_copy_ratio'):.0%} of the description; and ask a question that is not a near-duplicate "
        f"(word 3-gram Jaccard < {stats['config'].get('dedup_threshold')}) of an accepted one.\n\n"
        f"| step | products |\n|---|---|\n{funnel}\n\n| rejected because | products |\n|---|---|\n{reasons}\n\n"
        "## Use\n\n```python\nfrom datasets import load_dataset\nds = load_dataset(\"path/to/this/folder\")  # train / validation / test\n```\n\n"
        "Made with `prodtune cot` (stage 02); `cot.jsonl` keeps per-row generation metadata, `rejects.jsonl` every rejected answer "
        "with its reason.\n"
    )


def load_rows(out_dir: str | Path, split: str | None = None) -> "Any":
    """The accepted rows as a pandas DataFrame: `cot.parquet`, or one split's file."""
    import pandas as pd

    path = Path(out_dir) / f"{split or 'cot'}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; run stage 02 (prodtune cot / notebook 02) first")
    return pd.read_parquet(path)


def load_rejects(out_dir: str | Path) -> "Any":
    """Every rejected answer with its reason as a pandas DataFrame (latest decision per product)."""
    import pandas as pd

    recs = read_jsonl(Path(out_dir) / "rejects.jsonl")
    df = pd.DataFrame(recs, columns=["uid", "title", "split", "style", "reason", "detail", "retryable", "answer", "raw", "meta"])
    return df.drop_duplicates("uid", keep="last").reset_index(drop=True)


def push_to_hub(out_dir: str | Path, repo_id: str, token: str | None = None, private: bool = True) -> str:
    """Upload the dataset (card + splits) to the Hugging Face Hub; needs a token (`HF_TOKEN` or `token`).

    The card is uploaded first, so `datasets`' push keeps its text and only updates the YAML metadata
    (`configs`, `dataset_info`) for the files it writes under `data/`.

    Args:
        out_dir: a stage 02 output folder.
        repo_id: `user/name` of the dataset repository (created if missing).
        token: a write token; default `$HF_TOKEN`.
        private: create the repository private.

    Returns:
        The dataset's URL.
    """
    from datasets import DatasetDict, load_dataset
    from huggingface_hub import HfApi

    out = Path(out_dir)
    token = token or os.environ.get("HF_TOKEN")
    if not token:
        raise ValueError("push_to_hub needs a Hugging Face write token: set HF_TOKEN or pass token=")
    files = {s: str(out / f"{s}.parquet") for s in SPLITS if (out / f"{s}.parquet").is_file() and pq.read_metadata(out / f"{s}.parquet").num_rows}
    if not files:
        raise FileNotFoundError(f"{out}: no non-empty split parquet files; run stage 02 first")
    dd = DatasetDict(load_dataset("parquet", data_files=files))
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    api.upload_file(path_or_fileobj=str(out / "README.md"), path_in_repo="README.md", repo_id=repo_id, repo_type="dataset")
    dd.push_to_hub(repo_id, token=token)
    url = f"https://huggingface.co/datasets/{repo_id}"
    log.info("cot: pushed %s to %s", out, url)
    return url
