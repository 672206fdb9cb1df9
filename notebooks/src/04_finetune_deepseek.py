# %% [markdown]
# # 04 · Fine-tune the DeepSeek track: a sales assistant that reasons before it answers (R1, LoRA)
#
# **In:** stage 02's `data/<profile>/cot/{train,validation}.parquet` (Question, Complex_CoT, Response). **Out:** the
# LoRA adapter, tokenizer and `run_card.json` in `models/<profile>/deepseek/`, with loss histories, plots and
# TensorBoard logs. Each row is the question, then `<think>{cot}</think>{answer}`; the loss is on the reasoning and
# the answer only. The last sections compare base and fine-tuned answers on validation questions. The same training
# runs as `prodtune train --track deepseek`.

# %% imports
from prodtune import assistant, evaluate, gpu, notebook, train

unsloth_loaded = gpu.preload_unsloth()  # CUDA only: unsloth must patch transformers before anything imports it

# %% parameters
MAX_STEPS = None         # None: the profile's train.deepseek.max_steps (or its epochs)
RESUME = True            # continue an interrupted run from its last checkpoint
N_EVAL = None            # validation questions generated before/after; None: the profile's train.deepseek.n_eval
MAX_NEW_TOKENS = 224     # longest generated reasoning + answer (fine-tuned answers end at ~100-210)

# %%
cfg = stage.config(train.Config, track="deepseek", max_steps=MAX_STEPS, resume=RESUME, n_eval=N_EVAL)
cfg

# %% [markdown]
# ## Train (LoRA on all 7 projections, loss on the reasoning and answer only)

# %%
run = train.run(cfg)
{k: run[k] for k in ("base_model", "backend", "steps", "final_train_loss", "final_eval_loss", "seconds",
                     "seconds_per_step", "peak_memory_gb", "skipped", "out_dir")}

# %% [markdown]
# ## Loss curves (also saved as `loss.html` and `loss.png` in the run folder)

# %%
notebook.show(train.loss_figure(run))

# %% [markdown]
# ## Before vs after: base model and fine-tuned adapter on validation questions (greedy, stop at EOS; on a GPU in 4-bit,
# as trained)

# %%
rows = train.load_track_split("deepseek", cfg.data_dir, "validation").head(cfg.n_eval)
ba = evaluate.before_after(run["base_model"], run["out_dir"], rows, max_new_tokens=MAX_NEW_TOKENS)
print(f"ROUGE-L of the answer on {ba['n']} validation questions: base {ba['rouge_l_before']:.3f} -> "
      f"fine-tuned {ba['rouge_l_after']:.3f}; stopped at EOS: {ba['stopped_at_eos_before']:.0%} -> {ba['stopped_at_eos_after']:.0%}")
evaluate.before_after_table(ba, n=5)

# %% [markdown]
# One full fine-tuned completion, reasoning included:

# %%
print(ba["rows"][0]["input"], "\n\n<think>\n" + ba["rows"][0]["after_full"])

# %% [markdown]
# ## Try it: a shopper's question to the fine-tuned model (the same function as `prodtune generate` / `prodtune chat`)

# %%
question = rows.Question.iloc[0] if len(rows) else "Is this yoga mat good for beginners?"
reply = assistant.answer(assistant.load_run(run["out_dir"]), question=question)
print(f"question: {question}\n\nreasoning: {reply['thinking']}\n\nanswer: {reply['answer']}")

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
