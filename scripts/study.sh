#!/usr/bin/env bash
# Run the whole study on the active params (default: the embedded Fashion-MNIST study).
# Extra arguments go to snakemake, e.g. scripts/study.sh --config params=configs/paper.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
snakemake --cores all "$@"
echo "study: done. Report: reports/README.md; MLflow: mlflow ui --backend-store-uri sqlite:///$PWD/mlflow.db"
