#!/usr/bin/env bash
# Builds the chart tooling from the Go module proxy with the machine's Go and
# caches it outside the repo, keyed by version (like build-control-plane.sh):
#
#   helm                                       $HELM_BIN_DIR
#   kube-controller-manager, kube-scheduler    $K8S_CTRL_BIN_DIR (KUBE_VERSION, for tier C)
#   kwok + its standard Stage policies         $KWOK_BIN_DIR      (fake kubelets, tier C)
#
#   build-helm.sh            all three
#   build-helm.sh helm       helm only (tiers A: lint, template, dry-run, install)
#   build-helm.sh ctrl       kube-controller-manager and kube-scheduler only
#
# Each is built in its own throwaway module so that one's dependency bumps
# cannot shift what another is built with. helm v3 and kwok have no replace
# directives in their go.mod, so a plain require works; k8s.io/kubernetes
# needs the staging replaces (go-kubernetes.sh).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
# shellcheck source=go-kubernetes.sh
. "$here/go-kubernetes.sh"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

log() { printf '[chart-tools] %s\n' "$*" >&2; }

# Moves a finished build into place atomically: a half-built directory is
# never mistaken for a cached one.
publish() { rm -rf "$2"; mv "$1" "$2"; }

build_helm() {
  if [ -x "$HELM_BIN_DIR/helm" ]; then log "helm $HELM_VERSION cached in $HELM_BIN_DIR"; return; fi
  log "building helm $HELM_VERSION"
  local t0 w; t0=$(date +%s); w=$(mktemp -d); trap 'rm -rf "$w"' RETURN
  local v=helm.sh/helm/v3/internal/version
  (cd "$w" && go mod init local/helmbin >/dev/null 2>&1 \
    && go get -tool "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" \
    && rm -rf "$HELM_BIN_DIR.tmp" && mkdir -p "$HELM_BIN_DIR.tmp" \
    && go build -trimpath -ldflags "-s -w -X $v.version=$HELM_VERSION" \
         -o "$HELM_BIN_DIR.tmp/helm" helm.sh/helm/v3/cmd/helm)
  publish "$HELM_BIN_DIR.tmp" "$HELM_BIN_DIR"
  log "helm $HELM_VERSION built in $(( $(date +%s) - t0 ))s"
}

build_kube_ctrl() {
  if [ -x "$K8S_CTRL_BIN_DIR/kube-controller-manager" ] && [ -x "$K8S_CTRL_BIN_DIR/kube-scheduler" ]; then
    log "kube-controller-manager, kube-scheduler $KUBE_VERSION cached in $K8S_CTRL_BIN_DIR"; return
  fi
  log "building kube-controller-manager and kube-scheduler $KUBE_VERSION"
  local t0; t0=$(date +%s)
  build_kubernetes_cmds "$K8S_CTRL_BIN_DIR" kube-controller-manager kube-scheduler
  log "kube-controller-manager, kube-scheduler built in $(( $(date +%s) - t0 ))s"
}

build_kwok() {
  if [ -x "$KWOK_BIN_DIR/kwok" ] && [ -d "$KWOK_BIN_DIR/stages" ]; then
    log "kwok $KWOK_VERSION cached in $KWOK_BIN_DIR"; return
  fi
  log "building kwok $KWOK_VERSION"
  local t0 w dir; t0=$(date +%s); w=$(mktemp -d); trap 'rm -rf "$w"' RETURN
  (cd "$w" && go mod init local/kwokbin >/dev/null 2>&1 \
    && go get -tool "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" \
    && rm -rf "$KWOK_BIN_DIR.tmp" && mkdir -p "$KWOK_BIN_DIR.tmp/stages" \
    && go build -trimpath -ldflags "-s -w" -o "$KWOK_BIN_DIR.tmp/kwok" sigs.k8s.io/kwok/cmd/kwok)
  # kwok does nothing without Stage policies; the standard ones (node
  # initialize, heartbeat with a Lease; pod ready, complete, delete) ship in
  # the module.
  dir=$(cd "$w" && go list -m -f '{{.Dir}}' "sigs.k8s.io/kwok")
  local s
  for s in "$dir"/kustomize/stage/node/fast/*.yaml "$dir"/kustomize/stage/node/heartbeat-with-lease/*.yaml \
           "$dir"/kustomize/stage/pod/fast/*.yaml; do
    case $s in */kustomization.yaml) continue ;; esac
    cp "$s" "$KWOK_BIN_DIR.tmp/stages/"
  done
  chmod -R u+w "$KWOK_BIN_DIR.tmp"
  publish "$KWOK_BIN_DIR.tmp" "$KWOK_BIN_DIR"
  log "kwok $KWOK_VERSION built in $(( $(date +%s) - t0 ))s"
}

command -v go >/dev/null || { log "go is required (the machine's Go, >= 1.26)"; exit 1; }
start=$(date +%s)
case ${1:-all} in
  helm) build_helm ;;
  ctrl) build_kube_ctrl ;;
  all) build_helm; build_kube_ctrl; build_kwok ;;
  *) log "usage: $0 [helm|ctrl|all]"; exit 2 ;;
esac
log "ready in $(( $(date +%s) - start ))s"
