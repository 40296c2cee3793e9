#!/usr/bin/env bash
# Session 12 device calls (H200), small-group forward: the forced blocks in a band kernel.
#   band:  (run with results/session12/patches/forced_band.diff applied; its sweeps are gone
#          with it) bf16 check (paper 4k, small groups 8k); the G=4 / G=1 64k rows of the
#          session's starting commit (its nsa package in ab_old/, carried) and of this tree;
#          band on/off A/B and band tile sweep; kernel profiles of the G=1 / G=4 forward.
#   mib:   the key-centric partial budget (selected_kc_mib) 1024 / 2048 MiB: G4/G1 64k rows and a
#          G=4 sweep of the selected forward and backward.
#   merge: the key-centric merge / dQ-sum positions per program (one knob then), 4 / 16 / 32 / 64,
#          twice each.
#   final2: the merge's own tile: bf16 check (paper 4k, small groups 8k); old/new G4/G1 rows;
#          the merge-positions sweep at G=4.
#   fband: the forced blocks in the window kernel's launch (nsa_attention): bf16 check; G4/G1
#          rows with it off (NSA_TUNE selected_band 0) and on; kernel profiles of the forward.
#   index: the inverse index in two kernels around the sort: bf16 check; old/new G4/G1 rows;
#          kernel profiles of the G=1 / G=4 forward and forward+backward.
#   final: bf16 check (paper 4k/16k, small groups 8k); the 64k benchmark (paper, G=4, G=1)
#          with the previous commit's G4/G1 rows (ab_old) in the same call.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=${OUT:-/tmp/s12}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
old_rows() {
  (cd /tmp && PYTHONPATH="$OLDPWD/ab_old:$PYTHONPATH" python3 -c "import nsa; print(nsa.__file__)") | tee $O/bench_old.log
  PYTHONPATH="$PWD/ab_old:$PYTHONPATH" timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_old 2>&1 | tail -12 | tee -a $O/bench_old.log
}
case "${1:-band}" in
band)
  timeout 120 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  old_rows
  timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_new 2>&1 | tail -12 | tee $O/bench_new.log
  timeout 120 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd --sweep selected_band selected_band_shape --budget 80 2>&1 | tee $O/band_G4.log
  timeout 120 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops slc_fwd --sweep selected_band selected_band_shape --budget 80 2>&1 | tee $O/band_G1.log
  for s in G1 G4; do
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --rows 16 2>&1 | grep -v Warn | tee -a $O/profile_fwd.log
  done
  ;;
index)
  timeout 120 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  old_rows
  timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_new 2>&1 | tail -12 | tee $O/bench_new.log
  for s in G1 G4; do
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --rows 16 2>&1 | grep -v Warn | tee -a $O/profile_fwd.log
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --backward --rows 24 2>&1 | grep -v Warn | tee -a $O/profile_fwd_bwd.log
  done
  ;;
mib)
  for m in 1024 2048; do
    NSA_TUNE="{\"selected_kc_mib\": [$m]}" timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name mib$m 2>&1 | tail -12 | tee -a $O/bench_mib.log
  done
  timeout 150 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd slc_bwd --sweep selected_kc_mib --budget 100 2>&1 | tee $O/mib_G4.log
  ;;
merge)
  timeout 150 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd slc_bwd --sweep selected_kc_merge --budget 110 2>&1 | tee $O/merge_G4.log
  timeout 150 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops slc_fwd slc_bwd --sweep selected_kc_merge --budget 110 2>&1 | tee $O/merge_G1.log
  ;;
final2)
  timeout 120 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  old_rows
  timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name ab_new 2>&1 | tail -12 | tee $O/bench_new.log
  timeout 100 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd --sweep selected_merge --budget 40 2>&1 | tee $O/merge_G4.log
  ;;
fband)
  timeout 120 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  NSA_TUNE='{"selected_band": [0]}' timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name band_off 2>&1 | tail -12 | tee $O/bench_off.log
  timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name band_on 2>&1 | tail -12 | tee $O/bench_on.log
  for s in G1 G4; do
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --rows 12 2>&1 | grep -v Warn | tee -a $O/profile_fwd.log
  done
  ;;
final)
  timeout 300 python3 benchmarks/gpu_check.py --lengths 4096 16384 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  old_rows
  timeout 200 python3 benchmarks/bench_train.py --lengths 65536 --settings paper G4 G1 --name train64k 2>&1 | tail -24 | tee $O/bench.log
  ;;
esac
