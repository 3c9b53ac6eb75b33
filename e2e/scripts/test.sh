#!/usr/bin/env bash
# The test command: lints, generated-file diff, every test of the workspace,
# the benchmark ratio gate, the README's `up.sh` once (where the vm tier
# ran), then a per-tier summary saying which tiers ran and which skipped,
# and why.
# A tier listed in WRENN_REQUIRE_TIERS (CI: unit,host,cluster) fails the run
# instead of skipping.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
[ "${WRENN_SKIP_INSTALL:-}" = 1 ] || "$root/e2e/scripts/install-deps.sh"

step() { printf '\n==> %s\n' "$*"; }
t0=$(date +%s)

step "cargo fmt --check"
cargo fmt --all --check

step "docs/architecture.md names only paths that exist"
# Tokens in backticks whose first component is a top-level directory of
# the repository are paths; each must exist, so the page cannot drift.
missing=0
while read -r p; do
  [ -d "${p%%/*}" ] || continue
  [ -e "$p" ] || { echo "docs/architecture.md names $p, which does not exist"; missing=1; }
done < <(grep -o '`[^`]*`' docs/architecture.md | tr -d '`' | grep -E '^[a-z][a-zA-Z0-9_.-]*/[a-zA-Z0-9_./-]*$')
[ "$missing" = 0 ]

step "structure: no import cycle, no file over 700 lines without its reason"
# Issue 15's shape, kept: e2e/scripts/audit.py explains the rules.
python3 e2e/scripts/audit.py --check > /dev/null || python3 e2e/scripts/audit.py --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

# One build of every test target first: the generated-file checks and the
# vm tier's agent and operator binaries (e2e/src/agent.rs cargo_build) then
# reuse its artifacts instead of compiling their own.
step "cargo test --workspace --no-run"
cargo test --workspace --locked --no-run

step "generated files are current"
# --workspace plus an example (a target that needs dev-dependencies) resolves
# features as the test build did; `cargo run -p wrenn-crds` alone resolved
# fewer and compiled kube, k8s-openapi and their dependencies a second time.
cargo build -q --locked --workspace --bin crdgen --example gen
target_dir=${CARGO_TARGET_DIR:-$root/target}
# Paths given: one target directory serves several clones, and a binary
# built in another clone would read that clone's files.
"$target_dir/debug/crdgen" --check --out "$root/crds"
"$target_dir/debug/examples/gen" --check --root "$root/proto"
# The chart's CRD copy (charts/wrenn/files/crds) equals crdgen's output.
charts/wrenn/sync-crds.sh --check

step "cargo test --workspace"
report=$(mktemp); log=$(mktemp)
# The vm tier calibrates its boot budget once per run (wrenn_testkit::vm).
WRENN_VM_RUN_DIR=$(mktemp -d -t wrenn-vm-run.XXXXXX)
export WRENN_VM_RUN_DIR
trap 'rm -rf "$report" "$log" "$WRENN_VM_RUN_DIR"' EXIT
export WRENN_TIER_REPORT=$report
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

step "benchmark ratio gate: Wrenn vs agent-sandbox, short interleaved rounds"
# Ratios only, medians of rounds that alternate the two systems, against
# docs/benchmarks.json (docs/benchmarks.md, "Regression gate"). The peer is
# built from the Go module proxy once and cached like the control plane.
# Built with --tests beside the bench: `--bench compare` alone would leave
# the other crates' dev-dependencies out of feature resolution and compile
# dozens of dependencies again with other features; with --tests it reuses
# the test build above and compiles only the bench.
set +e
gate_exe=$(cargo test --workspace --locked --no-run --tests --bench compare --message-format=json \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "compare" and m.get("executable"):
        print(m["executable"])')
e2e/scripts/build-agent-sandbox.sh && [ -n "$gate_exe" ] \
  && "$gate_exe" --gate docs/benchmarks.json
gate_rc=$?
set -e
[ "$gate_rc" = 0 ] || rc=$gate_rc

step "the README's first command: e2e/scripts/up.sh, once"
# The local run CI does not otherwise reach: control plane, agent, operator,
# gateway, a capsule booted under QEMU, and `kubectl wrenn exec` into it.
# It needs what the vm tier needs, so it runs only where that tier ran, and
# only when no local run of the user's holds its fixed names.
if ! awk -F'\t' '$1 == "vm" && $2 == "ran" { found = 1 } END { exit !found }' "$report"; then
  echo "skipped because: the vm tier did not run here (its reasons are in the summary below)"
elif ip netns list 2>/dev/null | grep -qw wrenn-node-l-node; then
  echo "skipped because: a local run (up.sh) is already up on this machine"
else
  up_state=$(mktemp -d -t wrenn-up.XXXXXX)
  up_t0=$(date +%s)
  set +e
  WRENN_STATE=$up_state WRENN_SKIP_INSTALL=1 WRENN_LOCAL_ONCE=1 \
    timeout 600 "$root/e2e/scripts/up.sh" >"$up_state.log" 2>&1
  up_rc=$?
  WRENN_STATE=$up_state "$root/e2e/scripts/down.sh" >>"$up_state.log" 2>&1
  set -e
  if [ "$up_rc" = 0 ] && grep -q "^Linux hello " "$up_state.log"; then
    echo "up.sh: hello ran uname through the gateway in $(( $(date +%s) - up_t0 ))s"
  else
    echo "up.sh failed (exit $up_rc); the end of its output:"
    tail -40 "$up_state.log"
    rc=1
  fi
  rm -f "$up_state.log"
fi

step "test tiers"
python3 - "$report" "$log" <<'PY'
import collections, re, sys
report, log = sys.argv[1], sys.argv[2]
tiers = collections.OrderedDict((t, collections.Counter()) for t in ["unit", "host", "cluster", "vm", "kvm"])
reasons = collections.defaultdict(set)
for line in open(report, encoding="utf-8", errors="replace"):
    parts = line.rstrip("\n").split("\t")
    if len(parts) < 4: continue
    tier, outcome, name, reason = parts[:4]
    tiers.setdefault(tier, collections.Counter())[outcome] += 1
    if outcome == "skipped": reasons[tier].add(reason)
passed = failed = ignored = 0
for m in re.finditer(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", open(log, errors="replace").read()):
    passed += int(m.group(1)); failed += int(m.group(2)); ignored += int(m.group(3))
recorded = sum(c["ran"] + c["failed"] + c["skipped"] for c in tiers.values())
tiers["unit"]["ran"] += max(0, passed + failed - recorded)
for tier, c in tiers.items():
    ran, sk, fl = c["ran"], c["skipped"], c["failed"]
    if ran + sk + fl == 0:
        state = "NO TESTS"
    elif ran + fl == 0:
        state = "SKIPPED ENTIRELY"
    elif sk:
        state = "ran, some skipped"
    else:
        state = "ran"
    print(f"  {tier:8} {state:18} ran={ran} failed={fl} skipped={sk}")
    for r in sorted(reasons[tier]):
        print(f"           skipped because: {r}")
# A skipped case returns normally, so cargo counts it as passed.
skipped = sum(c["skipped"] for c in tiers.values())
print(f"{passed - skipped} passed, {failed} failed, {skipped} skipped, {ignored} ignored")
PY
if [ -f "$WRENN_VM_RUN_DIR/boot-calibration" ]; then
  echo "vm tier: calibration boot took $(cat "$WRENN_VM_RUN_DIR/boot-calibration") s; guest readiness budgets scale from it"
fi
echo "test.sh finished in $(( $(date +%s) - t0 ))s"
exit "$rc"
