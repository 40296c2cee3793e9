#!/usr/bin/env bash
# One device call: install carried wheels, GPU tests, bf16 correctness, benchmark. Usage:
#   bash benchmarks/run_gpu.sh "<gpu_check args>" "<bench_train args>"
set -uo pipefail
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
[ "${SKIP_TESTS:-0}" = 1 ] || python3 -m pytest -q -x tests/test_triton.py 2>&1 | tail -5 | tee ${OUT:-/tmp}/pytest.log
[ -z "${1:-}" ] || python3 benchmarks/gpu_check.py $1 2>&1 | tee ${OUT:-/tmp}/gpu_check.log
[ -z "${2:-}" ] || python3 benchmarks/bench_train.py $2 2>&1 | tee ${OUT:-/tmp}/bench.log
