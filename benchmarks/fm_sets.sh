# Resumable 5-seed run sets on the Fashion-MNIST protocols, sourced by the benchmarks/fm_*.sh
# drivers. `run_set OUT NAME CONFIG [cilkit run args...]` runs CONFIG with 5 seeds, two runs at a
# time with one thread each, into OUT/NAME; a finished set (summary.json) is kept, an unfinished
# one resumed with --resume (which takes no other argument: the set's arguments are in its
# config.yaml).
run_set() {
  local name=$2 out=$1/$2 cfg=$3
  shift 3
  if [ -f "$out/summary.json" ]; then
    return 0
  elif [ -d "$out" ]; then
    python -m cilkit run --resume "$out" --jobs 2 >> "$out.log" 2>&1
  else
    mkdir -p "$(dirname "$out")"
    python -m cilkit run "$cfg" --set runs=5 --set threads=1 "$@" --jobs 2 --out "$out" > "$out.log" 2>&1
  fi
  echo "$name: exit $?"
}
