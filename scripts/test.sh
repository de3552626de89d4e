#!/usr/bin/env bash
# Install medgcsam into a fresh virtual environment and run the test suite; exits with pytest's code.
set -uo pipefail
cd "$(dirname "$0")/.."
venv=${MEDGCSAM_TEST_VENV:-.venv-test}
python3 -m venv --clear "$venv" || exit 1
"$venv/bin/python" -m pip install -q --upgrade pip || exit 1
"$venv/bin/python" -m pip install -q -c constraints.txt -e ".[dev,server]" || exit 1
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
"$venv/bin/python" -m pytest -q "$@"
