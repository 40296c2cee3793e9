#!/usr/bin/env bash
# Small query groups (G = 1, 2, 4) in one device call: native tests of both selected-attention
# layouts, the bf16 check of small groups, per-part times at 64k with the partial-buffer budget
# swept, and the small-group rows of the training benchmark. One tar to $OUT.
#   bash benchmarks/run_small_groups.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/small_groups; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -m pytest -q -x tests/test_triton.py -k "layouts or dkv" 2>&1 | tail -2 | tee $O/pytest.log
python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -6 | tee $O/gpu_check.log
P="python3 benchmarks/profile_parts.py --T 65536 --dk 128 --dv 128 --ops slc_fwd slc_bwd api_fwd api_fwd_bwd"
$P --HQ 8 --H 8 --sweep selected_kc_mib --budget 100 2>&1 | tee $O/profile_HQ8_H8.log
python3 benchmarks/profile_kernels.py --setting G1 --backward --tune '{"selected_kc_mib": [128]}' '{"selected_kc_mib": [1024]}' 2>&1 | tee $O/profile_key_centric.log
python3 benchmarks/bench_train.py --settings G4 G1 --lengths 32768 65536 --name train_small_groups 2>&1 | tail -6 | tee $O/bench.log
cp benchmarks/results/*small_groups* benchmarks/results/profile_T65536_HQ* $O/ 2>/dev/null
tar -C /tmp -cf ${OUT:-/tmp}/small_groups.tar small_groups
