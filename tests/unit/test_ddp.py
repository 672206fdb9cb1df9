"""Data-parallel training (issue: multi-GPU with accelerate): 2 processes learn what 1 process learns.

    HF_HUB_OFFLINE=1 .venv/bin/pytest tests/unit/test_ddp.py -q     # ~1 min on 2 CPU cores

Two gloo processes on the CPU (what `run(cfg)` with `num_gpus: 2` launches on a CPU profile) train a tiny random
Llama with a per-device batch of 2; one process trains with a batch of 4. Same global batch, same seed: the
per-step losses and the saved adapter must match, and only rank 0 may write files. The processes run `run(cfg)`
from a small script (`torch.distributed.run` for two); the relaunch through `prodtune train` is checked by the
command it builds (tests/unit/test_train.py parses its arguments back into the same config).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from prodtune import distributed as D
from prodtune import models as MD
from prodtune import train as T
from prodtune.io import project_root

STEPS = 4
SCRIPT = """
import json, sys
from prodtune.io import setup_logging
from prodtune.train import TrainConfig, run
setup_logging()
card = run(TrainConfig(**json.load(open(sys.argv[1]))))
print("CARD " + json.dumps({k: card[k] for k in ("track", "steps", "processes")}), flush=True)
"""


def _data(dest: Path) -> Path:
    """16 train / 4 validation rows of the committed sample (stage 01's layout)."""
    rows = []
    for line in (project_root() / "data/sample/trn_sample.jsonl").read_bytes().splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        if isinstance(r, dict) and all(isinstance(r.get(k), str) for k in ("uid", "title", "content")) and len(r["content"]) > 40:
            rows.append({k: r[k] for k in ("uid", "title", "content")})
    dest.mkdir(parents=True)
    pd.DataFrame(rows[:16]).to_parquet(dest / "train.parquet")
    pd.DataFrame(rows[16:20]).to_parquet(dest / "validation.parquet")
    return dest


def _train(tmp: Path, cfg: T.TrainConfig, processes: int) -> dict:
    script, cfg_file = tmp / "train_script.py", tmp / f"cfg-{processes}.json"
    script.write_text(SCRIPT)
    cfg_file.write_text(json.dumps(dataclasses.asdict(cfg)))
    head = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what D.relaunch sets for CPU processes
    res = subprocess.run([*head, str(script), str(cfg_file)], capture_output=True, text=True, timeout=600, env=env,
                         cwd=project_root())
    assert res.returncode == 0, res.stderr[-4000:]
    # every process returns (their lines may interleave on the shared pipe, so count the markers, not lines)
    assert res.stdout.count("CARD {") == processes, res.stdout[-2000:]
    return json.loads((Path(cfg.out_dir) / "run_card.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    tiny = MD.make_tiny_llama(tmp / "tiny")
    data = _data(tmp / "prepared")
    base = T.TrainConfig(base_model=str(tiny), data_dir=str(data), learning_rate=5e-3, logging_steps=1, eval_steps=2,
                         eval_on_start=False, save_steps=2, warmup_steps=1, max_eval_rows=4, max_train_rows=16,
                         num_threads=1, max_steps=STEPS, max_seq_length=96, progress=False)
    one = _train(tmp, dataclasses.replace(base, out_dir=str(tmp / "one"), per_device_train_batch_size=4), 1)
    two = _train(tmp, dataclasses.replace(base, out_dir=str(tmp / "two"), per_device_train_batch_size=2), 2)
    return one, two, tmp / "one", tmp / "two"


def test_two_processes_match_one_on_the_same_global_batch(runs) -> None:
    one, two, out1, out2 = runs
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["global_batch_size"] == two["global_batch_size"] == 4
    assert one["steps"] == two["steps"] == STEPS
    assert one["fingerprint"] != two["fingerprint"]  # another process count is another run
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
    assert len(events) == 1  # the Trainer's TensorBoard callback writes on rank 0 only
    assert not (out2 / "checkpoints").exists()
    assert {p["step"] for p in two["eval_loss"]} == {2, 4}
    for f in ("adapter_model.safetensors", "run_card.json", "loss.png", "loss_history.csv", "tokenizer_config.json"):
        assert (out2 / f).is_file(), f


def test_launch_commands() -> None:
    cfg = T.TrainConfig(track="deepseek", data_dir="/d", out_dir="/o", num_gpus=2)
    cpu = D.launch_command(2, ["train", *T.cli_args(cfg)], cpu=True)
    assert cpu[1:3] == ["-m", "torch.distributed.run"] and "--nproc_per_node" in cpu
    assert cpu[cpu.index("prodtune") + 1 : cpu.index("prodtune") + 4] == ["train", "--track", "deepseek"]
    assert cpu[cpu.index("--num_gpus") + 1] == "1"
    gpu = D.launch_command(2, ["train"], cpu=False)
    assert "accelerate.commands.launch" in gpu and gpu[gpu.index("--config_file") + 1].endswith("configs/accelerate/ddp.yaml")
    assert Path(D.accelerate_config()).is_file()
    with pytest.raises(ValueError):
        D.launch_command(1, [], cpu=True)


def test_importing_train_loads_no_other_stage_nor_torch() -> None:
    code = ("import sys, prodtune.train; "
            "print(sorted(m for m in ('prodtune.data', 'prodtune.cot', 'prodtune.rag', 'prodtune.evaluate', 'torch', "
            "'transformers', 'trl') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"  # a GPU box without the data stage's dependencies can still train; `--help` starts fast
