#!/usr/bin/env bash
# Small query groups (G = 1, 2, 4) in one device call: native tests of both selected-attention
# layouts, the bf16 check, per-part times at 64k with A/B of the key-centric forward and dQ
# and sweeps, and the small-group rows of the training benchmark (plus the paper shape at 64k
# as a regression check).
#   bash benchmarks/run_small_groups.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -m pytest -q -x tests/test_triton.py -k "layouts or dkv" 2>&1 | tail -3 | tee $O/pytest.log
python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -8 | tee $O/gpu_check.log
P="python3 benchmarks/profile_parts.py --T 65536 --dk 128 --dv 128"
$P --HQ 8 --H 8 --sweep selected_kc selected_kc_bwd selected_kc_mib selected_kc_shape --budget 200 2>&1 | tee $O/profile_G1.log
$P --HQ 8 --H 4 --ops slc_fwd slc_bwd api_fwd api_fwd_bwd --sweep selected_kc selected_kc_bwd --budget 100 2>&1 | tee $O/profile_G2.log
$P --HQ 16 --H 4 --ops slc_fwd slc_bwd api_fwd api_fwd_bwd --sweep selected_kc selected_kc_bwd --budget 100 2>&1 | tee $O/profile_G4.log
python3 benchmarks/bench_train.py --settings G4 G1 --lengths 32768 65536 --name train_small_groups 2>&1 | tee $O/bench.log
python3 benchmarks/bench_train.py --settings paper --quick --lengths 65536 --name train_paper_64k 2>&1 | tail -4 | tee $O/bench_paper.log
