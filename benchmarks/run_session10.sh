#!/usr/bin/env bash
# Session 10 device call (H200): bf16 check of the fused backward and head passes, the A/B of
# the backward's memory work at 64k, the training benchmark at 64k. Files come back as one tar.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=/tmp/s10; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
timeout 120 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -12 | tee $O/gpu_check.log
timeout 200 python3 benchmarks/ab_fused.py 2>&1 | tee $O/ab.log
timeout 200 python3 benchmarks/bench_train.py --lengths 65536 --settings paper G4 G1 --name train64k 2>&1 | tee $O/bench.log
cp benchmarks/results/*_NVIDIA_H200.json $O/ 2>/dev/null
tar -C /tmp -cf ${OUT:-/tmp}/s10.tar s10
