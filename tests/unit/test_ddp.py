"""Data-parallel training (issue: multi-GPU with accelerate): 2 processes learn what 1 process learns.

Two gloo processes on the CPU (what `prodtune train --num-gpus 2` launches on a CPU profile) train a tiny random
Llama with a per-device batch of 2; one process trains with a batch of 4. Same global batch, same seed: the
per-step losses and the saved adapter must match, and only rank 0 may write files.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prodtune import distributed as D
from prodtune import models as MD
from prodtune.io import project_root

STEPS = 4
COMMON = ["train.learning_rate=5e-3", "train.logging_steps=1", "train.eval_steps=2", "train.eval_on_start=false",
          "train.save_steps=2", "train.warmup_steps=1", "train.max_eval_rows=4", "train.max_train_rows=16",
          "train.num_threads=1", f"train.llama.max_steps={STEPS}", "train.llama.max_seq_length=96"]


def _train(tiny: Path, data: Path, out: Path, batch: int, num_gpus: int) -> dict:
    args = [sys.executable, "-m", "prodtune", "train", "--track", "llama", "--data", str(data), "--out", str(out),
            "--num-gpus", str(num_gpus), "--set", f"train.base_model={tiny}",
            "--set", f"train.per_device_train_batch_size={batch}"]
    for s in COMMON:
        args += ["--set", s]
    res = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=project_root())
    assert res.returncode == 0, res.stderr[-4000:]
    printed = [line for line in res.stdout.splitlines() if line.startswith("{\"")]
    assert len(printed) == 1, res.stdout  # only rank 0 prints the summary
    return json.loads((out / "run_card.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared_dir: Path) -> tuple[dict, dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    tiny = MD.make_tiny_llama(tmp / "tiny")
    one = _train(tiny, prepared_dir, tmp / "one", batch=4, num_gpus=1)
    two = _train(tiny, prepared_dir, tmp / "two", batch=2, num_gpus=2)
    return one, two, tmp / "one", tmp / "two"


def test_two_processes_match_one_on_the_same_global_batch(runs) -> None:
    one, two, out1, out2 = runs
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["global_batch_size"] == two["global_batch_size"] == 4
    assert one["steps"] == two["steps"] == STEPS
    l1 = [p["loss"] for p in one["train_loss"]]
    l2 = [p["loss"] for p in two["train_loss"]]
    assert len(l1) == len(l2) == STEPS
    assert l2 == pytest.approx(l1, rel=2e-3)  # same rows per step, gradients all-reduced: same trajectory
    e1 = [p["loss"] for p in one["eval_loss"]]
    e2 = [p["loss"] for p in two["eval_loss"]]
    assert e1[-1] < e1[0]  # it learns (same validation rows at steps 2 and 4)
    assert e2 == pytest.approx(e1, rel=1e-2)  # eval shards are averaged per process: close, not bit-equal
    # tokens counted over both processes: the same number as the single process saw
    assert two["tokens_seen"] == one["tokens_seen"] > 0
    from safetensors.torch import load_file

    a1, a2 = load_file(out1 / "adapter_model.safetensors"), load_file(out2 / "adapter_model.safetensors")
    assert a1.keys() == a2.keys() and len(a1) == 2 * 7 * 2
    for k in a1:
        assert torch.allclose(a1[k], a2[k], rtol=1e-3, atol=1e-5), k
    # a different global batch would not match: the comparison can fail
    assert not all(torch.equal(v, torch.zeros_like(v)) for k, v in a2.items() if "lora_B" in k)


def test_only_rank_zero_writes(runs) -> None:
    _, two, _, out2 = runs
    events = list((out2 / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1  # one writer, not one per process
    assert not (out2 / "checkpoints").exists()
    assert {p["step"] for p in two["eval_loss"]} == {2, 4}
    for f in ("adapter_model.safetensors", "run_card.json", "loss.png", "loss_history.csv", "tokenizer_config.json"):
        assert (out2 / f).is_file(), f


def test_launch_commands() -> None:
    cpu = D.launch_command(2, ["train", "--track", "llama"], cpu=True)
    assert cpu[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in cpu and cpu[-4:] == ["prodtune", "train", "--track", "llama"]
    gpu = D.launch_command(2, ["train"], cpu=False)
    assert "accelerate.commands.launch" in gpu and gpu[gpu.index("--config_file") + 1].endswith("configs/accelerate/ddp.yaml")
    assert Path(D.accelerate_config()).is_file()
    assert D.strip_option(["--num-gpus", "2", "--track", "x", "--num-gpus=3"], "--num-gpus") == ["--track", "x"]
    with pytest.raises(ValueError):
        D.launch_command(1, [], cpu=True)


def test_cli_imports_only_the_stage_it_runs() -> None:
    code = ("import sys; from prodtune.cli import make_parser; p = make_parser('train'); "
            "print(sorted(m for m in ('prodtune.data', 'prodtune.cot', 'prodtune.rag', 'prodtune.evaluate') if m in sys.modules)); "
            "print(list(p._subparsers._group_actions[0].choices))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "['train']"  # a GPU box without the data stage's dependencies can still train


def test_gpu_profiles_compress_ddp_gradients() -> None:
    from prodtune.train import train_config

    assert train_config("cpu").for_track("llama").ddp_grad_dtype is None  # the gloo test compares exact fp32 runs
    assert train_config("colab-t4").for_track("llama").ddp_grad_dtype == "fp16"  # T4: no bf16
    assert train_config("h100").for_track("deepseek").ddp_grad_dtype == "bf16"
