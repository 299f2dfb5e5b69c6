#!/usr/bin/env bash
# Everything issue #12 still needs from a GPU, in one device call of under ten minutes:
# the decode benchmark (graphs on and off, fused and not, overlap on and off) and then the
# whole test suite with CUDA as the default device. Results go to $OUT (or /tmp/gpu_check).
#
# Prepare on this side first (the GPU image lacks these packages; see the device tool's
# README for the pip download line, platform tags included):
#   bash ../shared/device/prepare
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_31_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .whl llguidance starlette uvicorn jsonschema \
#     jsonschema-specifications referencing rpds-py
# then run it with carry [".whl"] and a timeout of 600 s:  bash benchmarks/gpu_check.sh
set -uo pipefail
out=${OUT:-/tmp/gpu_check}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD

nvidia-smi > "$out/nvidia-smi.txt" 2>&1
start=$SECONDS
timeout 300 python3 benchmarks/gpu_decode.py --eager --fused --walked --out "$out/gpu_decode.json" \
  > "$out/gpu_decode.log" 2>&1
echo "benchmark: rc $? in $((SECONDS - start)) s"
tail -n 40 "$out/gpu_decode.log"

start=$SECONDS
timeout 270 python3 -m pytest -q -o addopts='' -p no:cacheprovider -rfE \
  --junitxml="$out/pytest.xml" tests > "$out/pytest.log" 2>&1
echo "tests: rc $? in $((SECONDS - start)) s"
tail -n 60 "$out/pytest.log"
