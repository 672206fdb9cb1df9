"""prodtune: teach LLMs to describe and sell Amazon products.

Stages (one package each, each exposing `Config` and `run(cfg) -> dict`, with a notebook and a `prodtune` command):
    data (01) -> cot (02) -> train (03 llama track, 04 deepseek track) -> rag (05) -> evaluate (06)

    prodtune prepare --input data/sample/trn_sample.jsonl --out_dir data/cpu/prepared
"""

import os as _os

# libgomp's active spin-wait makes torch's CPU threads crawl when cores are shared (measured: generation 132 s -> 16 s
# with PASSIVE). It must be set before torch loads, so it lives here; a user's own setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
