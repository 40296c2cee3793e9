# Sourced by the run_session*.sh device scripts (session 14 on): the shell set-up, $O (what comes
# back from the device), the GPU's name, and the old/new helpers (ab_old/: an earlier commit's
# nsa/, carried to the device).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
O=${OUT:-/tmp/$1}; mkdir -p $O
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $O/gpu.txt
ab_path() {  # old | new: the PYTHONPATH that imports that code's nsa
  [ $1 = old ] && echo "$PWD/ab_old:$PYTHONPATH" || echo "$PYTHONPATH"
}
ab_parts() {  # rounds, then "label:profile_parts args" ...: ab_old/ and this tree in turn
  local rounds=$1 r v spec; shift
  for r in $(seq $rounds); do
    for v in old new; do
      for spec in "$@"; do
        PYTHONPATH="$(ab_path $v)" timeout 120 python3 benchmarks/profile_parts.py --budget 60 ${spec#*:} 2>&1 | grep -E "ms$" | sed "s/^/[$v ${spec%%:*}] /" | tee -a $O/ab.log
      done
    done
  done
}
ab_bench() {  # rounds, then bench_train args: ab_old/ and this tree in turn, no results files
  local rounds=$1 r v; shift
  for r in $(seq $rounds); do
    for v in old new; do
      OUT= PYTHONPATH="$(ab_path $v)" timeout 100 python3 benchmarks/bench_train.py "$@" --name "ab_$v$r" 2>&1 | grep -E "nsa:|sdpa-flash:|vs sdpa" | sed "s/^/[$v] /" | tee -a $O/ab.log
    done
  done
}
