#!/usr/bin/env bash
# Fill .whl/ (ignored) with the wheels the GPU image lacks, and pack BUSI losslessly into .gpu_data/busi (ignored),
# both to travel with the working tree (64 MiB in all) to the GPU machine, where gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
get() {
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$1"
}
pin() { grep -i "^$1==" constraints.txt | head -1; }
# mlflow-skinny (not full mlflow), MONAI, pydantic and its parts, pydicom; versions from constraints.txt
for name in mlflow-skinny monai pydantic pydantic-core annotated-types typing-inspection pydicom; do
  spec="$(pin "$name" || true)"
  get "${spec:-$name}"
done
# import-time requirements of mlflow-skinny that the GPU image lacks (check each wheel's Requires-Dist)
for name in cachetools click cloudpickle databricks-sdk gitpython opentelemetry-api opentelemetry-sdk \
            sqlparse protobuf importlib-metadata; do
  spec="$(pin "$name" || true)"
  get "${spec:-$name}" || echo "warning: $name not downloaded"
done
du -sh .whl
# BUSI, lossless PNG copy (the files already are PNG): the manifest is rebuilt on the GPU machine
mkdir -p .gpu_data
rm -rf .gpu_data/busi
cp -r ../shared/data/busi .gpu_data/busi 2>/dev/null || cp -r "${BUSI_DIR:?set BUSI_DIR to the BUSI folder}" .gpu_data/busi
du -sh .gpu_data/busi
echo "total travelling (must stay under 64 MiB with the tree):"; du -shc .whl .gpu_data | tail -1
