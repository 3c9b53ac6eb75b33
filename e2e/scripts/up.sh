#!/usr/bin/env bash
# Runs Wrenn locally on this machine: installs what is missing, starts a
# control plane (etcd + kube-apiserver built from Go modules) in .wrenn/,
# installs the CRDs and admission policy, checks examples/ against the API
# server, then starts a node agent (in a network namespace playing the
# node, QEMU backend), the operator, the gateway (subresources.wrenn.dev,
# behind an APIService; the API server runs with its front-proxy flags),
# and a capsule from the guest image, and runs `kubectl wrenn exec` in it.
# kubectl and kubectl-wrenn are linked into $state/bin. It stays up until
# Ctrl-C, which deletes the capsules and stops the agent, operator and
# gateway; `e2e/scripts/down.sh` stops the control plane.
# WRENN_LOCAL_ONCE=1 stops right after the exec (for scripts).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
state=${WRENN_STATE:-$root/.wrenn}
# The same build directory and settings as .ci/run: a machine that ran CI
# (or up.sh) once does not compile everything again.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${WRENN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}/target}
export CARGO_INCREMENTAL=0
step() { printf '\n==> %s\n' "$*" >&2; }
step "installing what is missing (tools, control plane)"
[ "${WRENN_SKIP_INSTALL:-}" = 1 ] || "$root/e2e/scripts/install-deps.sh"
step "starting the control plane in $state"
"$root/e2e/scripts/control-plane.sh" stop "$state" 2>/dev/null || true
# The front proxy: the API server forwards subresources.wrenn.dev to the gateway.
kubeconfig=$(WRENN_CP_FRONT_PROXY=1 "$root/e2e/scripts/control-plane.sh" start "$state")
kubectl=$("$root/e2e/scripts/control-plane.sh" kubectl-path)
k() { "$kubectl" --kubeconfig "$kubeconfig" "$@"; }

step "building the node agent, the operator, the gateway, kubectl-wrenn and wrenn-local in $CARGO_TARGET_DIR (a first build takes ~15 minutes; cargo shows its progress)"
# One build with the resolution the harness uses (`--workspace` plus the
# `gen` example, see e2e/src/agent.rs `cargo_build`): its own builds of
# the agent and operator then find everything done.
(cd "$root" && cargo build --locked --workspace \
    --bin wrenn-node-agent --bin wrenn-operator --bin wrenn-gateway --bin kubectl-wrenn \
    --bin wrenn-local --bin crdgen --example gen)
# kubectl finds plugins on PATH: both live in one directory the user adds.
mkdir -p "$state/bin"
ln -sf "$kubectl" "$state/bin/kubectl"
ln -sf "$CARGO_TARGET_DIR/debug/kubectl-wrenn" "$state/bin/kubectl-wrenn"
step "installing the CRDs"
"$CARGO_TARGET_DIR/debug/crdgen" --check --out "$root/crds"
k apply --server-side -f "$root/crds/"
k wait --for=condition=Established --timeout=60s crd/capsules.wrenn.dev crd/capsulesnapshots.wrenn.dev crd/capsuletemplates.wrenn.dev
until k get cap >/dev/null 2>&1; do sleep 0.2; done
# The examples name images from public registries; they are validated by
# the API server here, not run.
"$root/e2e/scripts/check-examples.sh" "$kubectl" "$kubeconfig"

cd "$root"
step "starting a node agent, the operator and a capsule"
target=$CARGO_TARGET_DIR
once=()
[ "${WRENN_LOCAL_ONCE:-}" = 1 ] && once=(--once)
exec "$target/debug/wrenn-local" --kubeconfig "$kubeconfig" --dir "$state/local" \
  --bin-dir "$state/bin" "${once[@]}"
