#!/usr/bin/env bash
# Session 8, device call 1: native tests after the key-centric refactor (6f620bd), the bf16
# check of small groups, the selection-kernel A/B (variants x launch shapes), and the G=4
# key-centric forward A/B after the single-sort change. One tar to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/call1; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $O/gpu.txt
python3 -m pytest -q -x tests/test_triton.py -k "layouts or dkv or select" 2>&1 | tail -3 | tee $O/pytest.log
python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -8 | tee $O/gpu_check.log
python3 benchmarks/experiments/ab_select.py --shapes G1 --variants base bf16x3 tf32_nosort skip bf16x3_skip 2>&1 | tee $O/ab_select_G1.log
python3 benchmarks/experiments/ab_select.py --shapes G4 paper --variants base bf16x3 2>&1 | tee $O/ab_select_G4_paper.log
python3 benchmarks/profile_parts.py --T 65536 --HQ 16 --H 4 --dk 128 --dv 128 --ops slc_fwd api_fwd \
  --sweep selected_kc selected_kc_shape --budget 150 2>&1 | tee $O/profile_G4.log
cp benchmarks/results/ab_select_* benchmarks/results/profile_T65536_HQ16* $O/ 2>/dev/null
tar -C /tmp -cf ${OUT:-/tmp}/call1.tar call1
