#!/usr/bin/env bash
# Install medgcsam and run the main job end to end on the embedded MLflow store:
# train GCSAM on the shipped BUSI sample, track it, evaluate it (operating point frozen on val),
# register it as models:/medgcsam-busi-mini@champion, then batch-predict a folder with the registered model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c constraints.txt -e .
export HF_HUB_OFFLINE=1 MLFLOW_TRACKING_URI="sqlite:///$PWD/outputs/mlflow.db"
start=$(date +%s)
.venv/bin/medgcsam train pipelines/busi_mini.yaml
.venv/bin/medgcsam predict --model models:/medgcsam-busi-mini@champion \
    --input data_manifests/samples/busi_mini --output outputs/busi-mini/predictions.csv
echo "main job finished in $(( $(date +%s) - start )) s (install not counted)"
echo "predictions: outputs/busi-mini/predictions.csv"
echo "browse runs and the registered model: .venv/bin/mlflow ui --backend-store-uri $MLFLOW_TRACKING_URI"
echo "the README's next commands (evaluate, validate-external, predict) read the same store; in your shell run:"
echo "  export MLFLOW_TRACKING_URI=\"$MLFLOW_TRACKING_URI\""
