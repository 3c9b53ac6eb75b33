# Sourced by build-control-plane.sh and build-helm.sh: builds commands of
# k8s.io/kubernetes $KUBE_VERSION from the Go module proxy. The module is
# consumed through a throwaway module whose version-less replaces redirect
# every staging module (required at v0.0.0 upstream) to its real
# v0.<minor>.<patch> tag; the staging set changes between minors, so it is
# read from the real go.mod.

# build_kubernetes_cmds OUT_DIR CMD... builds k8s.io/kubernetes/cmd/CMD for
# each CMD into OUT_DIR, published only once the whole set is built.
build_kubernetes_cmds() {
  local out=$1; shift
  local kv=$KUBE_VERSION sv="v0.${KUBE_VERSION#v1.}" w
  local k=k8s.io/kubernetes/cmd mi=${KUBE_VERSION#v1.} cmds=() tools=() c
  mi=${mi%%.*}
  for c in "$@"; do cmds+=("$k/$c"); tools+=("$k/$c@$kv"); done
  local p=k8s.io/component-base/version cv=k8s.io/client-go/pkg/version
  # Without these the server reports v0.0.0-master, which breaks version gates.
  local ldf="-s -w -X $p.gitVersion=$kv -X $p.gitMajor=1 -X $p.gitMinor=$mi -X $cv.gitVersion=$kv -X $cv.gitMajor=1 -X $cv.gitMinor=$mi"
  w=$(mktemp -d)
  if ! (
    set -euo pipefail
    cd "$w"
    go mod init local/k8scmds >/dev/null 2>&1
    gomod=$(go mod download -json "k8s.io/kubernetes@$kv" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    [ -f "$gomod" ] || { echo "no go.mod for k8s.io/kubernetes@$kv" >&2; exit 1; }
    args=(-require="k8s.io/kubernetes@$kv")
    for m in $(sed -n 's#^[[:space:]]*\(k8s\.io/[a-z0-9-]*\) => \./staging/.*#\1#p' "$gomod"); do
      args+=(-replace="$m=$m@$sv")
    done
    go mod edit "${args[@]}"
    go get -tool "${tools[@]}"
    rm -rf "$out.tmp"; mkdir -p "$out.tmp"
    go build -trimpath -ldflags "$ldf" -o "$out.tmp/" "${cmds[@]}"
  ); then
    rm -rf "$w"; return 1
  fi
  rm -rf "$w" "$out"; mv "$out.tmp" "$out"
}
