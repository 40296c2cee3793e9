#!/usr/bin/env bash
# The `small` preset on one GPU: train each attention kind given, then evaluate it.
#   bash benchmarks/train_small.sh "nsa full window" STEPS [BATCH] [SEQ] ["more nsa train options"]
# Metrics (JSONL), the progress log and the evaluation land in $OUT/small_<kind>/.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
OUT=${OUT:-runs}
STEPS=$2; BATCH=${3:-4}; SEQ=${4:-8192}; MORE=${5:-}
for a in $1; do
  d=$OUT/small_$a; mkdir -p $d
  python3 -m nsa.cli train --preset small --attention $a --steps $STEPS --batch-size $BATCH \
      --seq-len $SEQ --eval-every 100 --out $d $MORE 2>&1 | tee $d/train.log
  python3 -m nsa.cli eval $d/checkpoint.pt --lengths $((SEQ / 2)) $SEQ $((2 * SEQ)) 2>&1 | tee $d/eval.txt
  rm -f $d/checkpoint.pt   # 1.2 GB with the optimizer state: not brought back
done
