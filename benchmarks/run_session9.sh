#!/usr/bin/env bash
# Session 9 device calls (H200). Each step has its own time limit so that the tar comes back.
# Wheels for fla-core: `pip download --no-deps fla-core einops -d .whl`, then carry ".whl".
#   bash benchmarks/run_session9.sh bench   # fla-core from carried wheels (.whl/), the training
#                                           # benchmark at 16k-64k, fla-comparable at 32k/64k
#                                           # against fla-core, bf16 check of this commit
#   bash benchmarks/run_session9.sh train ARGS...   # the small NSA model (nsa train ARGS, chained
#                                           # over calls with --resume), then its evaluation
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
M=$1; O=/tmp/$M; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee $O/gpu.txt
if [ "$M" = bench ]; then
  python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v WARN | tail -3
  python3 -c "import fla, einops; print('fla', fla.__version__)" 2>&1 | tee $O/fla.txt
  timeout 240 python3 benchmarks/bench_train.py --lengths 16384 32768 65536 --settings paper G4 G1 2>&1 | tee $O/bench.log
  timeout 150 python3 benchmarks/bench_train.py --lengths 32768 65536 --settings fla-comparable --name fla 2>&1 | tee $O/fla.log
  cp benchmarks/results/train_* benchmarks/results/fla_* $O/ 2>/dev/null
  tar -C /tmp -cf ${OUT:-/tmp}/$M.tar $M
  timeout 110 python3 benchmarks/gpu_check.py --lengths 4096 --small-groups-at 8192 2>&1 | tail -8 | tee $O/gpu_check.log
elif [ "$M" = train ]; then
  shift
  R=runs/small_nsa; mkdir -p $R
  [ -f $R/checkpoint.pt ] && RES=--resume || RES=
  LIMIT=${LIMIT:-480}
  # the trainer stops in time to checkpoint (--time-limit); timeout is the backstop
  timeout $((LIMIT + 60)) python3 -m nsa.cli train --preset small --attention nsa --out $R $RES --time-limit $LIMIT "$@" 2>&1 | tail -c 200000 > $O/train_$(date +%s).log
  tail -c 400 $O/train_*.log
  cp $R/metrics.jsonl $O/ 2>/dev/null
  if [ -n "${EVAL:-}" ]; then
    timeout 150 python3 -m nsa.cli eval $R/checkpoint.pt --lengths $EVAL --samples 8 2>&1 | tee $O/eval.txt
    cp $R/*.png $O/ 2>/dev/null
  fi
fi
tar -C /tmp -cf ${OUT:-/tmp}/$M.tar $M
