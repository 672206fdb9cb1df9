# %% [markdown]
# # 01 · Prepare the data: clean, filter, sample and split AmazonTitles-1.3MM
#
# **In:** `trn.json` (or `.jsonl` / `.gz`) of the AmazonTitles-1.3MM dump (`LF-AmazonTitles-1.3MM`, from the
# [Extreme Classification Repository](http://manikvarma.org/downloads/XC/XMLRepository.html)); by default the committed
# invented sample `data/sample/trn_sample.jsonl`. `INPUT` takes a local path, a Drive path
# (`/content/drive/MyDrive/...`) or an http(s) URL of `trn.json`, `trn.json.gz` or the dataset's zip archive; a URL is
# downloaded once into the home's `data/raw/`, which git ignores: never commit the dump. **Out:** `data/<profile>/prepared/{train,validation,test}.parquet`
# (+ `.jsonl` with `WRITE_JSONL = True`), `rejects.jsonl` (every malformed line, with file, line number and reason)
# and `stats.json` (`input_lines = kept + filtered + rejected`). With `RECIPE = "study"` it cleans with the study's
# regex into `data/<profile>/prepared-study/`. The same function runs as `prodtune prepare`.

# %% imports
import pandas as pd
import plotly.express as px

from prodtune import data, notebook

# %% parameters
INPUT = None             # path, Drive path or URL of trn.json / .jsonl / .gz or the dataset's .zip; None: the profile's
N_ROWS = None            # sample N products; None: the profile's setting
WRITE_JSONL = None       # True: also {split}.jsonl; None: the profile's setting (Parquet only)
UID_FROM_TEXT = None     # True: rows whose uid is null get a hash of title+content (real AmazonTitles copies)

# %%
cfg = stage.config(data.Config, input=INPUT, sample=N_ROWS, write_jsonl=WRITE_JSONL, uid_from_text=UID_FROM_TEXT)
cfg

# %% [markdown]
# ## Get the data
# A URL is downloaded into `<home>/data/raw/` (resumed if interrupted, skipped if already there) and `trn.json.gz` is
# taken out of an archive; a local file is used where it is.

# %%
local_input = data.fetch_input(cfg.input)
local_input

# %% [markdown]
# ## Clean, filter, sample and split

# %%
stats = data.run(cfg)
pd.DataFrame([{"input lines": stats["input_lines"], "kept": stats["kept"], "filtered": sum(stats["filtered"].values()),
               "rejected": stats["rejected"], **{f"split {k}": v for k, v in stats["splits"].items()}}])

# %% [markdown]
# ## Filter funnel and rejected lines

# %%
funnel = pd.DataFrame(data.funnel(stats), columns=["step", "rows"])
notebook.show(px.funnel(funnel, x="rows", y="step", title="Stage 01 funnel"))
pd.Series(stats["rejected_by_reason"], name="rejected lines", dtype="int64").to_frame()

# %%
rejects = pd.read_json(f"{cfg.out_dir}/rejects.jsonl", lines=True) if stats["rejected"] else pd.DataFrame()
rejects.head(10)

# %% [markdown]
# ## Lengths of titles and descriptions

# %%
train = data.load_split(cfg.out_dir, "train")
lengths = pd.concat([pd.DataFrame({"chars": train.title.str.len(), "field": "title"}),
                     pd.DataFrame({"chars": train.content.str.len(), "field": "content"})])
notebook.show(px.histogram(lengths, x="chars", color="field", nbins=60, barmode="overlay", log_y=True,
             title="Characters per field (train split)"))

# %% [markdown]
# ## Before and after cleaning (our cleaner vs the study's regex)

# %%
data.before_after(local_input, n=6)

# %% [markdown]
# ## Record results for tests

# %%
notebook.record("input_lines", stats["input_lines"])
notebook.record("kept", stats["kept"])
notebook.record("rejected", stats["rejected"])
notebook.record("train_rows", stats["splits"]["train"])
