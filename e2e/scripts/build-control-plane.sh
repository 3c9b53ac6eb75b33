#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kubectl from the Go module proxy with the
# machine's Go and caches them outside the repo, keyed by version. A cached
# binary set is reused; a missing one is rebuilt. No release downloads: the
# k8s.io/kubernetes module is consumed through a throwaway module whose
# version-less replaces redirect every staging module (required at v0.0.0
# upstream) to its real v0.<minor>.<patch> tag.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
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
  local kv=$KUBE_VERSION sv="v0.${KUBE_VERSION#v1.}" w gomod
  w=$(mktemp -d); trap 'rm -rf "$w"' RETURN
  cd "$w"; go mod init local/k8sbins >/dev/null 2>&1
  gomod=$(go mod download -json "k8s.io/kubernetes@$kv" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  [ -f "$gomod" ] || { log "no go.mod for k8s.io/kubernetes@$kv"; exit 1; }
  local args=(-require="k8s.io/kubernetes@$kv") m
  # The staging set changes between minors, so it is read from the real go.mod.
  for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$gomod"); do
    args+=(-replace="$m=$m@$sv")
  done
  go mod edit "${args[@]}"
  local k=k8s.io/kubernetes/cmd
  go get -tool "$k/kube-apiserver@$kv" "$k/kubectl@$kv"
  local mi=${kv#v1.}; mi=${mi%%.*}
  local p=k8s.io/component-base/version c=k8s.io/client-go/pkg/version
  # Without these the server reports v0.0.0-master, which breaks version gates.
  local ldf="-s -w -X $p.gitVersion=$kv -X $p.gitMajor=1 -X $p.gitMinor=$mi -X $c.gitVersion=$kv -X $c.gitMajor=1 -X $c.gitMinor=$mi"
  mkdir -p "$K8S_BIN_DIR.tmp"
  go build -trimpath -ldflags "$ldf" -o "$K8S_BIN_DIR.tmp/" "$k/kube-apiserver" "$k/kubectl"
  rm -rf "$K8S_BIN_DIR"; mv "$K8S_BIN_DIR.tmp" "$K8S_BIN_DIR"
}

command -v go >/dev/null || { log "go is required (apt-get install golang or the machine's Go)"; exit 1; }
start=$(date +%s)
build_etcd
build_kube
log "ready in $(( $(date +%s) - start ))s: $ETCD_BIN_DIR/etcd $K8S_BIN_DIR/kube-apiserver $K8S_BIN_DIR/kubectl"
