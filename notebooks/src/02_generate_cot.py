# %% [markdown]
# # 02 · Generate the chain-of-thought dataset: Question / Complex_CoT / Response per product
#
# **In:** stage 01's `data/<profile>/prepared/*.parquet`. **Out:** `data/<profile>/cot/{train,validation,test}.parquet`
# (the DeepSeek track's rows), `cot.jsonl` / `rejects.jsonl` (resumable), `stats.json` and a dataset card
# (`README.md`). Backends: `template` (offline, built from each product's own facts: the cpu default), `local` (a
# model through transformers, JSON-constrained: the GPU profiles' default, Llama-3.1-8B-Instruct in 4-bit) and
# `openai` (any OpenAI-compatible server: vLLM, Ollama, a hosted API; chosen when `BASE_URL` is given).
# Every answer passes quality gates (valid JSON, lengths, repetition, grounded numbers, overlap with the source, no
# copy, no near-duplicate question). The same function runs as `prodtune cot`.

# %% imports
import pandas as pd
import plotly.express as px

from prodtune import cot, notebook

# %% parameters
BACKEND = None           # "template" | "local" | "openai"; None: openai when BASE_URL is given, else the profile's
                         # (cpu: template; GPU profiles: local)
MODEL = None             # openai: e.g. "gpt-4o-mini"; local: a hub id or path; None: the backend's default
BASE_URL = None          # an OpenAI-compatible server: e.g. "http://localhost:8000/v1" (vLLM), "http://localhost:11434/v1"
                         # (Ollama); its key in the environment variable cot.api_key_env (OPENAI_API_KEY)
N_ROWS = None            # products to process (seeded order over all splits); None: all. Keep 3-5 for local on CPU
CONCURRENCY = None       # requests in flight (openai backend); None: the profile's
OVERWRITE = None         # True: discard earlier rows and start again

# %%
cfg = stage.config(cot.Config, backend=cot.pick_backend(BACKEND, BASE_URL), model=MODEL, base_url=BASE_URL, n=N_ROWS,
                   concurrency=CONCURRENCY, overwrite=OVERWRITE)
cfg

# %% [markdown]
# ## Generate, gate and store (resumes where an earlier run stopped)

# %%
stats = cot.run(cfg)
print(f"stage 02 ran the {stats['backend']} backend with {stats['model']}",
      {k: stats["this_run"][k] for k in ("device", "load_in_4bit", "dtype") if k in stats["this_run"]})
pd.DataFrame([{"backend": stats["backend"], "model": stats["model"], "products": stats["products_selected"],
               "rows": stats["rows"], "rejected": stats["rejected"], "to retry": stats["pending_retryable"],
               "HTTP retries": stats["retries"]["http_total"], "invalid answers": stats["retries"]["invalid_total"],
               "seconds": stats["this_run"]["seconds"], **{f"split {k}": v for k, v in stats["splits"].items()}}])

# %% [markdown]
# ## Gate funnel: valid JSON, lengths, repetition, grounded numbers, overlap with the source, no copy, no near-duplicate

# %%
funnel = pd.DataFrame(cot.funnel(stats), columns=["step", "products"])
notebook.show(px.funnel(funnel, x="products", y="step", title=f"Stage 02 funnel ({stats['backend']} backend)"))
pd.Series({**stats["rejected_by_reason"], **{f"retry {k}": v for k, v in stats["retries"]["http"].items()}},
          name="count", dtype="int64").to_frame()

# %% [markdown]
# ## A few rows

# %%
rows = cot.load_rows(cfg.out_dir)
rows[["title", "style", "Question", "Complex_CoT", "Response"]].head(3)

# %% [markdown]
# ## Rejected answers and why

# %%
cot.load_rejects(cfg.out_dir)[["title", "reason", "detail"]].head(5)

# %% [markdown]
# ## Question styles

# %%
notebook.show(px.bar(rows["style"].value_counts().rename_axis("style").reset_index(), x="style", y="count",
       title="Rows per question style"))

# %% [markdown]
# ## Record results for tests

# %%
notebook.record("backend", stats["backend"])
notebook.record("model", stats["model"])
notebook.record("products", stats["products_selected"])
notebook.record("rows", stats["rows"])
notebook.record("rejected", stats["rejected"])
notebook.record("valid_answers", stats["funnel"][1][1])
notebook.record("pass_rate", stats["pass_rate"])
notebook.record("train_rows", stats["splits"]["train"])
notebook.record("retries", stats["retries"]["http_total"] + stats["retries"]["invalid_total"])
