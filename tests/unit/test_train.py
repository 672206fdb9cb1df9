"""Training engine: config, prompt masking, EOS, resume, run card, CLI, and overfitting the real SmolLM2.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_train.py -q            # ~1-2 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_train.py -q -m "not slow"

Most tests train a tiny random Llama (SmolLM2's tokenizer) for a few steps; the `slow` one overfits SmolLM2.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from prodtune import models as MD
from prodtune import prompts as P
from prodtune import train as T
from prodtune.config import ConfigError
from prodtune.io import project_root

SAMPLE = project_root() / "data" / "sample" / "trn_sample.jsonl"
# Small, fast settings shared by the tiny runs: 6 steps of 2 rows, checkpoints every 2, eval every 3.
FAST = ["train.per_device_train_batch_size=2", "train.learning_rate=1e-2", "train.save_steps=2", "train.eval_steps=3", "train.logging_steps=1",
        "train.eval_on_start=false", "train.max_eval_rows=4", "train.warmup_steps=1", "train.num_threads=1",
        "train.llama.max_steps=6", "train.llama.max_seq_length=128", "train.deepseek.max_steps=2",
        "train.deepseek.max_seq_length=160"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return MD.make_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """12 train / 4 validation rows of the committed sample, in stage 01's layout."""
    d = tmp_path_factory.mktemp("prepared")
    rows = []
    for line in SAMPLE.read_bytes().splitlines():  # the sample holds malformed lines on purpose: skip them
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("uid", "title", "content")) \
                and 60 <= len(r["content"]) <= 400 and "<" not in r["content"] + r["title"]:
            rows.append({k: r[k] for k in ("uid", "title", "content")})
    df = pd.DataFrame(rows[:16])
    df.iloc[:12].to_parquet(d / "train.parquet")
    df.iloc[12:].to_parquet(d / "validation.parquet")
    return d


@pytest.fixture(scope="module")
def cot(tmp_path_factory) -> Path:
    """A tiny CoT dataset in stage 02's layout (uid, title, Question, Complex_CoT, Response)."""
    d = tmp_path_factory.mktemp("cot")
    rows = [{"uid": f"u{i}", "title": f"Mat {i} mm", "Question": f"Is the {i} mm mat thick enough for yoga?",
             "Complex_CoT": f"The description says the mat is {i} mm thick. " * 3, "Response": f"Yes, {i} mm cushions knees."}
            for i in range(3, 11)]
    pd.DataFrame(rows[:6]).to_parquet(d / "train.parquet")
    pd.DataFrame(rows[6:]).to_parquet(d / "validation.parquet")
    return d


