#!/usr/bin/env bash
# Session 16 device calls (H200).
#   wide: the bf16 check with dk = dv = 256 (G=4, the paper's 64/4, G=1: the launch shapes
#        fitted to shared memory in session 15, never run on a GPU), the fp16 check (never run on
#        a GPU before), then the banded kernels' launches at 256/256 (32k, paper heads).
#   sel256: the selected backward's launches at 256/256 (dK/dV kernel: rows, segment, warps,
#        stages; the group-centric dQ: warps, stages), 32k, paper heads; the banded backward with
#        its 256/256 defaults from `wide`.
#   w8: the selected dK/dV kernel at 8 warps (as it now runs at 256/256) at 64k: paper 192/128,
#        G=4 and G=1 at 128/128.
#   final: the training benchmark at 256/256 (paper heads, 32k and 64k, against FA2 and cuDNN).
#   long: gpu_check --long: the paper shape (192/128 and 256/256) and G=1 at 262221 tokens (q, o past 2**31
#        elements at the paper shape), the kernels' output and gradients at ten positions against
#        reference.nsa_at_positions in float64.
#   gc: the group-centric selected forward's and dQ's (warps, stages) at the paper shape, 64k.
#   fwd256: the group-centric selected forward's warps at 256/256 (paper heads), 32k and 64k.
#   final2: after the 256/256 forward and reduce launches: the bf16 check and the 256/256 benchmark again.
#   small256: G=4 and G=1 at 256/256, 64k: the wide launches (timed at paper heads) against the
#        narrow dims', in turn, twice (selected dK/dV, banded dK/dV and dQ).
#   fla: the bf16 check again (256/256 launches changed after `wide`), fla-comparable against fla-core from the carried wheels (.whl/) after session 15's
#        banded backward launches.
source benchmarks/session_lib.sh s16
check() {  # log name, time limit, then gpu_check.py args: its result lines only
  local log=$1 limit=$2; shift 2
  timeout $limit python3 benchmarks/gpu_check.py "$@" 2>&1 | grep -E "^T=|ALL|FAIL|Error|error|memory" | tee $O/$log
}
WIDE="--lengths 4096 --small-groups-at 8192 --wide 8192,16,4 4096,64,4 8192,8,8"
case "${1:-wide}" in
wide)
  check gpu_check.log 200 $WIDE
  check gpu_check_fp16.log 150 --dtype float16 --name gpu_check_fp16 --lengths 4096 --small-groups-at 8192 --wide 8192,16,4
  timeout 200 python3 benchmarks/profile_parts.py --T 32768 --dk 256 --dv 256 --budget 180 --ops cmp_fwd cmp_bwd win_fwd win_bwd select slc_fwd slc_bwd --sweep banded_fwd256 banded_dq256 banded_dkv256 2>&1 | grep -v Warn | tee $O/banded256.log
  rm -f $O/profile*.json
  ;;
sel256)
  timeout 250 python3 benchmarks/profile_parts.py --T 32768 --dk 256 --dv 256 --budget 230 --ops cmp_bwd win_bwd slc_bwd --sweep selected_dkv256 selected_dq256 2>&1 | grep -v Warn | tee $O/selected256.log
  rm -f $O/profile*.json
  ;;
w8)
  P="timeout 120 python3 benchmarks/profile_parts.py --budget 100 --ops slc_bwd"
  $P --sweep selected_dkv_w8 2>&1 | grep -v Warn | tee $O/w8_paper.log
  $P --HQ 16 --H 4 --dk 128 --sweep selected_dkv_w8 2>&1 | grep -v Warn | tee $O/w8_G4.log
  $P --HQ 8 --H 8 --dk 128 --sweep selected_dkv_w8g1 2>&1 | grep -v Warn | tee $O/w8_G1.log
  rm -f $O/profile*.json
  ;;
final)
  timeout 250 python3 benchmarks/bench_train.py --lengths 32768 65536 --settings paper --dims 256/256 --name train256 2>&1 | grep -v Warn | tee $O/bench256.log
  rm -f $O/gpu.txt
  ;;
long)   # sequences past 2**31 elements (int64 offsets), checked at some positions (gpu_check --long)
  check gpu_check_long.log 500 --lengths --small-groups-at 0 --wide --long 262221,64,4,192,128 262221,8,8,128,128 262221,64,4,256,256 --name gpu_check_long
  ;;
gc)   # the group-centric selected kernels' (warps, stages) at the paper shape on the H200 (chosen on the H100)
  timeout 200 python3 benchmarks/profile_parts.py --budget 180 --ops slc_fwd slc_bwd --sweep selected_fwd selected_dq 2>&1 | grep -v Warn | tee $O/gc_paper.log
  rm -f $O/profile*.json
  ;;
fwd256)   # the group-centric selected forward's warps at 256/256 (ptxas: 2 warps spill, 4 do not), 32k and 64k
  P="timeout 150 python3 benchmarks/profile_parts.py --budget 120 --dk 256 --dv 256 --ops slc_fwd slc_bwd --sweep selected_fwd256"
  $P --T 32768 2>&1 | grep -v Warn | tee $O/fwd256.log
  $P --T 65536 2>&1 | grep -v Warn | tee -a $O/fwd256.log
  rm -f $O/profile*.json
  ;;
final2)   # after the wide forward / reduce launches: the bf16 check (256/256 cases) and the 256/256 benchmark again
  check gpu_check.log 200 $WIDE
  timeout 250 python3 benchmarks/bench_train.py --lengths 32768 65536 --settings paper --dims 256/256 --name train256 2>&1 | grep -v Warn | tee $O/bench256.log
  rm -f $O/gpu.txt
  ;;
small256)   # G=4 and G=1 at 256/256, 64k: the wide launches against the narrow dims', twice in turn
  P="timeout 200 python3 benchmarks/profile_parts.py --budget 170 --dk 256 --dv 256 --ops cmp_bwd win_bwd slc_bwd"
  $P --HQ 16 --H 4 --sweep selected_dkv_s256 banded_dkv_s256 banded_dq_s256 2>&1 | grep -v Warn | tee $O/G4.log
  $P --HQ 8 --H 8 --sweep selected_dkv_s256g1 banded_dkv_s256 banded_dq_s256 2>&1 | grep -v Warn | tee $O/G1.log
  rm -f $O/profile*.json
  ;;
fla)   # carry .whl (gitignored); first the bf16 check at 256/256 again, after the wide launches changed
  check gpu_check.log 200 $WIDE
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v WARN | tail -3
  timeout 150 python3 benchmarks/bench_train.py --lengths 32768 65536 --settings fla-comparable --name fla 2>&1 | grep -v Warn | tee $O/fla.log
  rm -f $O/gpu.txt
  ;;
esac
