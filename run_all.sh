#!/usr/bin/env bash
# Run the whole pipeline (notebooks 01..06 with papermill) on a profile; outputs go to outputs/<profile>/.
#   ./run_all.sh                      # embedded offline CPU default (profile cpu)
#   ./run_all.sh --smoke              # minutes-long smoke run (profile smoke)
#   ./run_all.sh --profile colab-t4   # another profile from configs/
#   ./run_all.sh --force              # rerun stages that are up to date
# Stops at the first failing notebook and names it; a rerun skips finished stages and resumes.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
exec .venv/bin/python -m prodtune run "$@"
