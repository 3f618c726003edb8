#!/usr/bin/env bash
# Install what the tests need, then run the whole test suite (slow end-to-end tests included).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow"
set -euo pipefail
cd "$(dirname "$0")/.."
ARPG_EXTRAS=test,slurm bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec python -m pytest --durations=30 "$@"
