# %% [markdown]
# # 03 · Fine-tune the Llama track: title → product description (Alpaca, LoRA)
#
# **In:** stage 01's `data/<profile>/prepared/{train,validation}.parquet` (uid, title, content). **Out:** the LoRA
# adapter, tokenizer and `run_card.json` (profile, data hash, steps, loss histories, time, peak memory, versions) in
# `models/<profile>/llama/`, with `loss_history.{csv,json}`, `loss.html`/`loss.png` and TensorBoard logs. The model
# learns to answer the Alpaca instruction `GET THE DESCRIPTION OF THIS PRODUCT` for a title, with the loss on the
# description only; the last sections compare base and fine-tuned generations on the validation split (ROUGE-L).
# With `RECIPE = "study"` it trains the study's own recipe (regex-cleaned text, loss on every token) into
# `models/<profile>/study/`. The same training runs as `prodtune train --track llama`.

# %% imports
from prodtune import assistant, evaluate, gpu, notebook, train

unsloth_loaded = gpu.preload_unsloth()  # CUDA only: unsloth must patch transformers before anything imports it

# %% parameters
MAX_STEPS = None         # None: the profile's train.llama.max_steps
RESUME = True            # continue an interrupted run from its last checkpoint
N_EVAL = None            # validation rows generated before/after; None: the profile's train.llama.n_eval
MAX_NEW_TOKENS = 96      # longest generated description

# %%
cfg = stage.config(train.Config, track="llama", max_steps=MAX_STEPS, resume=RESUME, n_eval=N_EVAL)
cfg

# %% [markdown]
# ## Train (LoRA on all 7 projections, loss on the description only)

# %%
run = train.run(cfg)
{k: run[k] for k in ("base_model", "backend", "steps", "final_train_loss", "final_eval_loss", "seconds",
                     "seconds_per_step", "peak_memory_gb", "skipped", "out_dir")}

# %% [markdown]
# ## Loss curves (also saved as `loss.html` and `loss.png` in the run folder)

# %%
notebook.show(train.loss_figure(run))

# %% [markdown]
# ## Before vs after: base model and fine-tuned adapter on validation titles (greedy, stop at EOS; on a GPU in 4-bit,
# as trained)

# %%
rows = train.load_track_split("llama", cfg.data_dir, "validation").head(cfg.n_eval)
ba = evaluate.before_after(run["base_model"], run["out_dir"], rows, max_new_tokens=MAX_NEW_TOKENS)
print(f"ROUGE-L on {ba['n']} validation products: base {ba['rouge_l_before']:.3f} -> fine-tuned {ba['rouge_l_after']:.3f}; "
      f"stopped at EOS: {ba['stopped_at_eos_before']:.0%} -> {ba['stopped_at_eos_after']:.0%}")
evaluate.before_after_table(ba, n=5)

# %% [markdown]
# ## Try it: a product title to the fine-tuned model (the same function as `prodtune generate` / `prodtune chat`)

# %%
reply = assistant.answer(assistant.load_run(run["out_dir"]), title=rows.title.iloc[0] if len(rows) else "Opaline Yoga Mat, 6 mm, Teal")
print(reply["prompt"], reply["text"], sep="")

# %% [markdown]
# ## Record results for tests

# %%
notebook.record("steps", run["steps"])
notebook.record("train_loss_first", run["train_loss"][0]["loss"])
notebook.record("train_loss_last", run["final_train_loss"])
notebook.record("eval_loss_last", run["final_eval_loss"])
notebook.record("seconds_per_step", run["seconds_per_step"])
notebook.record("rouge_l_before", ba["rouge_l_before"])
notebook.record("rouge_l_after", ba["rouge_l_after"])
