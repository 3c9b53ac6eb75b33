#!/usr/bin/env bash
# The test command: lints, generated-file diff, every test of the workspace,
# then a per-tier summary saying which tiers ran and which skipped, and why.
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

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "generated files are current"
cargo run -q --locked -p wrenn-crds --bin crdgen -- --check
cargo run -q --locked -p wrenn-proto --example gen -- --check
# The chart's CRD copy (charts/wrenn/files/crds) equals crdgen's output.
charts/wrenn/sync-crds.sh --check

step "cargo test --workspace"
report=$(mktemp); log=$(mktemp)
trap 'rm -f "$report" "$log"' EXIT
export WRENN_TIER_REPORT=$report
set +e
cargo test --workspace --locked --no-fail-fast 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e

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
echo "test.sh finished in $(( $(date +%s) - t0 ))s"
exit "$rc"
