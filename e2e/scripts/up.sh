#!/usr/bin/env bash
# Runs Wrenn locally on this machine: installs what is missing, starts a
# control plane (etcd + kube-apiserver built from Go modules) in .wrenn/,
# installs the CRDs and admission policy, applies examples/ and prints how
# to look at them. Stop it with `e2e/scripts/down.sh`.
#
# Operator, node agent and capsules join this script as they land (see README).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${WRENN_STATE:-$root/.wrenn}
[ "${WRENN_SKIP_INSTALL:-}" = 1 ] || "$root/e2e/scripts/install-deps.sh"
"$root/e2e/scripts/control-plane.sh" stop "$state" 2>/dev/null || true
kubeconfig=$("$root/e2e/scripts/control-plane.sh" start "$state")
kubectl=$("$root/e2e/scripts/control-plane.sh" kubectl-path)
k() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }

(cd "$root" && cargo run -q -p wrenn-crds --bin crdgen -- --check)
k apply --server-side -f "$root/crds/"
k wait --for=condition=Established --timeout=60s crd/capsules.wrenn.dev crd/capsulesnapshots.wrenn.dev crd/capsuletemplates.wrenn.dev
until k get cap >/dev/null 2>&1; do sleep 0.2; done
k apply --server-side -f "$root/examples/"

cat <<MSG

Wrenn's API is up (control plane in $state). Try:

  export KUBECONFIG=$kubeconfig
  alias kubectl=$kubectl
  kubectl get wrenn                       # every Capsule, CapsuleSnapshot, CapsuleTemplate
  kubectl get cap -o wide                 # phase, node, IP, vCPUs, memory
  kubectl explain capsule.spec --recursive
  kubectl apply -f - <<'EOF'              # refused: vcpus is 1..64
  {"apiVersion":"wrenn.dev/v1alpha1","kind":"Capsule","metadata":{"name":"big"},
   "spec":{"source":{"templateRef":{"name":"python"}},"resources":{"vcpus":128}}}
  EOF

Capsules stay without status until the operator and a node agent run
(issues 3-6). Stop with: e2e/scripts/down.sh
MSG
