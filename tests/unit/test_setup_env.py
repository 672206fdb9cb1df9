"""The install step run_all.sh and run_tests.sh source (scripts/setup_env.sh), for a GPU profile and for cpu: the
script runs in a copy of the project whose `.venv/bin/python` records every call and stands in for pip (nothing is
installed); everything else, the CUDA check included, runs in this environment's Python."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

WRAPPER = """#!/bin/sh
echo "$*" >> "{log}"
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then exit 0; fi
exec "{python}" "$@"
"""


@pytest.fixture
def project(tmp_path: Path) -> Path:
    proj = tmp_path / "proj"
    (proj / "scripts").mkdir(parents=True)
    shutil.copy2(ROOT / "scripts" / "setup_env.sh", proj / "scripts")
    for name in ("requirements.txt", "requirements-models.txt", "requirements-gpu.txt", "pyproject.toml"):
        shutil.copy2(ROOT / name, proj)
    py = proj / ".venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(WRAPPER.format(log=tmp_path / "calls.log", python=sys.executable))
    py.chmod(0o755)
    return proj


def setup_env(project: Path, profile: str, cuda: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "PYTHONPATH")}
    env["PRODTUNE_PROFILE"] = profile
    if cuda:  # torch sees a CUDA device (what a GPU machine has), nothing else changes
        site = project.parent / "fake_cuda"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
        env["PYTHONPATH"] = str(site)
    res = subprocess.run(["bash", "-c", 'source scripts/setup_env.sh && echo "HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-unset}"'],
                         cwd=project, env=env, capture_output=True, text=True, timeout=300)
    log = project.parent / "calls.log"
    return res, log.read_text().splitlines() if log.is_file() else []


GPU_INSTALL = "-m pip install -q -r requirements-gpu.txt"


def test_a_gpu_profile_without_cuda_stops_before_the_gpu_install(project: Path) -> None:
    res, calls = setup_env(project, "colab-t4")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "prodtune: error: profile 'colab-t4' trains the 8B models on a CUDA GPU" in res.stderr
    assert "--profile cpu" in res.stderr  # says the way out
    assert "-m prodtune.gpu needs-cuda colab-t4" in calls and "-m prodtune.gpu require-cuda colab-t4" in calls
    assert GPU_INSTALL not in calls and not (project / ".venv" / ".prodtune-gpu-installed").exists()
    assert "HF_HUB_OFFLINE" not in res.stdout  # the script stopped


def test_a_gpu_profile_with_cuda_installs_the_gpu_requirements_once_and_keeps_the_hub(project: Path) -> None:
    res, calls = setup_env(project, "rtx4060-8gb", cuda=True)
    assert res.returncode == 0, res.stderr
    assert calls.count(GPU_INSTALL) == 1 and "installing requirements-gpu.txt" in res.stdout
    assert "HF_HUB_OFFLINE=unset" in res.stdout  # the 8B models download
    res, calls = setup_env(project, "rtx4060-8gb", cuda=True)
    assert res.returncode == 0 and calls.count(GPU_INSTALL) == 1  # the stamp says it is done


def test_cpu_installs_the_cpu_requirements_only_and_runs_offline(project: Path) -> None:
    res, calls = setup_env(project, "cpu")
    assert res.returncode == 0, res.stderr
    assert "-m pip install -q -r requirements.txt" in calls and "-m pip install -q --no-deps -e ." in calls
    assert GPU_INSTALL not in calls and "-m prodtune.gpu require-cuda cpu" not in calls
    assert "HF_HUB_OFFLINE=1" in res.stdout
    res, calls2 = setup_env(project, "cpu")
    assert calls2.count("-m pip install -q -r requirements.txt") == 1  # installed once: the stamp matches
