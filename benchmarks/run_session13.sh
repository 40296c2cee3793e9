#!/usr/bin/env bash
# Session 13 device calls (H200), small-group forward.
#   probe: what the selection's top-n costs (probe_topn.py variants, G=1 and G=4, 64k), the
#          compression and window forwards alone, Triton's compare-and-swap source and TTGIR.
#   fused: the G = 1 compression + selection kernel (select.py): bf16 check, parts, launch sweep,
#          G1 64k rows with and without it (the launch knob and its sweep were then named
#          "cmp_select", which is now the on/off knob; the launch's is "cmp_select_launch").
#   index: the forward's inverse index by counting: bf16 check, old/new G4/G1 rows, profiles.
#   final: bf16 check and the training benchmark 16k-64k (paper, G4, G1, fla-comparable).
#   gate: the gated merge in the window kernel's epilogue: bf16 check, forward A/B at 64k (ran
#          with results/session13/patches/gate_epilogue.diff applied: its sweep and knob went
#          with it when it was reverted).
#   long:  the G = 1 fused kernel at 256k + 128k packed against the kernels it replaces.
#   stages: more launch shapes of the fused G = 1 kernel (1 stage, 2 warps).
#   dims:  the fused G = 1 kernel against the two it replaces at dk/dv 192/128, 128/256, 64/64.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=${OUT:-/tmp/s13}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
case "${1:-probe}" in
probe)
  for s in G1 G4; do
    timeout 100 python3 benchmarks/probe_topn.py --variant base --setting $s --branches 2>&1 | tail -3 | tee -a $O/probe.log
    for v in none sortonly i32; do
      timeout 100 python3 benchmarks/probe_topn.py --variant $v --setting $s 2>&1 | tail -3 | tee -a $O/probe.log
    done
  done
  ;;
fused)
  # the G = 1 compression + selection kernel: bf16 check; its parts and launch sweep; G1 rows
  # with it (default) and without (NSA_TUNE cmp_select 0), in turn, twice
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  timeout 150 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops cmp_fwd select cmp_select win_fwd api_fwd --sweep cmp_select_launch --budget 100 2>&1 | tee $O/parts_G1.log
  for r in 1 2; do
    for tune in '{"cmp_select": [0]}' ''; do
      NSA_TUNE="$tune" timeout 100 python3 benchmarks/bench_train.py --lengths 65536 --settings G1 --name "fused$r" 2>&1 | grep -E "nsa:|sdpa-flash:|vs sdpa" | sed "s/^/[${tune:-default}] /" | tee -a $O/bench.log
    done
  done
  ;;
index)
  # the forward's inverse index by counting (atomics) instead of a stable sort: bf16 check;
  # the session's starting commit (ab_old, carried) and this tree, G4/G1 64k rows, in turn, twice;
  # kernel profiles of the G1 / G4 forward
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  (cd /tmp && PYTHONPATH="$OLDPWD/ab_old:$PYTHONPATH" python3 -c "import nsa; print(nsa.__file__)") | tee $O/bench.log
  for r in 1 2; do
    PYTHONPATH="$PWD/ab_old:$PYTHONPATH" timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name "ab_old$r" 2>&1 | grep -E "nsa:|sdpa-flash:|vs sdpa" | sed "s/^/[old] /" | tee -a $O/bench.log
    timeout 150 python3 benchmarks/bench_train.py --lengths 65536 --settings G4 G1 --name "ab_new$r" 2>&1 | grep -E "nsa:|sdpa-flash:|vs sdpa" | sed "s/^/[new] /" | tee -a $O/bench.log
  done
  for s in G1 G4; do
    timeout 100 python3 benchmarks/profile_kernels.py --setting $s --rows 16 2>&1 | grep -v Warn | tee -a $O/profile_fwd.log
  done
  ;;
final)
  # the session's final code: bf16 check (paper 4k/16k, small groups 8k); the training
  # benchmark at 16k-64k (paper both dims, G4, G1), fla-comparable against fla-core from the
  # carried wheels (.whl/) at 32k/64k; JSON and plots
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v WARN | tail -3
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 16384 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  timeout 300 python3 benchmarks/bench_train.py --lengths 16384 32768 65536 --settings paper G4 G1 2>&1 | grep -v Warn | tee $O/bench.log
  timeout 150 python3 benchmarks/bench_train.py --lengths 32768 65536 --settings fla-comparable --name fla 2>&1 | grep -v Warn | tee $O/fla.log
  rm -f $O/gpu.txt   # 8 files come back at most; the JSONs hold the device
  ;;
gate)
  # the gated merge in the window kernel's epilogue: bf16 check; nsa_attention's forward with
  # it off / on, in turn, twice, at 64k for the paper shape, G4 and G1
  timeout 150 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -14 | tee $O/gpu_check.log
  timeout 120 python3 benchmarks/profile_parts.py --ops api_fwd --sweep gate_epilogue 2>&1 | grep -v Warn | tee $O/gate_paper.log
  timeout 100 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops api_fwd --sweep gate_epilogue 2>&1 | grep -v Warn | tee $O/gate_G4.log
  timeout 100 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops api_fwd --sweep gate_epilogue 2>&1 | grep -v Warn | tee $O/gate_G1.log
  ;;
long)
  # the G = 1 fused kernel at long packed lengths (int64 offsets) against the two kernels it
  # replaces, with dk 128 and 192 (two key tiles)
  timeout 100 python3 benchmarks/check_cmp_select.py --lengths 262144 131149 2>&1 | tee $O/check_long.log
  timeout 100 python3 benchmarks/check_cmp_select.py --lengths 262144 77 --dk 192 --H 2 2>&1 | tee -a $O/check_long.log
  ;;
stages)
  # the fused G = 1 kernel's launch: 1 stage, and 2 warps (in turn with the default, twice)
  timeout 150 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops cmp_select --sweep cmp_select_more --budget 120 2>&1 | grep -v Warn | tee $O/stages_G1.log
  rm -f $O/gpu.txt
  ;;
dims)
  # the fused G = 1 kernel at other head dims: compression + selection apart against fused
  timeout 100 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 192 --dv 128 --ops cmp_fwd select cmp_select 2>&1 | grep -v Warn | tee $O/dims.log
  timeout 100 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --dv 256 --ops cmp_fwd select cmp_select 2>&1 | grep -v Warn | tee -a $O/dims.log
  timeout 100 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 64 --dv 64 --ops cmp_fwd select cmp_select 2>&1 | grep -v Warn | tee -a $O/dims.log
  rm -f $O/gpu.txt $O/*.json
  ;;
esac
