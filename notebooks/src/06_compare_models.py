# %% [markdown]
# # 06 · Compare the models: base vs fine-tuned vs fine-tuned + RAG vs the study's recipe vs the DeepSeek track
#
# **In:** the test split of stage 01, the CoT test questions of stage 02, the run folders of stages 03/04 and of the
# study's recipe (stage 03 run with `RECIPE = "study"`), the Chroma store of stage 05. **Out:**
# `outputs/<profile>/metrics.json` (system -> metric -> mean and 95% CI, plus paired differences), `report.md`, a
# standalone `report.html` with the interactive loss curves, and the generations (`generations/*.jsonl`, resumable).
# This stage only generates and scores: it trains nothing. Same function as `prodtune evaluate`.

# %% imports
from IPython.display import Markdown, display

from prodtune import evaluate, notebook

# %% parameters
N_TEST = None            # evaluate on the first N test products; None: the profile's setting (all)
SYSTEMS = None           # e.g. ["base", "llama-ft"]; None: the profile's list

# %%
cfg = stage.config(evaluate.Config, n_test=N_TEST, systems=SYSTEMS)
cfg

# %% [markdown]
# ## Generate and score every system (greedy, cached, resumable)

# %%
result = evaluate.run(cfg)

# %% [markdown]
# ## Metrics with bootstrap 95% confidence intervals

# %%
evaluate.metrics_table(result)

# %% [markdown]
# ## Paired differences: does fine-tuning help, does RAG help, what is our recipe worth?

# %%
evaluate.comparisons_table(result)

# %% [markdown]
# ## Training and validation loss of both tracks and the study's recipe (interactive)

# %%
fig = evaluate.loss_figure({"llama": cfg.llama_dir, "deepseek": cfg.deepseek_dir, "study-recipe": cfg.study_dir})
notebook.show(fig) if fig is not None else print("no run cards")

# %% [markdown]
# ## Example answers side by side

# %%
display(Markdown(open(f"{cfg.out_dir}/report.md", encoding="utf-8").read().split("## Example answers", 1)[1]))

# %% [markdown]
# ## Record results for tests

# %%
for system in ("base", "llama-ft", "llama-ft+rag"):
    if system in result:
        for metric in ("rouge_l", "embed_cos"):
            notebook.record(f"{system}.{metric}", result[system][metric]["mean"])
notebook.record("metrics_finite", evaluate.is_finite_metrics(result))
print(f"report: {cfg.out_dir}/report.md and {cfg.out_dir}/report.html")
