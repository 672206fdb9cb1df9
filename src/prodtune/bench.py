"""Helpers for scripts in benchmarks/: describe the machine, measure peak memory, save results.

    python -c "from prodtune.bench import machine_info; print(machine_info())"
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

from prodtune.io import project_root, write_json


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, GPU (if any) and library versions, for benchmark result files."""
    info: dict[str, Any] = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
        info["mem_gib"] = round(int(mem) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["gpu_count"] = torch.cuda.device_count()
            info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        pass
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0:
            info["nvidia_driver"] = out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def peak_rss_gib(children: bool = False) -> float:
    """Peak resident memory of this process (or of its waited-for children), in GiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 2**20  # Linux reports KiB


def save_result(name: str, result: dict[str, Any], results_dir: str | os.PathLike | None = None) -> Path:
    """Write `benchmarks/results/<name>.json` with the machine and a UTC timestamp added."""
    out = Path(results_dir) if results_dir else project_root() / "benchmarks" / "results"
    payload = {"benchmark": name, "utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": machine_info(), **result}
    return write_json(out / f"{name}.json", payload)
