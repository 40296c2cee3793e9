#!/usr/bin/env bash
# Session 8, device call 2: native Triton tests and the bf16 check after the tensor-core
# selection product and the G<=4 key-centric forward; selection launch shapes swept at G=1 and
# G=2 (tensor-core product on/off); key-centric forward shapes at G=4. Each step has its own
# time limit so that the tar always comes back.
#   bash benchmarks/run_session8.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/call2; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $O/gpu.txt
timeout 150 python3 -m pytest -q -x tests/test_triton.py 2>&1 | tail -3 | tee $O/pytest.log
timeout 90 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -6 | tee $O/gpu_check.log
P="timeout 100 python3 benchmarks/profile_parts.py --T 65536 --dk 128 --dv 128 --budget 70"
$P --HQ 8 --H 8 --ops cmp_fwd select slc_fwd win_fwd api_fwd --sweep select 2>&1 | tee $O/profile_G1.log
$P --HQ 8 --H 4 --ops select api_fwd --sweep select 2>&1 | tee $O/profile_G2.log
$P --HQ 16 --H 4 --ops cmp_fwd select slc_fwd win_fwd api_fwd --sweep selected_kc_shape 2>&1 | tee $O/profile_G4.log
timeout 60 python3 benchmarks/profile_parts.py --T 65536 --ops select api_fwd 2>&1 | tee $O/profile_paper.log
cp benchmarks/results/profile_T65536_HQ* $O/ 2>/dev/null
tar -C /tmp -cf ${OUT:-/tmp}/call2.tar call2
