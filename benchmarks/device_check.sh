#!/usr/bin/env bash
# Check tracing on an accelerator in one go (under 5 minutes on one GPU):
#   1. the tests marked `device`: conservation and the explicit-linear-model check on the built-in model,
#      in float32 and bfloat16 (tolerances derived from each dtype's precision and the model's depth);
#   2. benchmarks/trace_bench.py in float32 and bfloat16: seconds per prompt and peak GPU memory.
#
#   benchmarks/device_check.sh                 # --device cuda
#   benchmarks/device_check.sh --device cpu    # the same checks on CPU (shorter benchmark), so it cannot rot
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#--device=}"; shift ;;
    *) echo "usage: $0 [--device cuda|cuda:N|cpu]" >&2; exit 2 ;;
  esac
done
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 ADAG_TEST_DEVICE="$DEVICE"

if [ "${DEVICE%%:*}" = cpu ]; then
  BENCH=(--prompts 2 --batch-sizes 1,2 --repeats 1 --threads 2)
else
  BENCH=(--prompts 16 --batch-sizes 1,4,8,16 --repeats 3)
fi

echo "== device tests on $DEVICE"
"$PY" -m pytest -q -p no:cacheprovider -m device tests/test_trace.py
for dtype in float32 bfloat16; do
  echo "== trace_bench on $DEVICE, $dtype"
  "$PY" benchmarks/trace_bench.py --device "$DEVICE" --dtype "$dtype" "${BENCH[@]}"
done
