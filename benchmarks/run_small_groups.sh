#!/usr/bin/env bash
# Small query groups (G = 1, 2, 4) in one device call: native tests of both selected-attention
# layouts, the bf16 check, per-part times at 64k with A/B of the key-centric forward and dQ
# and of the partial-buffer budget, and the small-group rows of the training benchmark at two
# budgets. Logs and JSON go to $OUT as one tar (the device returns few files).
#   bash benchmarks/run_small_groups.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/small_groups; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -m pytest -q -x tests/test_triton.py -k "layouts or dkv" 2>&1 | tail -3 | tee $O/pytest.log
python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -6 | tee $O/gpu_check.log
P="python3 benchmarks/profile_parts.py --T 65536 --dk 128 --dv 128 --ops slc_fwd slc_bwd api_fwd api_fwd_bwd"
for g in "8 8" "8 4" "16 4"; do set -- $g
  $P --HQ $1 --H $2 --sweep selected_kc selected_kc_bwd selected_kc_mib --budget 100 2>&1 | tee $O/profile_HQ$1_H$2.log
done
for mib in 512 1024; do
  NSA_TUNE="{\"selected_kc_mib\": [$mib]}" python3 benchmarks/bench_train.py --settings G4 G1 --lengths 32768 65536 \
    --name train_small_groups_mib$mib 2>&1 | tee $O/bench_mib$mib.log
done
cp benchmarks/results/*small_groups* benchmarks/results/profile_T65536_HQ* $O/ 2>/dev/null
tar -C /tmp -cf ${OUT:-/tmp}/small_groups.tar small_groups
