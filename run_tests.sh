#!/usr/bin/env bash
# Install (if needed) and run the whole test suite on CPU, offline: unit, data, notebook and smoke-pipeline tests.
#   ./run_tests.sh                    # everything CI runs
#   ./run_tests.sh -m "not slow"      # extra pytest arguments pass through
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh
exec .venv/bin/python -m pytest -q "$@"
