# Versions of the Go-built test control plane. Sourced by the scripts beside it.
# Bumping one changes the cache key, so the next run rebuilds.
KUBE_VERSION=${KUBE_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
# Binaries live outside the repo, keyed by version, so clean clones reuse them.
WRENN_CACHE=${WRENN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}
K8S_BIN_DIR=${K8S_BIN_DIR:-$WRENN_CACHE/k8s-$KUBE_VERSION}
ETCD_BIN_DIR=${ETCD_BIN_DIR:-$WRENN_CACHE/etcd-$ETCD_VERSION}
