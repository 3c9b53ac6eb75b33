#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kubectl from the Go module proxy with the
# machine's Go and caches them outside the repo, keyed by version. A cached
# binary set is reused; a missing one is rebuilt. No release downloads: the
# k8s.io/kubernetes commands are built as go-kubernetes.sh says.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
# shellcheck source=go-kubernetes.sh
. "$here/go-kubernetes.sh"
export GOFLAGS=-buildvcs=false CGO_ENABLED=0

log() { printf '[control-plane] %s\n' "$*" >&2; }

build_etcd() {
  if [ -x "$ETCD_BIN_DIR/etcd" ]; then log "etcd $ETCD_VERSION cached in $ETCD_BIN_DIR"; return; fi
  log "building etcd $ETCD_VERSION"
  local w; w=$(mktemp -d); trap 'rm -rf "$w"' RETURN
  (cd "$w" && go mod init local/etcdbin >/dev/null 2>&1 \
    && go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" \
    && mkdir -p "$ETCD_BIN_DIR.tmp" \
    && go build -trimpath -ldflags "-s -w" -o "$ETCD_BIN_DIR.tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$ETCD_BIN_DIR"; mv "$ETCD_BIN_DIR.tmp" "$ETCD_BIN_DIR"
}

build_kube() {
  if [ -x "$K8S_BIN_DIR/kube-apiserver" ] && [ -x "$K8S_BIN_DIR/kubectl" ]; then
    log "kubernetes $KUBE_VERSION cached in $K8S_BIN_DIR"; return
  fi
  log "building kube-apiserver and kubectl $KUBE_VERSION (cold: 10-20 min on 2 cores)"
  build_kubernetes_cmds "$K8S_BIN_DIR" kube-apiserver kubectl
}

command -v go >/dev/null || { log "go is required (apt-get install golang or the machine's Go)"; exit 1; }
start=$(date +%s)
build_etcd
build_kube
log "ready in $(( $(date +%s) - start ))s: $ETCD_BIN_DIR/etcd $K8S_BIN_DIR/kube-apiserver $K8S_BIN_DIR/kubectl"
