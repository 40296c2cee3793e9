#!/usr/bin/env bash
# Small query groups (G = 1, 4) in one device call: native tests of both selected-attention
# forwards, the bf16 check, per-part times at 64k with A/B and launch-shape sweeps of the
# key-centric forward, and the small-group rows of the training benchmark.
#   bash benchmarks/run_small_groups.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader
python3 -m pytest -q -x tests/test_triton.py -k "layouts or dkv" 2>&1 | tail -3 | tee $O/pytest.log
python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -25 | tee $O/gpu_check.log
python3 benchmarks/profile_parts.py --T 65536 --HQ 8 --H 8 --dk 128 --dv 128 \
  --sweep selected_kc selected_kc_shape selected_kc_mib --budget 200 2>&1 | tee $O/profile_G1.log
python3 benchmarks/profile_parts.py --T 65536 --HQ 16 --H 4 --dk 128 --dv 128 --ops slc_fwd api_fwd \
  --sweep selected_kc selected_kc_shape --budget 120 2>&1 | tee $O/profile_G4.log
python3 benchmarks/bench_train.py --settings G4 G1 --lengths 32768 65536 --name train_small_groups 2>&1 | tee $O/bench.log
