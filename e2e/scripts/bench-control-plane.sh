#!/usr/bin/env bash
# Benchmark: prints how long the control-plane build takes from cache (warm),
# and kube-apiserver start-to-ready over N starts (the first on a fresh data
# dir right after the binaries were read from disk). A cold build is timed
# with COLD=1, which builds into a scratch cache and removes it afterwards.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
n=${N:-5}
if [ "${COLD:-}" = 1 ]; then
  scratch=$(mktemp -d)
  t=$(date +%s)
  WRENN_CACHE=$scratch "$here/build-control-plane.sh" >/dev/null 2>&1
  echo "control-plane build, cold: $(( $(date +%s) - t ))s"
  rm -rf "$scratch"
fi
t=$(date +%s%N)
"$here/build-control-plane.sh" >/dev/null 2>&1
echo "control-plane build, warm (cached): $(( ($(date +%s%N) - t) / 1000000 ))ms"
times=()
for i in $(seq "$n"); do
  d=$(mktemp -d)
  "$here/control-plane.sh" start "$d" >/dev/null 2>&1
  times+=("$(cat "$d/start-ms")")
  "$here/control-plane.sh" stop "$d"
  rm -rf "$d"
done
printf 'kube-apiserver start-to-ready over %d starts (ms): %s\n' "$n" "${times[*]}"
printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {printf "  median %d ms, max %d ms\n", a[int((NR+1)/2)], a[NR]}'
