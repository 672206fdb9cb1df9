# %% [markdown]
# # 05 · Build the RAG store: the catalogue in Chroma, and how well a title finds its product
#
# **In:** stage 01's splits (the catalogue: every product, held-out ones first). **Out:** a persistent Chroma
# store in `models/<profile>/chroma/` (one record per product, keyed by uid, embedded with all-MiniLM-L6-v2 by
# default), and `outputs/<profile>/rag/` with retrieval metrics on held-out titles asked four ways (exact, with a
# typo, truncated, paraphrased). The same function runs as `prodtune rag`.

# %% imports
import pandas as pd
import plotly.express as px

from prodtune import notebook, rag

# %% parameters
EMBEDDER = None          # sentence-transformers name or folder; None: the profile's (embedded all-MiniLM-L6-v2)
EMBED = None             # "title" or "title+content"; None: the profile's ("title")
N_ROWS = None            # store at most N products (held-out first); None: the whole catalogue
K = 5                    # hits shown per query

# %%
cfg = stage.config(rag.Config, embedder=EMBEDDER, embed=EMBED, n=N_ROWS)
cfg

# %% [markdown]
# ## Build the store and evaluate retrieval
# An idempotent index keyed by uid (LangChain's indexing API): a rerun embeds and writes only new or changed
# products and removes those no longer in the catalogue; an unchanged evaluation is reused.

# %%
metrics = rag.run(cfg)
pd.Series(metrics, name="value").to_frame()

# %% [markdown]
# ## Retrieval on held-out titles
# A hit is the asked product or one sold under exactly the same title (a title cannot tell those apart);
# `uid_recall@1` counts the asked product alone, and `uid_ceiling@1` is the best any title search can do there.

# %%
table = rag.retrieval_table(metrics)
notebook.show(px.bar(table.melt(id_vars="variant", value_vars=["recall@1", "recall@5", "mrr"]), x="variant", y="value", color="variable",
       barmode="group", range_y=[0, 1.05], title=f"Retrieval on held-out titles ({cfg.embed} embeddings)"))
table

# %% [markdown]
# ## Where retrieval misses: the asked title, the query and the top hit

# %%
queries = pd.read_csv(f"{cfg.out_dir}/retrieval_queries.csv")
queries[queries["rank"].ne(1)][["variant", "title", "query", "rank", "top_title", "top_score"]].head(12)

# %% [markdown]
# ## A few queries and their hits

# %%
store = rag.open_store(cfg)
examples = queries[queries.uid.isin(queries.uid.drop_duplicates().head(2))]
pd.DataFrame([{"variant": q.variant, "query": q.query, "hit": i, **{k: h[k] for k in ("score", "uid", "title")}}
              for q in examples.itertuples() for i, h in enumerate(rag.retrieve_context(store, q.query, k=K), 1)])

# %% [markdown]
# ## The RAG prompt of the Llama track (the product itself is never its own context)

# %%
first = examples.iloc[0]
print(rag.make_rag_chain(store, k=2).invoke({"title": first.title, "exclude_uids": [first.uid]}))

# %% [markdown]
# ## Record results for tests

# %%
notebook.record("n_docs", metrics["n_docs"])
for variant in rag.VARIANTS:
    for name in ("recall@1", "recall@5", "mrr"):
        notebook.record(f"{variant}_{name}", metrics[f"{variant}_{name}"])
notebook.record("eval_products", metrics["eval_products"])
