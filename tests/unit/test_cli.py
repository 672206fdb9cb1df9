"""The CLI made from the stage dataclasses: help from the fields, the one loader, one-line errors, any folder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from prodtune.config import field_help

ROOT = Path(__file__).parents[2]
SAMPLE = ROOT / "data" / "sample" / "trn_sample.jsonl"


def prodtune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prodtune", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_top_help_lists_commands_profiles_and_an_example(tmp_path: Path) -> None:
    res = prodtune("--help", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    for word in ("prepare", "cot", "train", "rag", "evaluate", "run", "colab-t4", "rtx4060-8gb", "llama, deepseek",
                 "prodtune train --track llama"):
        assert word in res.stdout, word


def test_stage_help_is_the_dataclass_help_with_the_profile_values(tmp_path: Path) -> None:
    from prodtune.data import Config

    res = prodtune("prepare", "--help", "--profile", "smoke", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    text = " ".join(res.stdout.split())
    for name, help_text in field_help(Config).items():
        assert f"--{name}" in text and " ".join(help_text.split())[:40] in text, name
    assert "(default: 160)" in text  # smoke's data.sample, not the dataclass default


def test_prepare_from_another_folder_with_flags_and_set(tmp_path: Path) -> None:
    """Relative paths typed by the user are relative to where they are; the profile is found anyway."""
    (tmp_path / "in.jsonl").write_bytes(SAMPLE.read_bytes())
    res = prodtune("prepare", "--input", "in.jsonl", "--out_dir", "out", "--set", "data.sample=40", "--seed", "5", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    stats = json.loads(res.stdout.strip().splitlines()[-1])
    assert stats["kept"] == 40 and sum(stats["splits"].values()) == 40
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["kept"] == 40


@pytest.mark.parametrize(
    "args, words",
    [
        (["prepare", "--set", "data.sample=many"], ["DataConfig.sample", "'many'"]),
        (["prepare", "--set", "data.sampel=3"], ["unknown key", "sampel"]),
        (["prepare", "--profile", "nope"], ["profile 'nope' not found", "known:", "cpu"]),
        (["prepare", "--input", "missing.jsonl"], ["missing.jsonl"]),
        (["train", "--track", "gpt"], ["unknown track 'gpt'"]),
        (["frobnicate"], ["unknown command 'frobnicate'"]),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path: Path, args: list[str], words: list[str]) -> None:
    res = prodtune(*args, "--out_dir", str(tmp_path / "o"), cwd=tmp_path) if args[0] == "prepare" else prodtune(*args, cwd=tmp_path)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip() and "prodtune" in line and "error" in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    res = prodtune("prepare", "--set", "data.sample=many", "--debug", cwd=tmp_path)
    assert res.returncode != 0 and "Traceback" in res.stderr and "ConfigError" in res.stderr


def test_train_ctrl_c_then_the_same_command_resumes(tmp_path: Path, prepared_dir: Path) -> None:
    """A Ctrl-C during `prodtune train` keeps a checkpoint and says how to resume; the same command goes on from it."""
    import signal
    import time

    from prodtune.models import make_tiny_llama

    tiny = make_tiny_llama(tmp_path / "tiny")
    out = tmp_path / "run"
    args = ["train", "--track", "llama", "--base_model", str(tiny), "--data_dir", str(prepared_dir), "--out_dir", str(out),
            "--max_steps", "40", "--save_steps", "2", "--per_device_train_batch_size", "2", "--max_seq_length", "160",
            "--eval_steps", "40", "--no_eval_on_start", "--report_to", "none", "--num_threads", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "prodtune", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while (not list((out / "checkpoints").glob("checkpoint-*/trainer_state.json")) and proc.poll() is None
           and time.time() < deadline):
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 130, err
    said = [line for line in err.splitlines() if line.startswith("prodtune train:")]
    assert len(said) == 1 and "checkpoint" in said[0] and "prodtune train" in said[0][15:], err
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("checkpoint-*"))
    assert kept and not (out / "run_card.json").exists()

    res = prodtune(*[a if a != "40" or i != args.index("--max_steps") + 1 else str(kept[-1] + 2) for i, a in enumerate(args)],
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    card = json.loads((out / "run_card.json").read_text())
    assert card["resumed_from"].endswith(f"checkpoint-{kept[-1]}") and card["steps"] == kept[-1] + 2


def _one_error_line(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 2, (res.stdout, res.stderr[-3000:])
    lines = [line for line in res.stderr.splitlines() if line.startswith("prodtune ") and ": error: " in line]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


def test_a_gpu_profile_without_cuda_is_one_line(tmp_path: Path, prepared_dir: Path) -> None:
    line = _one_error_line(prodtune("train", "--profile", "colab-t4", "--data_dir", str(prepared_dir),
                                    "--out_dir", str(tmp_path / "run"), cwd=tmp_path))
    assert "CUDA" in line and "--profile cpu" in line
    assert not (tmp_path / "run" / "run_card.json").exists()


def test_a_missing_store_is_one_line(tmp_path: Path, prepared_dir: Path) -> None:
    run = tmp_path / "llama"
    run.mkdir()
    (run / "run_card.json").write_text(json.dumps({"base_model": "embedded:smollm2-135m-instruct", "track": "llama"}))
    line = _one_error_line(prodtune("evaluate", "--data_dir", str(prepared_dir), "--llama_dir", str(run),
                                    "--chroma_dir", str(tmp_path / "no-store"), "--systems", "base+rag",
                                    "--out_dir", str(tmp_path / "out"), cwd=tmp_path))
    assert "no-store" in line and "prodtune rag" in line


def test_a_refused_connection_is_one_line(tmp_path: Path, prepared_dir: Path) -> None:
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    line = _one_error_line(prodtune("cot", "--backend", "openai", "--base_url", f"http://127.0.0.1:{port}/v1",
                                    "--model", "m", "--n", "2", "--max_retries", "1", "--data_dir", str(prepared_dir),
                                    "--out_dir", str(tmp_path / "cot"), cwd=tmp_path))
    assert f"127.0.0.1:{port}" in line and "cannot connect" in line
