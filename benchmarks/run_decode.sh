#!/usr/bin/env bash
# One device call for the decode work: native kernel tests, then bench_decode.py "$@".
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
[ "${SKIP_TESTS:-0}" = 1 ] || python3 -m pytest -q -x tests/test_decode.py tests/test_cache.py tests/test_triton.py 2>&1 | tail -5 | tee ${OUT:-/tmp}/pytest_decode.log
python3 benchmarks/bench_decode.py "$@" 2>&1 | tee ${OUT:-/tmp}/bench_decode.log
