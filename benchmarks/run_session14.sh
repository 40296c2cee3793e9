#!/usr/bin/env bash
# Session 14 device calls (H200), small-group forward.
#   kc: the key-centric forward's pipelining (segment length, stages), G=1 and G=4 at 64k.
#   tune: more of the same (G=1, G=2, G=4), the forward merge's launch, the window forward's
#         tiles for small groups, the G=1 fused kernel's spread (tensor cores / stencil).
#   stream: the window branch on a second CUDA stream (tuning.window_stream): bf16 check, then
#        nsa_attention's forward at 64k with it off / from the start / after the selection (ran
#        with results/session14/patches/window_stream.diff applied; reverted with its knob).
#   f64: the selection's top list as fp64 keys (one fp64 comparison where int64 keys took two
#        32-bit ones): bf16 check, then the session's committed code (ab_old, carried) and
#        this tree in turn: selection kernels and nsa_attention's forward at 64k (ran with
#        results/session14/patches/fp64_keys.diff applied; reverted).
#   final: the session's final code: bf16 check (paper 4k/16k, small groups 8k); the training
#        benchmark at 16k-64k (paper both dims, G4, G1), fla-comparable against fla-core from the
#        carried wheels (.whl/) at 32k/64k; then the session's starting code (ab_old = 2d58c08's
#        nsa/, carried) and this code in turn, twice, G4/G1 at 64k (ab.log).
#   prefetch: the key-centric forward loading each tile's query rows a tile ahead: bf16 check,
#        then the committed code (ab_old, carried) and this tree in turn, twice: the selected
#        forward and nsa_attention's forward at 64k, G1 and G4.
#   ncu: Nsight Compute reports (full set) of the G=1 forward's fused kernel and key-centric
#        kernel, and of the G=4 selection kernel: details and per-SASS-line source pages as CSV.
source benchmarks/session_lib.sh s14
case "${1:-kc}" in
kc)
  timeout 200 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops slc_fwd --sweep selected_kc_pipe --budget 180 2>&1 | grep -v Warn | tee $O/kc_G1.log
  timeout 100 python3 benchmarks/profile_kernels.py --setting G1 --rows 16 2>&1 | grep -v Warn | tee $O/profile_G1.log
  timeout 200 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd --sweep selected_kc_pipe --budget 180 2>&1 | grep -v Warn | tee $O/kc_G4.log
  ;;
tune)
  which ncu nsys 2>&1 | tee $O/tools.txt; ls -d /usr/local/cuda*/bin 2>&1 | tee -a $O/tools.txt
  P="timeout 240 python3 benchmarks/profile_parts.py --dk 128 --budget 220"
  $P --HQ 8 --H 8 --ops slc_fwd win_fwd select cmp_select --sweep selected_kc_pipe2 selected_merge_launch banded_fwd_win select_spread 2>&1 | grep -v Warn | tee $O/tune_G1.log
  $P --HQ 16 --H 4 --ops slc_fwd win_fwd --sweep selected_kc_pipe2 selected_merge_launch banded_fwd_win 2>&1 | grep -v Warn | tee $O/tune_G4.log
  $P --HQ 8 --H 4 --ops slc_fwd --sweep selected_kc_pipe2 2>&1 | grep -v Warn | tee $O/tune_G2.log
  ;;
stream)
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  P="timeout 150 python3 benchmarks/profile_parts.py --ops api_fwd --sweep window_stream --budget 130"
  $P --HQ 8 --H 8 --dk 128 2>&1 | grep -v Warn | tee $O/stream_G1.log
  $P --HQ 16 --H 4 --dk 128 2>&1 | grep -v Warn | tee $O/stream_G4.log
  $P 2>&1 | grep -v Warn | tee $O/stream_paper.log
  ;;
f64)
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  ab_parts 2 "G1:--HQ 8 --H 8 --dk 128 --ops cmp_select select api_fwd" "G4:--HQ 16 --H 4 --dk 128 --ops select api_fwd"
  ab_parts 1 "paper:--ops select api_fwd"   # as run: inside the first round, after G4
  rm -f $O/*.json
  ;;
final)
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v WARN | tail -3
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 16384 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  timeout 300 python3 benchmarks/bench_train.py --lengths 16384 32768 65536 --settings paper G4 G1 2>&1 | grep -v Warn | tee $O/bench.log
  timeout 150 python3 benchmarks/bench_train.py --lengths 32768 65536 --settings fla-comparable --name fla 2>&1 | grep -v Warn | tee $O/fla.log
  (cd /tmp && PYTHONPATH="$OLDPWD/ab_old:$PYTHONPATH" python3 -c "import nsa; print('old:', nsa.__file__)") | tee $O/ab.log
  ab_bench 2 --lengths 65536 --settings G4 G1
  rm -f $O/gpu.txt
  ;;
prefetch)
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  ab_parts 2 "G1:--HQ 8 --H 8 --dk 128 --ops slc_fwd api_fwd" "G4:--HQ 16 --H 4 --dk 128 --ops slc_fwd api_fwd"
  rm -f $O/*.json
  ;;
ncu)
  NCU=/usr/local/cuda/bin/ncu
  prof() {  # name setting kernel-regex skip
    $NCU -k "regex:$3" --launch-skip $4 --launch-count 1 --set full --import-source no -f -o $O/$1 \
      python3 benchmarks/profile_kernels.py --setting $2 --plain 2 > $O/$1.run.log 2>&1
    $NCU -i $O/$1.ncu-rep --page details --csv > $O/$1_details.csv 2>&1
    $NCU -i $O/$1.ncu-rep --page source --csv --print-source sass > $O/$1_sass.csv 2>&1
    gzip -f $O/$1_sass.csv; rm -f $O/$1.ncu-rep; tail -2 $O/$1.run.log; rm -f $O/$1.run.log
  }
  prof fused G1 nsa_cmp_select 1
  prof kc G1 nsa_selected_fwd_kc 5
  prof select4 G4 nsa_select_kernel 1
  rm -f $O/gpu.txt; ls -la $O
  ;;
esac
