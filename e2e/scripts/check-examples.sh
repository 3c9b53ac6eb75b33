#!/usr/bin/env bash
# Checks every manifest in examples/ with a server-side dry run, as up.sh
# does: check-examples.sh KUBECTL KUBECONFIG.
# The warm example boots a disk from the nodes' image directories, which
# only a namespace a cluster admin labelled wrenn.dev/node-images=allowed
# may name (docs/security.md), so the check runs in such a namespace,
# made here and kept: the cluster is the caller's own.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 KUBECTL KUBECONFIG" >&2; exit 2; }
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
kubectl=$1 kubeconfig=$2
ns=wrenn-examples
k() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }
k get namespace "$ns" >/dev/null 2>&1 || k create namespace "$ns" >/dev/null
k label --overwrite namespace "$ns" wrenn.dev/node-images=allowed >/dev/null
# Just after a CRD is Established, a server-side apply of its kind can
# still answer ServiceUnavailable ("Resource kind ... not found. There can
# be a delay"); that alone is waited out, for 30 s at most.
for _ in $(seq 60); do
  if err=$(k apply --server-side --dry-run=server -n "$ns" -f "$root/examples/" 2>&1 >/dev/null); then
    echo "examples/ accepted by the API server (dry run in namespace $ns)"
    exit 0
  fi
  case $err in
    *ServiceUnavailable*) sleep 0.5 ;;
    *) echo "$err" >&2; exit 1 ;;
  esac
done
echo "$err" >&2
exit 1
