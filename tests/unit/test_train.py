"""Training (stages 03/04): config, prompt masking, EOS, run card, TensorBoard, resume, interrupts, stale checkpoints.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_train.py -q            # ~3 min on 2 CPU cores
    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_train.py -q -m "not slow"

Most tests train a tiny random Llama (SmolLM2's tokenizer) for a few steps; the `slow` one overfits SmolLM2.
Configs are built with the dataclass itself (real tmp paths), not from a profile.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import TrainerCallback

from prodtune import models as MD
from prodtune import prompts as P
from prodtune import train as T
from prodtune.data.clean import opens_with_quote
from prodtune.train import config as TC
from prodtune.config import ConfigError
from prodtune.io import project_root

SAMPLE = project_root() / "data" / "sample" / "trn_sample.jsonl"
# Small, fast settings shared by the tiny runs: 6 steps of 2 rows, checkpoints every 2, eval every 3.
FAST = dict(per_device_train_batch_size=2, learning_rate=1e-2, save_steps=2, eval_steps=3, logging_steps=1,
            eval_on_start=False, max_eval_rows=4, warmup_steps=1, num_threads=1, max_steps=6, max_seq_length=128,
            progress=False)


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


def tiny_cfg(tiny_dir: Path, data: Path, out: Path, **extra) -> T.TrainConfig:
    return T.TrainConfig(base_model=str(tiny_dir), data_dir=str(data), out_dir=str(out), **{**FAST, **extra})


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values,match",
    [
        ({"track": "mistral"}, "TrainConfig.track"),
        ({"loss_on": "prompt"}, "TrainConfig.loss_on"),
        ({"bf16": True, "fp16": True}, "exclusive"),
        ({"max_steps": 0}, "TrainConfig.max_steps"),
        ({"max_steps": -1, "num_train_epochs": 0.0}, "TrainConfig.max_steps"),
        ({"early_stopping_patience": 2, "eval_steps": 20, "save_steps": 30}, "multiple"),
        ({"early_stopping_patience": 2, "eval_steps": None}, "early_stopping_patience"),
        ({"device": "tpu"}, "TrainConfig.device"),
        ({"per_device_train_batch_size": 0}, "per_device_train_batch_size"),
        ({"num_gpus": 0}, "TrainConfig.num_gpus"),
        ({"ddp_grad_dtype": "fp8"}, "TrainConfig.ddp_grad_dtype"),
        ({"gradient_checkpointing": "yes"}, "TrainConfig.gradient_checkpointing"),
        ({"report_to": ["comet"]}, "TrainConfig.report_to"),
        ({"report_to": ["none", "tensorboard"]}, "none alone"),
        ({"report_to": []}, "TrainConfig.report_to"),
        ({"lora_dropout": 1.0}, "TrainConfig.lora_dropout"),
        ({"rag_k": -1}, "TrainConfig.rag_k"),
        ({"rag_min_score": 1.5}, "rag_min_score"),
        ({"track": "deepseek", "rag_k": 2}, "set it under train.llama"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"no_repeat_ngram_size": -1}, "no_repeat_ngram_size"),
    ],
)
def test_bad_config_is_refused(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        T.TrainConfig(**values)


def test_config_contract() -> None:
    """SECTION, TRACKS, help on every field, types HfArgumentParser takes, templates the loader fills."""
    from transformers import HfArgumentParser

    assert T.Config is T.TrainConfig and T.TrainConfig.SECTION == "train" and T.TrainConfig.TRACKS == ("llama", "deepseek")
    fields = dataclasses.fields(T.TrainConfig)
    assert all(f.metadata.get("help") for f in fields)
    assert not {"llama", "deepseek", "cot_dir", "models_dir"} & {f.name for f in fields}  # flat: one track per config
    cfg = T.TrainConfig()
    assert (cfg.data_dir, cfg.out_dir) == ("{data_dir}/prepared", "{models_dir}/{track}")
    assert cfg.resume and cfg.num_gpus == 1 and cfg.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="out_dir.*template"):
        T.run(dataclasses.replace(cfg, data_dir="/tmp"))
    HfArgumentParser(T.TrainConfig)  # raises on a field type it cannot make a flag of
    assert T.TrainConfig(gradient_checkpointing=True).checkpointing() is True
    assert T.TrainConfig(gradient_checkpointing="unsloth").checkpointing() == "unsloth"
    assert T.TrainConfig().checkpointing() is False


def test_cli_args_rebuild_the_config() -> None:
    """What the DDP relaunch passes to `prodtune train` parses back into the same config (flags from HfArgumentParser)."""
    from transformers import HfArgumentParser

    cfg = T.TrainConfig(track="deepseek", data_dir="/d/cot", out_dir="/m/ds", eval_steps=None, learning_rate=1e-5,
                        report_to=["none"], gradient_checkpointing="unsloth", num_gpus=2, packing=True, max_eval_rows=None)
    args = T.cli_args(cfg)
    assert args[args.index("--num_gpus") + 1] == "1"  # the launched processes must not launch again
    parser = HfArgumentParser(T.TrainConfig)
    parser.add_argument("--set", action="append", default=[])
    (parsed, ns) = parser.parse_args_into_dataclasses(args)
    nulls = {s.split("=")[0].split(".", 1)[1]: None for s in ns.set}
    assert nulls == {"num_threads": None, "ddp_grad_dtype": None, "eval_steps": None, "max_train_rows": None,
                     "early_stopping_patience": None, "max_eval_rows": None, "n_eval": None}
    assert dataclasses.replace(parsed, **nulls) == dataclasses.replace(cfg, num_gpus=1)


def test_fingerprint_follows_what_is_learned() -> None:
    a = T.TrainConfig(data_dir="/x", out_dir="/y")
    same = dataclasses.replace(a, data_dir="/z", out_dir="/w", save_steps=7, resume=False, report_to=["none"], progress=False,
                               n_eval=5)  # notebooks' before/after rows: nothing learned changes
    assert T.fingerprint(a, "h") == T.fingerprint(same, "h")
    for changed in (dataclasses.replace(a, learning_rate=1e-3), dataclasses.replace(a, track="deepseek")):
        assert T.fingerprint(changed, "h") != T.fingerprint(a, "h")
    assert T.fingerprint(a, "h2") != T.fingerprint(a, "h")
    assert T.fingerprint(a, "h", processes=2) != T.fingerprint(a, "h")  # another global batch
    more = dataclasses.replace(a, max_steps=90)
    assert T.fingerprint(more, "h") != T.fingerprint(a, "h")
    assert T.fingerprint(more, "h", resume_key=True) == T.fingerprint(a, "h", resume_key=True)  # a longer run may resume
    quotes = dataclasses.replace(a, skip_press_quotes=True)  # another set of rows is learned
    assert T.fingerprint(quotes, "h") != T.fingerprint(a, "h")
    assert all(getattr(a, k) == v for k, v in TC.ADDED_OFF.items())  # the "as before" value is the default


def test_a_switch_added_later_keeps_earlier_fingerprints(monkeypatch) -> None:
    """A field in ADDED_OFF is left out of the hash at its "as before" value: runs made before it existed are
    still recognised (without that, adding skip_press_quotes would retrain every finished run)."""
    a = T.TrainConfig(data_dir="/x", out_dir="/y")
    kept = T.fingerprint(a, "h")
    monkeypatch.setattr(TC, "ADDED_OFF", {})
    assert T.fingerprint(a, "h") != kept


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
    assert cut and fitted["completion"].endswith("\n</think>\n\nYes, 5 mm." + tok.eos_token)
    assert len(tok(P.full_text(fitted))["input_ids"]) <= max_len + 100
    short = P.alpaca_example("Mat", "Thick.", tok.eos_token)
    assert T.fit_example(short, tok, max_len) == (short, False)
    assert T.fit_example(long, tok, 40) == (None, False)  # the prompt alone does not fit


@pytest.mark.parametrize("track,loss_on", [("llama", "completion"), ("deepseek", "completion"), ("llama", "all")])
def test_labels_mask_the_prompt_and_keep_eos(tiny_dir: Path, prepared: Path, cot: Path, tmp_path: Path, track: str, loss_on: str) -> None:
    data = prepared if track == "llama" else cot
    cfg = tiny_cfg(tiny_dir, data, tmp_path, track=track, loss_on=loss_on, max_seq_length=160, report_to=["none"])
    model, tk, backend = MD.load_train_model(str(tiny_dir), max_seq_length=cfg.max_seq_length, lora=cfg.lora(), device="cpu")
    df = T.load_track_split(track, data, "train")
    ds, counts = T.build_dataset(track, df, tk, cfg.max_seq_length, loss_on)
    trainer = T.make_trainer(cfg, model, tk, ds, None, tmp_path)
    examples = P.build_examples(track, df.to_dict("records"), tk)
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



@pytest.mark.parametrize("bf16", [False, True])
def test_a_4bit_model_keeps_float32_adapters_unless_the_run_is_bf16(tiny_dir: Path, prepared: Path, tmp_path: Path,
                                                                    bf16: bool) -> None:
    """TRL casts a 4-bit model's adapters to bf16; fp16 and fp32 runs get them back in float32 (an fp16 GradScaler
    refuses bf16 gradients: the transformers+bitsandbytes backend stopped at step 1 on the lent GPU)."""
    cfg = tiny_cfg(tiny_dir, prepared, tmp_path, report_to=["none"])
    model, tk, _ = MD.load_train_model(str(tiny_dir), max_seq_length=cfg.max_seq_length, lora=cfg.lora(), device="cpu")
    model.is_loaded_in_4bit = True  # what TRL reads to apply QLoRA's bf16 cast (no bitsandbytes on a CPU)
    ds, _ = T.build_dataset("llama", T.load_track_split("llama", prepared, "train"), tk, cfg.max_seq_length, "completion")
    cfg.bf16 = bf16  # only the cast reads it here; the Trainer's autocast is not started
    trainer = T.make_trainer(cfg, model, tk, ds, None, tmp_path)
    dtypes = {p.dtype for p in trainer.model.parameters() if p.requires_grad}
    assert dtypes == ({torch.bfloat16} if bf16 else {torch.float32})

def test_data_hash_follows_rows_not_bytes(prepared: Path, tmp_path: Path) -> None:
    df = pd.read_parquet(prepared / "train.parquet")
    ref = T.data_hash([prepared / "train.parquet"])
    df.to_parquet(tmp_path / "train.parquet", compression="gzip")  # same rows, other bytes
    assert T.data_hash([tmp_path / "train.parquet"]) == ref
    df.assign(content=df.content.str.replace("a", "b", n=1)).to_parquet(tmp_path / "train.parquet")
    assert T.data_hash([tmp_path / "train.parquet"]) != ref


def test_missing_data_names_the_notebook_to_run(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run notebook 02 first"):
        T.run(tiny_cfg(tiny_dir, tmp_path / "cot", tmp_path / "out", track="deepseek"))
    with pytest.raises(FileNotFoundError, match="notebook 01"):
        T.run(tiny_cfg(tiny_dir, tmp_path / "nothing", tmp_path / "out"))


# ----------------------------------------------------------------------------------------------
# Runs: run card, skip, TensorBoard
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_run(tiny_dir: Path, prepared: Path, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("runs") / "full"
    return T.run(tiny_cfg(tiny_dir, prepared, out, eval_on_start=True))


def test_run_card_and_artefacts(full_run: dict, prepared: Path, tiny_dir: Path) -> None:
    out = Path(full_run["out_dir"])
    card = json.loads((out / "run_card.json").read_text())
    for key in ("track", "base_model", "steps", "train_loss", "eval_loss", "seconds", "peak_memory_gb", "data_hash",
                "versions", "config", "prompt_version", "seconds_per_step", "rows", "trainer_metrics", "tokens_seen",
                "tokens_per_second", "step_seconds"):
        assert key in card, key
    assert card["track"] == "llama" and card["steps"] == 6 and card["resumed_from"] is None
    assert [p["step"] for p in card["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [p["step"] for p in card["eval_loss"]] == [0, 3, 6]
    assert card["eval_loss"][-1]["loss"] < card["eval_loss"][0]["loss"]  # it learned: validation loss fell
    # the Trainer's own figures of the session
    tm = card["trainer_metrics"]
    assert tm["train_runtime"] > 0 and tm["train_samples_per_second"] > 0 and tm["train_steps_per_second"] > 0
    assert card["train_seconds"] == pytest.approx(tm["train_runtime"], abs=0.01) and len(card["step_seconds"]) == 6
    from safetensors.torch import load_file

    adapter = load_file(out / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert len(lora_b) == 2 * 7 and all(v.abs().sum() > 0 for v in lora_b)  # every adapter moved off its zero init
    assert card["rows"]["train"]["rows"] == 12 and card["rows"]["validation"]["rows"] == 4
    assert card["peak_memory_gb"] > 0 and card["seconds"] > 0
    assert card["versions"]["trl"] and card["versions"]["peft"] and card["prompt_version"] == P.PROMPT_VERSION
    assert card["data_hash"] == T.data_hash([prepared / "train.parquet", prepared / "validation.parquet"])
    assert card["config"]["out_dir"] == str(out) and card["config"]["track"] == "llama"
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json", "loss_history.csv",
              "loss_history.json", "loss.html", "loss.png"):
        assert (out / f).is_file(), f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "checkpoints").exists()  # removed once the run finished
    csv = pd.read_csv(out / "loss_history.csv")
    assert set(csv.split) == {"train", "validation"} and len(csv) == 9
    assert T.loss_figure(out).data[0].y[-1] == pytest.approx(card["train_loss"][-1]["loss"])


def test_tensorboard_events_come_from_the_trainer(full_run: dict) -> None:
    """report_to=["tensorboard"] (the default): the Trainer's callback writes the losses into <out>/tensorboard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((Path(full_run["out_dir"]) / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("train/loss")]
    assert losses == pytest.approx([p["loss"] for p in full_run["train_loss"]], rel=1e-5)
    assert len(acc.Scalars("eval/loss")) == 3


