#!/usr/bin/env bash
# The benchmark command: Wrenn's control plane next to agent-sandbox's, on
# one Go-built kube-apiserver, in one run; writes docs/benchmarks.md, its
# plots (docs/benchmarks/*.svg) and figures (docs/benchmarks.json).
#
#   e2e/scripts/bench.sh [--capsules N] [--sequential N] [--concurrency 1,50,200]
#                        [--agents N] [--profile release|dev] [--comparison-only]
#
# --capsules     objects per scenario with more than one in flight (200)
# --sequential   objects of the one-in-flight scenarios (30)
# --concurrency  objects in flight, one scenario each (1,50,200)
# --agents       Wrenn fake agents, and kwok nodes for the peer (4)
# --profile      cargo profile of the Wrenn side (release: `cargo bench`;
#                dev: `cargo test`, a quicker build and a slower operator)
# --comparison-only  leave out the benches beside the comparison: the node
#                agent's (journal, network, storage, images, supervisor), the
#                guest's (qemu: needs the guest image, else it says why) and
#                the footprints (operator_footprint, gateway)
#
# Steps: build (or find cached) etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok and agent-sandbox from the Go module proxy; run the
# benches beside the comparison; run every scenario (the bench
# binary starts the control plane, kwok and both controllers and stops them
# when it exits); then the short run that CI's ratio gate repeats, recorded
# as the gate's reference in the same JSON. Each scenario stops by itself.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
log() { printf '[bench] %s\n' "$*" >&2; }

profile=release extras=1 pass=()
while [ $# -gt 0 ]; do
  case $1 in
    --capsules|--sequential|--concurrency|--agents) pass+=("$1" "$2"); shift 2 ;;
    --profile) profile=$2; shift 2 ;;
    --comparison-only) extras=0; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) log "unknown argument $1"; exit 2 ;;
  esac
done
case $profile in
  release) run=(cargo bench --workspace --locked) ;;
  dev) run=(cargo test --workspace --locked) ;;
  *) log "--profile release|dev, not $profile"; exit 2 ;;
esac

t0=$(date +%s)
e2e/scripts/build-control-plane.sh
e2e/scripts/build-helm.sh all
e2e/scripts/build-agent-sandbox.sh

scratch=$(mktemp -d); trap 'rm -rf "$scratch"' EXIT
include=()
if [ "$extras" = 1 ]; then
  # The operator and gateway these start are built as the profile ships.
  [ "$profile" = release ] && export WRENN_E2E_RELEASE=1
  for b in journal network storage images supervisor qemu operator_footprint gateway; do
    log "bench $b ($profile)"
    if "${run[@]}" --bench "$b" >"$scratch/$b.out" 2>"$scratch/$b.err"; then
      include+=(--include "$b ($profile profile)=$scratch/$b.out")
    else
      log "bench $b failed; left out of the page:"; tail -5 "$scratch/$b.err" >&2
    fi
  done
  unset WRENN_E2E_RELEASE
fi

log "scenarios ($profile)"
"${run[@]}" --bench compare -- "${pass[@]}" "${include[@]}" --out docs
# The gate's reference is measured by the profile CI runs it with (dev).
log "ratio gate reference (dev, the short run CI repeats)"
cargo test --workspace --locked --bench compare -- --gate-record docs/benchmarks.json
log "done in $(( $(date +%s) - t0 ))s: docs/benchmarks.md"
