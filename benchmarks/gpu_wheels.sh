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
norm() { echo "$1" | tr '[:upper:]' '[:lower:]' | sed -E 's/[-_.]+/-/g'; }  # PEP 503 name normalisation
pin() {  # the constraints.txt line of a package: pydantic-core finds pydantic_core==..., gitpython GitPython==...
  local want line
  want="$(norm "$1")"
  while IFS= read -r line; do
    [ "$(norm "${line%%==*}")" = "$want" ] && { echo "$line"; return 0; }
  done < constraints.txt
  echo "error: $1 is not pinned in constraints.txt" >&2
  return 1
}
rm -f .whl/*.whl
# mlflow-skinny (not full mlflow), MONAI, pydantic and its parts, pydicom; versions from constraints.txt
for name in mlflow-skinny monai pydantic pydantic-core annotated-types typing-inspection pydicom; do
  get "$(pin "$name")"
done
# import-time requirements of mlflow-skinny that the GPU image lacks (check each wheel's Requires-Dist)
for name in cachetools click cloudpickle databricks-sdk gitpython opentelemetry-api opentelemetry-sdk \
            opentelemetry-proto opentelemetry-semantic-conventions sqlparse protobuf importlib-metadata \
            python-dotenv; do
  get "$(pin "$name")" || echo "warning: $name not downloaded"
done
# Ray (the experiment runner's scheduler) is a 79 MB wheel, over the 64 MiB a call carries with everything else:
# it travels as .whl/ray_trim.tar.xz (16.6 MB), the wheel unpacked without what a Python-only local Ray never
# loads (the Java jars, the dashboard's web client, rllib/serve/data/train/tune/llm), its native programs and
# extension modules stripped of symbols, xz -9. The same trim of the cp311 wheel passed tests/test_experiments_ray.py
# here. gpu_check.sh unpacks it beside the wheels; jsonschema's family is what the GPU image lacks of Ray's needs.
for name in jsonschema jsonschema-specifications referencing rpds-py; do
  get "$(pin "$name")"
done
pack_ray() {  # pack_ray PYVER OUT: the trimmed Ray of constraints.txt for CPython PYVER (3.12 on the GPU image)
  local tmp
  tmp="$(mktemp -d)"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$1" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$tmp" "$(pin ray)"
  (cd "$tmp" && unzip -q ./ray-*.whl && rm ./ray-*.whl \
    && rm -rf ray/jars ray/dashboard/client/build ray/rllib ray/serve ray/data ray/train ray/tune ray/llm \
    && find ray -name '*.js.map' -delete \
    && find ray -name '*.so' -exec strip --strip-unneeded {} + \
    && strip --strip-unneeded ray/core/src/ray/raylet/raylet ray/core/src/ray/gcs/gcs_server \
    && tar cf - ray ray-*.dist-info | xz -9 -T2 > "$2")
  rm -rf "$tmp"
}
pack_ray 3.12 "$PWD/.whl/ray_trim.tar.xz"
# every wheel must be the constraints.txt version (a wheel file name is NAME-VERSION-...)
bad=0
for whl in .whl/*.whl; do
  file="$(basename "$whl")"; name="${file%%-*}"; rest="${file#*-}"; version="${rest%%-*}"
  want="$(pin "$name")" || { bad=1; continue; }
  [ "${want#*==}" = "$version" ] || { echo "error: $file is not ${want}" >&2; bad=1; }
done
[ "$bad" = 0 ] || exit 1
du -sh .whl
# BUSI, pixel for pixel: grey images as 1-channel PNG (the RGB files hold R=G=B), the rest as they are
mkdir -p .gpu_data
rm -rf .gpu_data/busi
PYTHONPATH="$PWD" "${PYTHON:-.venv/bin/python}" benchmarks/gpu_pack_busi.py "${BUSI_DIR:-../shared/data/busi}" .gpu_data/busi
du -sh .gpu_data/busi
echo "total travelling (must stay under 64 MiB with the tree):"; du -shc .whl .gpu_data | tail -1
