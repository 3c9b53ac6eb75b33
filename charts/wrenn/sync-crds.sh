#!/usr/bin/env bash
# Copies the generated CRDs and admission policy (crds/*.yaml, written by
# `cargo run -p wrenn-crds --bin crdgen`) into the chart, byte for byte.
#   sync-crds.sh          copy
#   sync-crds.sh --check  exit 1, naming each file, when the chart's copy differs
set -euo pipefail
chart=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
src=$chart/../../crds dst=$chart/files/crds
check=0; [ "${1:-}" = --check ] && check=1
stale=0
for f in "$src"/*.yaml; do
  n=$(basename "$f")
  if [ $check = 1 ]; then
    cmp -s "$f" "$dst/$n" || { echo "charts/wrenn/files/crds/$n differs from crds/$n; run charts/wrenn/sync-crds.sh" >&2; stale=1; }
  else
    mkdir -p "$dst"; cp "$f" "$dst/$n"
  fi
done
for f in "$dst"/*.yaml; do
  [ -e "$f" ] || continue
  n=$(basename "$f")
  [ -e "$src/$n" ] && continue
  if [ $check = 1 ]; then echo "charts/wrenn/files/crds/$n has no source in crds/" >&2; stale=1; else rm "$f"; fi
done
exit $stale
