"""Several processes for one training run: data-parallel (DDP) launch and rank helpers.

    prodtune train --track llama --profile h100 --num_gpus 2     # re-launches itself with accelerate, one process a GPU
    accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2 -m prodtune train --track llama ...

`num_gpus: N` (train) builds the `accelerate launch` command above (NCCL) on a CUDA machine, or a `torch.distributed.run`
command with N CPU processes (gloo) where training runs on the CPU (the tests use that to check that 2 processes
learn what 1 process learns from the same global batch). Inside the launched processes the Trainer shards each
global batch (per-device batch x processes x accumulation) and all-reduces gradients; `is_main()` guards every
file the run writes, so only rank 0 writes checkpoints, the adapter, plots and the run card.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Sequence

from prodtune.io import log, project_root

def world_size() -> int:
    """Processes in this run (1 outside a distributed launch)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its machine: the GPU it drives."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True in the one process that writes files (rank 0)."""
    return rank() == 0


def is_launched() -> bool:
    """True inside a process started by torchrun / accelerate launch."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def accelerate_config() -> str:
    """The committed accelerate config for one machine, one process per GPU."""
    return str(project_root() / "configs" / "accelerate" / "ddp.yaml")


def launch_command(num_processes: int, argv: Sequence[str], *, cpu: bool) -> list[str]:
    """The command that runs `prodtune <argv>` in `num_processes` processes.

    Args:
        num_processes: processes to start (GPUs to use, or CPU processes with `cpu=True`).
        argv: the `prodtune` arguments (which must not ask for several processes again).
        cpu: gloo processes on the CPU (torch.distributed.run) instead of accelerate's NCCL launch.
    """
    if num_processes < 2:
        raise ValueError("launch_command is for 2 or more processes")
    if cpu:
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(num_processes)]
    else:
        head = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config(),
                "--num_processes", str(num_processes)]
    return [*head, "-m", "prodtune", *argv]


def relaunch(num_processes: int, argv: Sequence[str], *, cpu: bool) -> int:
    """Run `prodtune <argv>` in `num_processes` processes and return the launcher's exit code."""
    cmd = launch_command(num_processes, argv, cpu=cpu)
    env = dict(os.environ)  # (keeps NCCL_NVLS_ENABLE=0 and the like where the machine sets them)
    if cpu:
        env.setdefault("OMP_NUM_THREADS", "1")  # N processes on N cores: one thread each
    log.info("launching %d %s processes: %s", num_processes, "CPU (gloo)" if cpu else "GPU (NCCL)", " ".join(cmd))
    return subprocess.run(cmd, env=env).returncode