def tiny_cfg(tiny_dir: Path, *extra: str) -> T.TrainConfig:
    return T.train_config("cpu", [f"train.base_model={tiny_dir}", *FAST, *extra])


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,match",
    [
        ({"loss_on": "prompt"}, "loss_on"),
        ({"bf16": True, "fp16": True}, "exclusive"),
        ({"llama": {"max_stepz": 3}}, "unknown key"),
        ({"deepseek": {"data_dir": "x"}}, "unknown key"),
        ({"max_steps": 0}, "max_steps"),
        ({"max_steps": -1, "num_train_epochs": 0.0}, "max_steps"),
        ({"early_stopping_patience": 2, "eval_steps": 20, "save_steps": 30}, "multiple"),
        ({"device": "tpu"}, "device"),
        ({"per_device_train_batch_size": 0}, "batch_size"),
        ({"ddp_grad_dtype": "fp8"}, "ddp_grad_dtype"),
    ],
)
def test_bad_config_is_refused(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        T.TrainConfig(**values)


@pytest.mark.parametrize(
    "profile,track,expect",
    [
        ("cpu", "llama", {"base_model": MD.EMBEDDED_LLM, "bf16": False, "gradient_checkpointing": False, "optim": "adamw_torch"}),
        ("cpu", "deepseek", {"base_model": MD.EMBEDDED_LLM, "loss_on": "completion", "lora_r": 16, "lora_alpha": 16}),
        ("colab-t4", "llama", {"base_model": "unsloth/llama-3-8b-bnb-4bit", "fp16": True, "bf16": False, "max_steps": 60,
                               "optim": "adamw_8bit", "device": "cuda"}),
        ("colab-t4", "deepseek", {"base_model": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B", "max_steps": -1,
                                  "num_train_epochs": 2.0}),
        ("rtx4060-8gb", "llama", {"bf16": True, "fp16": False, "load_in_4bit": True}),
        ("h100", "deepseek", {"bf16": True, "fp16": False, "optim": "adamw_torch_fused", "per_device_train_batch_size": 8}),
        ("h100", "llama", {"per_device_train_batch_size": 8, "learning_rate": 2e-4, "max_seq_length": 2048}),
    ],
)
def test_profiles(profile: str, track: str, expect: dict) -> None:
    tcfg = T.train_config(profile).for_track(track)
    assert {k: getattr(tcfg, k) for k in expect} == expect
    assert tcfg.seed == 3407 and tcfg.warmup_steps == 5
    assert tcfg.learning_rate == (1e-3 if profile == "cpu" else 2e-4)  # the study's rate on GPUs
    assert tcfg.target_modules == list(MD.DEFAULT_TARGET_MODULES)
    assert profile in tcfg.data_dir and "{" not in tcfg.data_dir + tcfg.cot_dir + tcfg.models_dir


def test_per_track_overrides_and_yaml_floats() -> None:
    cfg = T.train_config("cpu", ["train.llama.max_steps=3", "train.learning_rate=1e-3", "train.deepseek.learning_rate=5e-4"])
    assert cfg.for_track("llama").max_steps == 3 and cfg.for_track("deepseek").max_steps == 32
    assert cfg.for_track("llama").learning_rate == 1e-3 and cfg.for_track("deepseek").learning_rate == 5e-4
    with pytest.raises(ConfigError):
        cfg.for_track("mistral")
    # a shared override on the command line beats the profile's per-track value; a per-track one beats both
    cfg = T.train_config("cpu", ["train.max_steps=7", "train.deepseek.max_steps=2"], max_seq_length=100)
    assert (cfg.for_track("llama").max_steps, cfg.for_track("deepseek").max_steps) == (7, 2)
    assert cfg.for_track("llama").max_seq_length == cfg.for_track("deepseek").max_seq_length == 100


# ----------------------------------------------------------------------------------------------
# Data: fitting rows, masking, EOS
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok():
    return MD.load_tokenizer(MD.embedded_llm_dir())


@pytest.mark.parametrize("max_len", [64, 96, 160])
def test_fit_example_keeps_eos_and_answer(tok, max_len: int) -> None:
    long = P.alpaca_example("Mat", "This mat is thick. " * 60, tok.eos_token)
    fitted, cut = T.fit_example(long, tok, max_len)
    ids = tok(P.full_text(fitted))["input_ids"]
    assert cut and len(ids) <= max_len and ids[-1] == tok.eos_token_id
    assert fitted["completion"].rstrip(tok.eos_token).endswith(".")  # cut at a sentence end
    r1 = P.r1_example("Is it thick?", "Step. " * 200, "Yes, 5 mm.", tok.eos_token)
    fitted, cut = T.fit_example(r1, tok, max_len + 100)
    assert cut and fitted["completion"].endswith("\n</think>\nYes, 5 mm." + tok.eos_token)
    assert len(tok(P.full_text(fitted))["input_ids"]) <= max_len + 100
    short = P.alpaca_example("Mat", "Thick.", tok.eos_token)
    assert T.fit_example(short, tok, max_len) == (short, False)
    assert T.fit_example(long, tok, 40) == (None, False)  # the prompt alone does not fit


@pytest.mark.parametrize("track,loss_on", [("llama", "completion"), ("deepseek", "completion"), ("llama", "all")])
def test_labels_mask_the_prompt_and_keep_eos(tiny_dir: Path, prepared: Path, cot: Path, tmp_path: Path, track: str, loss_on: str) -> None:
    tcfg = dataclasses.replace(tiny_cfg(tiny_dir).for_track(track), loss_on=loss_on)
    model, tk, backend = MD.load_train_model(str(tiny_dir), max_seq_length=tcfg.max_seq_length, lora=tcfg.lora(), device="cpu")
    df = T.load_track_split(track, prepared if track == "llama" else cot, "train")
    ds, counts = T.build_dataset(track, df, tk, tcfg.max_seq_length, loss_on)
    trainer = T.make_trainer(tcfg, model, tk, ds, None, tmp_path, progress=False)
    examples = P.build_examples(track, df.to_dict("records"), tk.eos_token)
    assert tk.pad_token_id == tk.eos_token_id  # the hard case: pad == eos
    for row, ex in zip(trainer.train_dataset, examples):
        ids, labels = row["input_ids"], row["labels"]
        n_prompt = len(tk(ex["prompt"])["input_ids"])
        assert ids[-1] == tk.eos_token_id and labels[-1] == tk.eos_token_id  # EOS is learned
        if loss_on == "completion":
            assert all(x == -100 for x in labels[:n_prompt])
            assert labels[n_prompt:] == ids[n_prompt:]
        else:
            assert labels == ids
        assert any(x != -100 for x in labels)
    # the collator pads labels with -100 by position, so the EOS label survives although pad == eos
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    lengths = [len(trainer.train_dataset[i]["input_ids"]) for i in range(4)]
    for i, n in enumerate(lengths):
        assert batch["labels"][i, n - 1].item() == tk.eos_token_id
        assert (batch["labels"][i, n:] == -100).all() and (batch["attention_mask"][i, n:] == 0).all()


def test_data_hash_follows_rows_not_bytes(prepared: Path, tmp_path: Path) -> None:
    df = pd.read_parquet(prepared / "train.parquet")
    ref = T.data_hash([prepared / "train.parquet"])
    df.to_parquet(tmp_path / "train.parquet", compression="gzip")  # same rows, other bytes
    assert T.data_hash([tmp_path / "train.parquet"]) == ref
    df.assign(content=df.content.str.replace("a", "b", n=1)).to_parquet(tmp_path / "train.parquet")
    assert T.data_hash([tmp_path / "train.parquet"]) != ref


def test_missing_cot_folder_says_run_notebook_02(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run notebook 02 first"):
        T.run_train(tiny_cfg(tiny_dir), "deepseek", tmp_path / "cot", tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="notebook 01"):
        T.run_train(tiny_cfg(tiny_dir), "llama", tmp_path / "nothing", tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------
# Runs: run card, skip, resume, CLI
# ----------------------------------------------------------------------------------------------


class StopAt(TrainerCallback):
    """Simulates a kill right after the checkpoint of step `step` was written."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after checkpoint {self.step}")


@pytest.fixture(scope="module")
def full_run(tiny_dir: Path, prepared: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs") / "full"
    return T.run_train(tiny_cfg(tiny_dir), "llama", prepared, out, profile="cpu", progress=False)


def test_run_card_and_artefacts(full_run: dict, prepared: Path) -> None:
    out = Path(full_run["out_dir"])
    card = json.loads((out / "run_card.json").read_text())
    for key in ("track", "profile", "base_model", "steps", "train_loss", "eval_loss", "seconds", "peak_memory_gb",
                "data_hash", "versions", "config", "prompt_version", "seconds_per_step", "rows"):
        assert key in card, key
    assert card["track"] == "llama" and card["profile"] == "cpu" and card["steps"] == 6
    assert [p["step"] for p in card["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in card["eval_loss"]] == [3, 6]
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b)  # every adapter moved off its zero init
    assert card["rows"]["train"]["rows"] == 12 and card["rows"]["validation"]["rows"] == 4
    assert card["peak_memory_gb"] > 0 and card["seconds"] > 0
    assert card["versions"]["trl"] and card["versions"]["peft"] and card["prompt_version"] == P.PROMPT_VERSION
    assert card["data_hash"] == T.data_hash([prepared / "train.parquet", prepared / "validation.parquet"])
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "loss_history.csv",
              "loss_history.json", "loss.html", "loss.png"):
        assert (out / f).is_file(), f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert not (out / "checkpoints").exists()  # removed once the run finished
    csv = pd.read_csv(out / "loss_history.csv")
    assert set(csv.split) == {"train", "validation"} and len(csv) == 8
    assert T.loss_figure(out).data[0].y[-1] == pytest.approx(card["train_loss"][-1]["loss"])


def test_finished_run_is_skipped(full_run: dict, tiny_dir: Path, prepared: Path) -> None:
    again = T.run_train(tiny_cfg(tiny_dir), "llama", prepared, full_run["out_dir"], progress=False)
    assert again["skipped"] and again["steps"] == 6 and again["utc"] == full_run["utc"]
    # a setting that changes training is not skipped: here only checked through the fingerprint
    other = dataclasses.replace(tiny_cfg(tiny_dir).for_track("llama"), learning_rate=1e-3)
    assert T._fingerprint(other, "llama", "h", T._NOT_IN_FINGERPRINT) != T._fingerprint(
        tiny_cfg(tiny_dir).for_track("llama"), "llama", "h", T._NOT_IN_FINGERPRINT)


def test_killed_run_resumes_with_a_continuous_curve(full_run: dict, tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        T.run_train(tiny_cfg(tiny_dir), "llama", prepared, out, progress=False, callbacks=[StopAt(4)])
    assert T.last_checkpoint(out / "checkpoints").name == "checkpoint-4"
    assert not (out / "run_card.json").exists()
    card = T.run_train(tiny_cfg(tiny_dir), "llama", prepared, out, progress=False, resume=True)
    assert card["resumed_from"].endswith("checkpoint-4") and card["steps"] == 6
    assert [p["step"] for p in card["train_loss"]] == [1, 2, 3, 4, 5, 6]  # no gap, no duplicate
    # same losses as the run that was never interrupted (data order, RNG and optimizer state restored)
    ref = [p["loss"] for p in full_run["train_loss"]]
    assert [p["loss"] for p in card["train_loss"]] == pytest.approx(ref, rel=1e-4)
    assert [p["loss"] for p in card["eval_loss"]] == pytest.approx([p["loss"] for p in full_run["eval_loss"]], rel=1e-4)


def test_resume_false_starts_over(tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "fresh"
    with pytest.raises(KeyboardInterrupt):
        T.run_train(tiny_cfg(tiny_dir), "llama", prepared, out, progress=False, callbacks=[StopAt(2)])
    card = T.run_train(tiny_cfg(tiny_dir, "train.llama.max_steps=2"), "llama", prepared, out, progress=False, resume=False)
    assert card["resumed_from"] is None and card["steps"] == 2


def test_deepseek_track_and_cli(tiny_dir: Path, cot: Path, tmp_path: Path, capsys) -> None:
    from prodtune.cli import main

    out = tmp_path / "ds"
    args = ["train", "--track", "deepseek", "--data", str(cot), "--out", str(out), "--max-steps", "2",
            "--set", f"train.base_model={tiny_dir}", *[x for s in FAST for x in ("--set", s)]]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["track"] == "deepseek" and printed["steps"] == 2 and not printed["skipped"]
    card = json.loads((out / "run_card.json").read_text())
    assert card["rows"]["train"]["rows"] == 6 and card["eval_loss"]
    assert main(args) == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["skipped"]


# ----------------------------------------------------------------------------------------------
# The real model: overfit two rows, generate them back, stop at EOS
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_memorises_descriptions_and_stops(tmp_path: Path) -> None:
    rows = [{"uid": "a", "title": "Birchmont Mat", "content": "Thick non-slip mat, 5 mm foam."},
            {"uid": "b", "title": "Solstice Bottle", "content": "Steel bottle holds 750 ml."}]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    cfg = T.train_config("cpu", ["train.learning_rate=3e-3", "train.llama.max_steps=10", "train.per_device_train_batch_size=2",
                                 "train.logging_steps=1", "train.warmup_steps=0", "train.lr_scheduler_type=constant",
                                 "train.llama.max_seq_length=96", "train.num_threads=1"])
    card = T.run_train(cfg, "llama", tmp_path, tmp_path / "run", progress=False)
    losses = [p["loss"] for p in card["train_loss"]]
    assert losses[0] > 2.0 and min(losses[-3:]) < 0.05  # near-zero loss on the memorised rows
    model, tk = MD.load_for_inference(card["base_model"], tmp_path / "run")
    out = MD.generate(model, tk, [P.alpaca_prompt(r["title"]) for r in rows], max_new_tokens=24, progress=False)
    assert [o["text"] for o in out] == [r["content"] for r in rows]
    assert all(o["finished"] for o in out)  # it emits EOS instead of running to max_new_tokens


def test_merge_16bit_matches_the_adapter(tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged_run"
    card = T.run_train(tiny_cfg(tiny_dir, "train.llama.max_steps=2", "train.merge_16bit=true"), "llama", prepared, out,
                       progress=False)
    merged_dir = Path(card["merged_16bit"])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float16 and not (merged_dir / "adapter_config.json").exists()
    tuned, tk = MD.load_for_inference(str(tiny_dir), out)
    ids = tk([P.alpaca_prompt("Mug")], return_tensors="pt")
    with torch.no_grad():
        a = tuned(**ids).logits
        b = merged.float()(**ids).logits
        with tuned.disable_adapter():
            base = tuned(**ids).logits
    # measured: merge error ~0.007, adapter effect ~0.2 (logits up to ~20)
    assert torch.allclose(a, b, atol=0.05) and not torch.allclose(base, b, atol=0.05)
