#!/usr/bin/env bash
# Runs the vm tier (QEMU TCG guests) N times in a row and prints each run's
# pass/fail counts, optionally under an artificial CPU load it starts and
# stops itself. Builds once first; every run gets its own run directory,
# so each starts with a calibration boot (under the load, when there is one).
#
#   e2e/scripts/soak-vm-tier.sh [-n RUNS] [-l LOAD_PROCS] [-t TEST_BINARY]...
#
#   -n RUNS        runs (default 10)
#   -l LOAD_PROCS  busy-loop processes kept running during every run
#                  (default 0; e.g. the number of cores)
#   -e EVERY       with -l: load only every EVERY-th run (runs EVERY, 2*EVERY,
#                  ...), so one soak mixes quiet and loaded runs (default 1)
#   -t BINARY      only this vm-tier test binary (repeatable): agent_vm, gateway_vm,
#                  operator_vm, guest_boot (wrenn-e2e), vmm_qemu, warm_vm,
#                  isolation_vm, processes_vm (wrenn-node-agent); default all eight
#   -x             stop at the first failed run (default: run them all)
#
# Exits non-zero when any run failed. Logs go to $SOAK_LOG_DIR (default a
# new temp dir), one file per run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"

runs=10 load=0 every=1 stop_on_fail=0
bins=()
while getopts "n:l:e:t:x" opt; do
  case $opt in
    n) runs=$OPTARG ;;
    l) load=$OPTARG ;;
    e) every=$OPTARG ;;
    t) bins+=("$OPTARG") ;;
    x) stop_on_fail=1 ;;
    *) sed -n '2,22p' "$0"; exit 2 ;;
  esac
done
[ ${#bins[@]} -gt 0 ] || bins=(agent_vm operator_vm gateway_vm guest_boot vmm_qemu warm_vm isolation_vm processes_vm)

# --workspace, not -p: the features then resolve as for `cargo test
# --workspace`, so the soak reuses CI's build instead of compiling its own.
args=(--workspace)
for b in "${bins[@]}"; do
  case $b in
    agent_vm | operator_vm | gateway_vm | guest_boot | vmm_qemu | warm_vm | isolation_vm | processes_vm) args+=(--test "$b") ;;
    *) echo "unknown vm-tier test binary $b" >&2; exit 2 ;;
  esac
done

logs=${SOAK_LOG_DIR:-$(mktemp -d -t wrenn-soak.XXXXXX)}
mkdir -p "$logs"
# A skip is a failure here: a soak that skipped proved nothing.
export WRENN_REQUIRE_TIERS=${WRENN_REQUIRE_TIERS:-vm}

echo "==> building the vm tier (${bins[*]})"
cargo test --locked --no-run "${args[@]}" >"$logs/build.log" 2>&1 \
  || { tail -40 "$logs/build.log"; exit 1; }

# The load: busy loops, each bounded by `timeout` so none outlives a
# killed soak by more than its bound, and stopped by pid when we end.
load_pids=()
stop_load() {
  for p in "${load_pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${load_pids[@]}"; do wait "$p" 2>/dev/null || true; done
  load_pids=()
}
trap stop_load EXIT
start_load() {
  local i
  run_load=0
  [ $(($1 % every)) = 0 ] || return 0
  run_load=$load
  for ((i = 0; i < load; i++)); do
    timeout 6h sh -c 'while :; do :; done' &
    load_pids+=($!)
  done
}

total_pass=0 total_fail=0 green=0
summary=()
for ((run = 1; run <= runs; run++)); do
  start_load "$run"
  log=$logs/run-$run.log
  t0=$(date +%s)
  set +e
  WRENN_VM_RUN_DIR=$(mktemp -d -t wrenn-vm-run.XXXXXX) \
    cargo test --locked "${args[@]}" -- --nocapture >"$log" 2>&1
  rc=$?
  set -e
  stop_load
  secs=$(( $(date +%s) - t0 ))
  pass=$(grep -cE '^test .* \.\.\. ok$' "$log" || true)
  fail=$(grep -cE '^test .* \.\.\. FAILED$' "$log" || true)
  # A binary that failed to start or panicked outside a test counts too.
  [ "$rc" = 0 ] || [ "$fail" -gt 0 ] || fail=1
  total_pass=$((total_pass + pass)); total_fail=$((total_fail + fail))
  if [ "$fail" = 0 ]; then green=$((green + 1)); verdict=green; else verdict=RED; fi
  calib=$(grep -ho 'calibration boot: [0-9.]* s' "$log" | head -1 || true)
  line=$(printf 'run %2d/%d: %s  %d passed, %d failed  (%ss, load %d, %s)' \
    "$run" "$runs" "$verdict" "$pass" "$fail" "$secs" "$run_load" "${calib:-no calibration}")
  echo "$line"
  summary+=("$line")
  if [ "$fail" != 0 ]; then
    grep -E '^test .* \.\.\. FAILED$|panicked at' "$log" | head -20 | sed 's/^/    /'
    [ "$stop_on_fail" = 0 ] || break
  fi
done

echo
echo "soak: $green of $runs runs green (load $load every ${every}th run); logs in $logs"
echo "soak: ${total_pass} passed, ${total_fail} failed"
[ "$total_fail" = 0 ]
