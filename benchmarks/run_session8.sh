#!/usr/bin/env bash
# Session 8 device calls after the tensor-core selection product and the G<=4 key-centric
# forward. Each step has its own time limit so that the tar always comes back.
#   bash benchmarks/run_session8.sh sweeps   # call 2: native tests, bf16 check, selection launch
#                                            # shapes at G=1/G=2 (tensor cores on/off), key-centric
#                                            # forward shapes at G=4, paper-shape selection
#   bash benchmarks/run_session8.sh bench    # call 3: the full training benchmark (README table),
#                                            # native tests of the touched kernels, bf16 check
#   bash benchmarks/run_session8.sh unmasked # call 5: banded backward without masks on inner
#                                            # tiles: native tests, bf16 check, A/B at 64k
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/$1; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $O/gpu.txt
if [ "$1" = sweeps ]; then
  timeout 150 python3 -m pytest -q -x tests/test_triton.py 2>&1 | tail -3 | tee $O/pytest.log
  timeout 90 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -6 | tee $O/gpu_check.log
  P="timeout 100 python3 benchmarks/profile_parts.py --T 65536 --dk 128 --dv 128 --budget 70"
  $P --HQ 8 --H 8 --ops cmp_fwd select slc_fwd win_fwd api_fwd --sweep select 2>&1 | tee $O/profile_G1.log
  $P --HQ 8 --H 4 --ops select api_fwd --sweep select 2>&1 | tee $O/profile_G2.log
  $P --HQ 16 --H 4 --ops cmp_fwd select slc_fwd win_fwd api_fwd --sweep selected_kc_shape 2>&1 | tee $O/profile_G4.log
  timeout 60 python3 benchmarks/profile_parts.py --T 65536 --ops select api_fwd 2>&1 | tee $O/profile_paper.log
  cp benchmarks/results/profile_T65536_HQ* $O/ 2>/dev/null
elif [ "$1" = unmasked ]; then
  timeout 110 python3 -m pytest -q -x tests/test_triton.py -k "branch or packed or all_grad" 2>&1 | tail -3 | tee $O/pytest.log
  timeout 100 python3 benchmarks/gpu_check.py --lengths 4096 2>&1 | tail -6 | tee $O/gpu_check.log
  timeout 100 python3 benchmarks/profile_parts.py --T 65536 --ops cmp_bwd win_bwd --sweep banded_unmasked 2>&1 | tee $O/profile_paper.log
  cp benchmarks/results/profile_T65536_HQ* $O/ 2>/dev/null
else
  timeout 330 python3 benchmarks/bench_train.py 2>&1 | tee $O/bench.log
  cp benchmarks/results/train_* $O/ 2>/dev/null
  tar -C /tmp -cf ${OUT:-/tmp}/$1.tar $1
  timeout 100 python3 -m pytest -q -x tests/test_triton.py -k "select or layouts or branches" 2>&1 | tail -3 | tee $O/pytest.log
  timeout 110 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -6 | tee $O/gpu_check.log
fi
tar -C /tmp -cf ${OUT:-/tmp}/$1.tar $1
