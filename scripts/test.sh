#!/usr/bin/env bash
# Set up the environment and run the whole test suite (two workers, one per core).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
exec .venv/bin/python -m pytest -n 2 tests "$@"
