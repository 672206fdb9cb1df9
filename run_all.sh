#!/usr/bin/env bash
# Run the whole pipeline (notebooks 01..06 with papermill) on a profile; outputs go to outputs/<profile>/.
#   ./run_all.sh                      # embedded offline CPU default (profile cpu)
#   ./run_all.sh --smoke              # minutes-long smoke run (profile smoke)
#   ./run_all.sh --profile colab-t4   # a GPU profile: installs requirements-gpu.txt, keeps hub access on
#   ./run_all.sh --force              # rerun stages that are up to date
#   ./run_all.sh --set train.max_steps=30 --timeout_s 7200   # override a profile value; longest cell
# Stops at the first failing notebook and names it; a rerun skips finished stages and resumes.
set -euo pipefail
cd "$(dirname "$0")"
PRODTUNE_PROFILE=cpu
prev=""
for a in "$@"; do
  [ "$prev" = "--profile" ] && PRODTUNE_PROFILE="$a"
  case "$a" in --profile=*) PRODTUNE_PROFILE="${a#--profile=}" ;; --smoke) PRODTUNE_PROFILE=smoke ;; esac
  prev="$a"
done
export PRODTUNE_PROFILE
source scripts/setup_env.sh
exec .venv/bin/python -m prodtune run "$@"
