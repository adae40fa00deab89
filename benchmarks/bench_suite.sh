#!/usr/bin/env bash
# How long the tests take (issue 40 item 4): the fast subset (pytest -m "not slow") and the full
# suite, one process each, then each with pytest-xdist on two workers (-n 2) when it is installed
# (it is in the test extra). Prints each command's wall time in minutes and its pytest summary;
# the full logs (with the 25 slowest tests of each) go to $TMPDIR/cilkit-suite-logs/. Run it on
# an otherwise idle machine (what README.md's figures were measured on: 2 cores), from anywhere:
#
#   bash benchmarks/bench_suite.sh            # fast, full, fast -n 2, full -n 2
#   bash benchmarks/bench_suite.sh --serial   # without the -n 2 runs
#   TESTS=tests/test_io.py bash benchmarks/bench_suite.sh   # a check of the script on a few tests
set -uo pipefail
cd "$(dirname "$0")/.."
tests=${TESTS:-tests}
logs=${TMPDIR:-/tmp}/cilkit-suite-logs
mkdir -p "$logs"

variants=("fast|-m|not slow" "full")
if [[ "${1:-}" != "--serial" ]]; then
  if python -c "import xdist" 2>/dev/null; then
    variants+=("fast-n2|-n|2|-m|not slow" "full-n2|-n|2")
  else
    echo "pytest-xdist is not installed (pip install -e \".[test]\"): the -n 2 runs are left out"
  fi
fi

echo "$(nproc) cores, $(python -c 'import torch; print("torch", torch.__version__)'), $(date -u +%FT%TZ)"
for v in "${variants[@]}"; do
  IFS='|' read -r -a parts <<< "$v"
  name=${parts[0]}
  args=("${parts[@]:1}")
  start=$(date +%s.%N)
  python -m pytest $tests "${args[@]}" -p no:cacheprovider --durations=25 > "$logs/$name.log" 2>&1
  code=$?
  end=$(date +%s.%N)
  minutes=$(python -c "print(f'{($end - $start) / 60:.1f}')")
  summary=$(grep -E "(passed|failed|error)" "$logs/$name.log" | tail -1)
  printf '%-8s %5s min  exit %s  python -m pytest %s %s  | %s\n' "$name" "$minutes" "$code" "$tests" "${args[*]@Q}" "$summary"
done
echo "logs: $logs"
