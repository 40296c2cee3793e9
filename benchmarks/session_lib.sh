# Sourced by the run_session*.sh device scripts (session 14 on): the shell set-up, $O (what comes
# back from the device), the GPU's name, and ab_parts.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=${OUT:-/tmp/$1}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
ab_parts() {  # rounds, then "label:profile_parts args" ...: the carried ab_old/ code and this tree in turn
  local rounds=$1 r v spec PP; shift
  for r in $(seq $rounds); do
    for v in old new; do
      [ $v = old ] && PP="$PWD/ab_old:$PYTHONPATH" || PP="$PYTHONPATH"
      for spec in "$@"; do
        PYTHONPATH="$PP" timeout 120 python3 benchmarks/profile_parts.py --budget 60 ${spec#*:} 2>&1 | grep -E "ms$" | sed "s/^/[$v ${spec%%:*}] /" | tee -a $O/ab.log
      done
    done
  done
}