def test_finished_run_is_skipped(full_run: dict, tiny_dir: Path, prepared: Path) -> None:
    cfg = tiny_cfg(tiny_dir, prepared, full_run["out_dir"], eval_on_start=True, save_steps=5, report_to=["none"])
    again = T.run(cfg)  # only settings that do not change what is learned differ
    assert again["skipped"] and again["steps"] == 6 and again["utc"] == full_run["utc"]


def test_deepseek_track_without_reporting(tiny_dir: Path, cot: Path, tmp_path: Path) -> None:
    out = tmp_path / "ds"
    card = T.run(tiny_cfg(tiny_dir, cot, out, track="deepseek", max_steps=2, max_seq_length=160, report_to=["none"]))
    assert card["track"] == "deepseek" and card["steps"] == 2 and not card["skipped"]
    assert card["rows"]["train"]["rows"] == 6 and card["eval_loss"]
    assert not (out / "tensorboard").exists() and not list(out.rglob("events.out.tfevents.*"))


def test_a_tracker_that_is_not_installed_is_refused(tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    import importlib.util

    missing = next((r for r in ("trackio", "wandb", "mlflow") if importlib.util.find_spec(r) is None), None)
    if missing is None:
        pytest.skip("every tracker is installed here")
    with pytest.raises(ConfigError, match=f"report_to: {missing} is not installed"):
        T.run(tiny_cfg(tiny_dir, prepared, tmp_path / "out", report_to=[missing], max_steps=1))


# ----------------------------------------------------------------------------------------------
# No lost work: interrupts, resume, stale checkpoints
# ----------------------------------------------------------------------------------------------


class SigintAt(TrainerCallback):
    """Ctrl-C at the end of step `step` (a real SIGINT to this process)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


class KillAt(TrainerCallback):
    """A kill right after the checkpoint of step `step` was written (KeyboardInterrupt raised inside the Trainer)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed after checkpoint {self.step}")


def _steps(card: dict, key: str = "train_loss") -> list[int]:
    return [p["step"] for p in card[key]]


def test_ctrl_c_saves_a_checkpoint_and_the_run_resumes(full_run: dict, tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "ctrl_c"
    cfg = tiny_cfg(tiny_dir, prepared, out, eval_on_start=True)
    before = signal.getsignal(signal.SIGINT)  # pytest's, or SIG_IGN where the runner was started in the background
    with pytest.raises(T.TrainingInterrupted) as e:
        T.run(cfg, callbacks=[SigintAt(3)])
    msg = str(e.value)
    assert "\n" not in msg and "prodtune train --track llama" in msg and "checkpoint-3" in msg
    ckpts = sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-2", "checkpoint-3"]  # step 3 is not a save step: saved because of the interrupt
    assert (out / "checkpoints" / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (out / "run_card.json").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler the run found is back
    card = T.run(cfg)
    assert card["resumed_from"].endswith("checkpoint-3") and card["steps"] == 6
    assert _steps(card) == [1, 2, 3, 4, 5, 6]  # global step continues: no gap, no duplicate
    # same losses as the run that was never interrupted (data order, RNG and optimizer state restored)
    assert [p["loss"] for p in card["train_loss"]] == pytest.approx([p["loss"] for p in full_run["train_loss"]], rel=1e-4)
    assert [p["loss"] for p in card["eval_loss"]] == pytest.approx([p["loss"] for p in full_run["eval_loss"]], rel=1e-4)


def test_a_kill_keeps_the_last_checkpoint_and_an_incomplete_one_is_set_aside(
        full_run: dict, tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "killed"
    cfg = tiny_cfg(tiny_dir, prepared, out, eval_on_start=True)
    with pytest.raises(T.TrainingInterrupted, match="checkpoint-4"):
        T.run(cfg, callbacks=[KillAt(4)])
    assert T.last_checkpoint(out / "checkpoints").name == "checkpoint-4"
    # as if killed while writing checkpoint-4: the resume point is checkpoint-2, checkpoint-4 is kept aside
    (out / "checkpoints" / "checkpoint-4" / "trainer_state.json").unlink()
    card = T.run(cfg)
    assert card["resumed_from"].endswith("checkpoint-2") and _steps(card) == [1, 2, 3, 4, 5, 6]
    assert [p["loss"] for p in card["train_loss"]] == pytest.approx([p["loss"] for p in full_run["train_loss"]], rel=1e-4)
    (stale,) = out.glob("checkpoints.stale-*")
    assert (stale / "checkpoint-4" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("change", [{"resume": False}, {"learning_rate": 5e-3}])
def test_checkpoints_that_do_not_match_are_moved_not_removed(tiny_dir: Path, prepared: Path, tmp_path: Path, change: dict,
                                                             caplog) -> None:
    out = tmp_path / "stale"
    with pytest.raises(T.TrainingInterrupted):
        T.run(tiny_cfg(tiny_dir, prepared, out), callbacks=[KillAt(2)])
    before = sorted(p.relative_to(out / "checkpoints") for p in (out / "checkpoints").rglob("*"))
    with caplog.at_level("WARNING", logger="prodtune"):
        card = T.run(tiny_cfg(tiny_dir, prepared, out, max_steps=2, **change))
    assert card["resumed_from"] is None and card["steps"] == 2
    (stale,) = out.glob("checkpoints.stale-*")
    assert len(stale.name) == len("checkpoints.stale-YYYYmmdd-HHMMSS")
    assert sorted(p.relative_to(stale) for p in stale.rglob("*")) == before  # every file kept
    assert (stale / "checkpoint-2" / "trainer_state.json").is_file()
    assert [r for r in caplog.records if str(stale) in r.getMessage()]  # one log line says where


# ----------------------------------------------------------------------------------------------
# The real model: overfit two rows, generate them back, stop at EOS
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_memorises_descriptions_and_stops(tmp_path: Path) -> None:
    rows = [{"uid": "a", "title": "Birchmont Mat", "content": "Thick non-slip mat, 5 mm foam."},
            {"uid": "b", "title": "Solstice Bottle", "content": "Steel bottle holds 750 ml."}]
    pd.DataFrame(rows).to_parquet(tmp_path / "train.parquet")
    cfg = T.TrainConfig(data_dir=str(tmp_path), out_dir=str(tmp_path / "run"), learning_rate=3e-3, max_steps=10,
                        per_device_train_batch_size=2, logging_steps=1, warmup_steps=0, lr_scheduler_type="constant",
                        max_seq_length=96, num_threads=1, progress=False, report_to=["none"])
    card = T.run(cfg)
    losses = [p["loss"] for p in card["train_loss"]]
    assert losses[0] > 2.0 and min(losses[-3:]) < 0.05  # near-zero loss on the memorised rows
    model, tk = MD.load_for_inference(card["base_model"], tmp_path / "run")
    out = MD.generate(model, tk, [P.alpaca_prompt(r["title"]) for r in rows], max_new_tokens=24, progress=False)
    assert [o["text"] for o in out] == [r["content"] for r in rows]
    assert all(o["finished"] for o in out)  # it emits EOS instead of running to max_new_tokens


def test_merge_16bit_matches_the_adapter(tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged_run"
    card = T.run(tiny_cfg(tiny_dir, prepared, out, max_steps=2, merge_16bit=True, report_to=["none"]))
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


def test_retrieval_augmented_fine_tuning(tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    """rag_k > 0: each training prompt shows the nearest *other* products' descriptions (never its own), those below
    rag_min_score left out; the run card records the retrieval and the decoding that inference then reuses."""
    train = pd.read_parquet(prepared / "train.parquet")
    cfg = tiny_cfg(tiny_dir, prepared, tmp_path / "raft", rag_k=2, rag_min_score=-1.0, rag_max_chars=120,
                   max_seq_length=384, max_steps=2, report_to=["none"], repetition_penalty=1.1)
    (ctx,) = T.neighbour_contexts([train], train, cfg)
    assert [len(c) for c in ctx] == [2] * len(train)
    assert all(own not in c for own, c in zip(train.content, ctx))  # the product itself is never its own context
    (strict,) = T.neighbour_contexts([train], train, dataclasses.replace(cfg, rag_min_score=0.999))
    assert sum(map(len, strict)) < sum(map(len, ctx))  # a high threshold shows fewer (far neighbours left out)
    tok = MD.load_tokenizer(str(tiny_dir))
    ds, counts = T.build_dataset("llama", train, tok, 384, contexts=ctx, max_context_chars=120)
    assert counts["with_context"] == len(train) and all(P.RAG_CONTEXT_HEADER in r["prompt"] for r in ds)
    assert ds[0]["prompt"] == P.alpaca_rag_prompt(train.title[0], ctx[0], max_context_chars=120)
    card = T.run(cfg)
    assert card["rag"] == {"k": 2, "min_score": -1.0, "max_chars": 120, "embedder": cfg.rag_embedder}
    assert card["rows"]["train"]["with_context"] == len(train) and card["rows"]["validation"]["with_context"] == 4
    assert card["generation"] == {"repetition_penalty": 1.1, "no_repeat_ngram_size": 0}
    plain = T.TrainConfig(**{**dataclasses.asdict(cfg), "rag_k": 0})
    assert T.fingerprint(plain, "d") != T.fingerprint(cfg, "d")  # retrieval changes what is learned
    again = T.run(dataclasses.replace(cfg, no_repeat_ngram_size=3))  # decoding only: the run is kept, its card updated
    assert again["skipped"] and again["utc"] == card["utc"]
    saved = json.loads((tmp_path / "raft" / "run_card.json").read_text())
    assert saved["generation"] == {"repetition_penalty": 1.1, "no_repeat_ngram_size": 3}


def test_press_quotes_are_left_out_of_training_not_of_the_catalogue(tiny_dir: Path, prepared: Path, tmp_path: Path) -> None:
    """skip_press_quotes: rows whose description opens with a quotation are not trained on (counted in the card), but
    stay retrievable as other products' context; validation is untouched."""
    train = pd.read_parquet(prepared / "train.parquet")
    quoted = train.copy()
    for i in (0, 3, 5):
        quoted.loc[i, "content"] = "'A wonderful book' The Times 'Gripping' Daily Mail " + quoted.content[i]
    d = tmp_path / "data"
    d.mkdir()
    quoted.to_parquet(d / "train.parquet")
    (d / "validation.parquet").write_bytes((prepared / "validation.parquet").read_bytes())
    cfg = tiny_cfg(tiny_dir, d, tmp_path / "run", skip_press_quotes=True, rag_k=2, rag_min_score=-1.0, max_seq_length=384,
                   max_steps=1, report_to=["none"], eval_on_start=False)
    card = T.run(cfg)
    assert card["rows"]["train"]["rows"] == len(train) - 3 and card["rows"]["train"]["press_quotes_left_out"] == 3
    assert card["rows"]["validation"]["rows"] == 4
    kept = quoted[~quoted.content.map(opens_with_quote)]
    (ctx,) = T.neighbour_contexts([kept], quoted, cfg)
    assert any(c.startswith("'A wonderful book'") for row in ctx for c in row)  # still someone else's context
    plain = T.run(dataclasses.replace(cfg, skip_press_quotes=False, out_dir=str(tmp_path / "plain")))
    assert plain["rows"]["train"]["rows"] == len(train) and "press_quotes_left_out" not in plain["rows"]["train"]


@pytest.mark.parametrize("text, opens", [
    ("'A wonderful book' The Times", True), ("\u201cBrilliant.\u201d (Chicago Tribune)", True),
    ('  "Gripping" Daily Mail', True), ("Praise for the Carson Ryder series: 'Superb stuff' Independent", True),
    ("Praise for \u2018Branson\u2019:'An addictive read' Guardian", True),
    ("\u2019Tis the season for all things monstrous", False), ("Enid Blyton was born in 1897. 'The Famous Five'", False),
    ("Praise be to the garden", False), ("", False), (None, False),
])
def test_opens_with_quote(text, opens: bool) -> None:
    assert opens_with_quote(text) is opens
