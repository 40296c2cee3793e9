#!/usr/bin/env bash
# Session 11 device calls (H200), small-group forward speed. Files come back as one tar.
#   probe: kernel profiles of the G=1 / G=4 forward at 64k, selection spread sweeps, bf16
#          check with the stencil spread forced.
#   ab:    bf16 check; the G=4 / G=1 64k benchmark rows at the previous commit (a copy of its
#          nsa package in ab_old/, carried) and at this tree (with the paper shape); kernel
#          profiles of this tree's forward and forward+backward.
#   kc:    merge / dQ-sum tile sweep at G=1 and G=4, kernel profiles, old-vs-new G4/G1 rows.
#   tiles: banded forward tile sweep at G=4 and G=1; key-centric shape sweep at G=4.
#   prof:  kernel profiles of this tree's G=1 / G=4 forward+backward.
#   final: bf16 check; the 64k benchmark (paper, G=4, G=1) with the previous commit's G4/G1
#          rows (ab_old) in the same call.
#   index: the inverse index's list starts by searchsorted instead of a scatter of counts:
#          G4/G1 rows of the previous commit (ab_old) and this tree; G=1 kernel profile.
#   check: bf16 check of this tree at 4k and 16k (paper) and small groups at 8k.
#   gate:  the fused backward scales dO by the gates in the kernels: bf16 check, the 64k
#          benchmark, then the previous commit's (ab_old) G4/G1 rows; logs straight to $OUT.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/s11; rm -rf $O; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
case "${1:-probe}" in
probe)
  for s in G1 G4; do
    timeout 120 python3 benchmarks/profile_kernels.py --setting $s --rows 16 2>&1 | tee -a $O/profile_fwd.log
  done
  timeout 150 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops select --sweep select --budget 120 2>&1 | tee $O/select_G1.log
  timeout 150 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops select --sweep select --budget 120 2>&1 | tee $O/select_G4.log
  timeout 150 python3 benchmarks/profile_parts.py --ops select --sweep select --budget 120 2>&1 | tee $O/select_paper.log
  NSA_TUNE='{"select_spread": [2]}' timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check_stencil.log
  ;;
ab)
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  (cd /tmp && PYTHONPATH="$OLDPWD/ab_old:$PYTHONPATH" python3 -c "import nsa; print(nsa.__file__)") | tee $O/bench_old.log
  PYTHONPATH="$PWD/ab_old:$PYTHONPATH" timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_old 2>&1 | tail -12 | tee -a $O/bench_old.log
  timeout 200 python3 benchmarks/bench_train.py --lengths 65536 --settings paper G4 G1 --name train64k 2>&1 | tail -24 | tee $O/bench.log
  for s in G1 G4; do
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s 2>&1 | grep -v Warn | tee -a $O/profile_fwd.log
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --backward --rows 20 2>&1 | grep -v Warn | tee -a $O/profile_fwd_bwd.log
  done
  ;;
kc)
  (cd /tmp && PYTHONPATH="$OLDPWD/ab_old:$PYTHONPATH" python3 -c "import nsa; print(nsa.__file__)") | tee $O/bench_old.log
  PYTHONPATH="$PWD/ab_old:$PYTHONPATH" timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_old 2>&1 | tail -12 | tee -a $O/bench_old.log
  timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_new 2>&1 | tail -12 | tee $O/bench_new.log
  timeout 150 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops slc_fwd slc_bwd --sweep selected_kc_shape --budget 110 2>&1 | tee $O/kc_G1.log
  timeout 150 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd slc_bwd --sweep selected_kc_shape --budget 110 2>&1 | tee $O/kc_G4.log
  for s in G1 G4; do
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --backward --rows 20 2>&1 | grep -v Warn | tee -a $O/profile_fwd_bwd.log
  done
  ;;
tiles)
  timeout 150 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops cmp_fwd win_fwd --sweep banded_fwd --budget 120 2>&1 | tee $O/banded_G4.log
  timeout 150 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops cmp_fwd win_fwd --sweep banded_fwd --budget 120 2>&1 | tee $O/banded_G1.log
  timeout 120 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd slc_bwd --sweep selected_kc_shape --budget 90 2>&1 | tee $O/kc_G4.log
  ;;
prof)
  for s in G1 G4; do
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --backward --rows 14 2>&1 | grep -v Warn | tee -a $O/profile_fwd_bwd.log
  done
  ;;
final)
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  (cd /tmp && PYTHONPATH="$OLDPWD/ab_old:$PYTHONPATH" python3 -c "import nsa; print(nsa.__file__)") | tee $O/bench_old.log
  PYTHONPATH="$PWD/ab_old:$PYTHONPATH" timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_old 2>&1 | tail -12 | tee -a $O/bench_old.log
  timeout 200 python3 benchmarks/bench_train.py --lengths 65536 --settings paper G4 G1 --name train64k 2>&1 | tail -24 | tee $O/bench.log
  ;;
index)
  (cd /tmp && PYTHONPATH="$OLDPWD/ab_old:$PYTHONPATH" python3 -c "import nsa; print(nsa.__file__)") | tee $O/bench_old.log
  PYTHONPATH="$PWD/ab_old:$PYTHONPATH" timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_old 2>&1 | tail -12 | tee -a $O/bench_old.log
  timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_new 2>&1 | tail -12 | tee $O/bench_new.log
  timeout 100 python3 benchmarks/profile_kernels.py --setting G1 --backward --rows 24 2>&1 | grep -v Warn | tee $O/profile_fwd_bwd.log
  ;;
check)
  timeout 300 python3 benchmarks/gpu_check.py --lengths 4096 16384 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  ;;
gate)
  D=${OUT:-/tmp}
  timeout 100 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $D/gpu_check.log
  timeout 130 python3 benchmarks/bench_train.py --lengths 65536 --settings paper G4 G1 --name train64k 2>&1 | tail -24 | tee $D/bench.log
  cp benchmarks/results/train64k_NVIDIA_H200.json $D/ 2>/dev/null
  PYTHONPATH="$PWD/ab_old:$PYTHONPATH" timeout 80 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_old 2>&1 | tail -12 | tee $D/bench_old.log
  ;;
esac
find benchmarks/results -maxdepth 1 -newer $O/gpu.txt -name "*_NVIDIA_H200.*" -exec cp {} $O/ \;
tar -C /tmp -cf ${OUT:-/tmp}/s11.tar s11
