#!/usr/bin/env bash
# Session 15 device calls (H200).
#   bwd: the key-centric dK/dV kernel loading each tile's query rows a tile ahead (as the forward
#        does since session 14): bf16 check, then the committed code (ab_old, carried) and this
#        tree in turn, twice: the selected backward and nsa_attention's forward+backward at 64k,
#        G1 and G4; then the dK/dV kernel's launch and the key-centric forward's again, after the
#        prefetch (profile_parts sweeps selected_dkv_pipe, selected_kc_pipe3), G1 and G4.
#   dkv: the dK/dV kernel's launch per group size (segment length, stages), G1, G4 and the paper
#        shape, this tree; then G1 and G4 with the committed code (ab_old, carried).
#   g2: the same at G=2 (8/4), this tree.
#   cmpbwd: where the paper shape's forward+backward time goes (profile_kernels), and the banded
#        backward's launches (compression and window dK/dV, dQ) at the paper shape.
#   banded: the banded backward's new launches (dK/dV and dQ at 3 stages): bf16 check, then the
#        committed code (ab_old = 60622ab's nsa/, carried) and this tree in turn, twice: the
#        compression and window backward and nsa_attention's forward+backward, G1, G4, paper.
#   final2: the training benchmark again after the banded backward's launches (paper both dims,
#        G4, G1 at 16k-64k; fla-comparable not rerun).
#   abpaper: the paper shape (192/128, 64k) in the training benchmark, the committed code before
#        the banded launches (ab_old = 60622ab's nsa/, carried) and this tree in turn, twice.
#   check64k: the bf16 check at 64k: the paper shape and the small-group shapes.
#   final: this session's final code: the training benchmark at 16k-64k (paper both dims, G4,
#        G1), fla-comparable against fla-core from the carried wheels (.whl/) at 32k/64k; then
#        the session's starting code (ab_old) and this code in turn, twice, G4/G1 at 64k.
source benchmarks/session_lib.sh s15
case "${1:-bwd}" in
bwd)
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  ab_parts 2 "G1:--HQ 8 --H 8 --dk 128 --ops slc_bwd api_fwd_bwd" "G4:--HQ 16 --H 4 --dk 128 --ops slc_bwd api_fwd_bwd"
  P="timeout 150 python3 benchmarks/profile_parts.py --dk 128 --budget 125"
  $P --HQ 8 --H 8 --ops slc_bwd slc_fwd --sweep selected_dkv_pipe selected_kc_pipe3 2>&1 | grep -v Warn | tee $O/tune_G1.log
  $P --HQ 16 --H 4 --ops slc_bwd slc_fwd --sweep selected_dkv_pipe selected_kc_pipe3 2>&1 | grep -v Warn | tee $O/tune_G4.log
  rm -f $O/*.json
  ;;
dkv)
  for v in new old; do
    PP="$(ab_path $v)"
    P="timeout 150 python3 benchmarks/profile_parts.py --budget 130 --ops slc_bwd"
    PYTHONPATH="$PP" $P --HQ 8 --H 8 --dk 128 --sweep selected_dkv_g1 2>&1 | grep -v Warn | sed "s/^/[$v G1] /" | tee -a $O/dkv.log
    PYTHONPATH="$PP" $P --HQ 16 --H 4 --dk 128 --sweep selected_dkv_g4 2>&1 | grep -v Warn | sed "s/^/[$v G4] /" | tee -a $O/dkv.log
    [ $v = new ] && PYTHONPATH="$PP" $P --sweep selected_dkv_g16 2>&1 | grep -v Warn | sed "s/^/[$v paper] /" | tee -a $O/dkv.log
  done
  rm -f $O/*.json
  ;;
g2)
  timeout 150 python3 benchmarks/profile_parts.py --budget 130 --ops slc_bwd --HQ 8 --H 4 --dk 128 --sweep selected_dkv_g2 2>&1 | grep -v Warn | tee $O/dkv_G2.log
  rm -f $O/*.json
  ;;
cmpbwd)
  timeout 100 python3 benchmarks/profile_kernels.py --setting paper --dk 192 --backward --rows 16 2>&1 | grep -v Warn | tee $O/profile_paper.log
  timeout 360 python3 benchmarks/profile_parts.py --budget 330 --ops cmp_bwd win_bwd --sweep banded_dkv2 banded_dq2 2>&1 | grep -v Warn | tee $O/banded_bwd.log
  rm -f $O/*.json
  ;;
banded)
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  ab_parts 2 "G1:--HQ 8 --H 8 --dk 128 --ops cmp_bwd win_bwd api_fwd_bwd" "G4:--HQ 16 --H 4 --dk 128 --ops cmp_bwd win_bwd api_fwd_bwd" "paper:--ops cmp_bwd win_bwd api_fwd_bwd"
  rm -f $O/*.json
  ;;
final2)
  timeout 380 python3 benchmarks/bench_train.py --lengths 16384 32768 65536 --settings paper G4 G1 2>&1 | grep -v Warn | tee $O/bench.log
  rm -f $O/gpu.txt
  ;;
abpaper)
  ab_bench 2 --quick --lengths 65536 --settings paper   # as run: 80 s a run, cuDNN's ratio lines left out
  rm -f $O/gpu.txt
  ;;
check64k)
  timeout 590 python3 benchmarks/gpu_check.py --lengths 65536 --small-groups-at 65536 2>&1 | grep -v Warn | tail -14 | tee $O/gpu_check.log
  ;;
final)
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v WARN | tail -3
  timeout 330 python3 benchmarks/bench_train.py --lengths 16384 32768 65536 --settings paper G4 G1 2>&1 | grep -v Warn | tee $O/bench.log
  timeout 150 python3 benchmarks/bench_train.py --lengths 32768 65536 --settings fla-comparable --name fla 2>&1 | grep -v Warn | tee $O/fla.log
  ab_bench 2 --lengths 65536 --settings G4 G1
  rm -f $O/gpu.txt
  ;;
esac
