#!/usr/bin/env bash
# The README's benchmark in one device call: the full training benchmark (every setting), then
# the native Triton tests most touched by the small-group work. Outputs go to $OUT as one tar.
#   bash benchmarks/run_final.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/final; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 benchmarks/bench_train.py 2>&1 | tee $O/bench.log
cp benchmarks/results/train_* $O/
timeout 240 python3 -m pytest -q -x tests/test_triton.py -k "layouts or dkv or branches or packed" 2>&1 | tail -3 | tee $O/pytest.log
tar -C /tmp -cf ${OUT:-/tmp}/final.tar final
