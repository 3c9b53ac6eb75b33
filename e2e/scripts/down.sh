#!/usr/bin/env bash
# Stops what up.sh started and removes its state directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${WRENN_STATE:-$root/.wrenn}
# A wrenn-local still running deletes its capsules and stops its agent and
# operator on SIGTERM; give it the time that takes.
if pid=$(cat "$state/local/pid" 2>/dev/null) && kill -0 "$pid" 2>/dev/null \
   && grep -q wrenn-local "/proc/$pid/cmdline" 2>/dev/null; then
  kill -TERM "$pid"
  for _ in $(seq 120); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
fi
# Leftovers of a wrenn-local that was killed hard: the node namespace and veth.
ip netns del wrenn-node-l-node 2>/dev/null || true
ip link del wnh-l-node 2>/dev/null || true
# ... and the gateway's address.
ip link del wrenn-gw 2>/dev/null || true
ip netns del wrenn-gw-ns 2>/dev/null || true
"$root/e2e/scripts/control-plane.sh" stop "$state"
rm -rf "$state"
echo "stopped; removed $state"
