#!/usr/bin/env bash
# Session 14 device calls (H200), small-group forward.
#   kc: the key-centric forward's pipelining (segment length, stages), G=1 and G=4 at 64k.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=${OUT:-/tmp/s14}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
case "${1:-kc}" in
kc)
  timeout 200 python3 benchmarks/profile_parts.py --HQ 8 --H 8 --dk 128 --ops slc_fwd --sweep selected_kc_pipe --budget 180 2>&1 | grep -v Warn | tee $O/kc_G1.log
  timeout 100 python3 benchmarks/profile_kernels.py --setting G1 --rows 16 2>&1 | grep -v Warn | tee $O/profile_G1.log
  timeout 200 python3 benchmarks/profile_parts.py --HQ 16 --H 4 --dk 128 --ops slc_fwd --sweep selected_kc_pipe --budget 180 2>&1 | grep -v Warn | tee $O/kc_G4.log
  ;;
esac
