"""prodtune: teach LLMs to describe and sell Amazon products.

Stages (one module each, each with a notebook and a `prodtune <stage>` command):
    data (01) -> cot (02) -> train (03 llama track, 04 deepseek track) -> rag (05) -> evaluate (06)

    prodtune prepare --input data/sample/trn_sample.jsonl --out data/cpu/prepared
"""

__version__ = "0.1.0"
