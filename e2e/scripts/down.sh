#!/usr/bin/env bash
# Stops what up.sh started and removes its state directory.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${WRENN_STATE:-$root/.wrenn}
"$root/e2e/scripts/control-plane.sh" stop "$state"
rm -rf "$state"
echo "stopped; removed $state"
