# Versions of the Go-built test control plane. Sourced by the scripts beside it.
# Bumping one changes the cache key, so the next run rebuilds.
KUBE_VERSION=${KUBE_VERSION:-v1.36.3}
ETCD_VERSION=${ETCD_VERSION:-v3.6.16}
# Binaries live outside the repo, keyed by version, so clean clones reuse them.
WRENN_CACHE=${WRENN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}
K8S_BIN_DIR=${K8S_BIN_DIR:-$WRENN_CACHE/k8s-$KUBE_VERSION}
ETCD_BIN_DIR=${ETCD_BIN_DIR:-$WRENN_CACHE/etcd-$ETCD_VERSION}
# Chart tooling (build-helm.sh): helm, and for tier C kube-controller-manager,
# kube-scheduler (same KUBE_VERSION as the API server) and kwok fake kubelets.
HELM_VERSION=${HELM_VERSION:-v3.22.0}
KWOK_VERSION=${KWOK_VERSION:-v0.8.0}
HELM_BIN_DIR=${HELM_BIN_DIR:-$WRENN_CACHE/helm-$HELM_VERSION}
KWOK_BIN_DIR=${KWOK_BIN_DIR:-$WRENN_CACHE/kwok-$KWOK_VERSION}
K8S_CTRL_BIN_DIR=${K8S_CTRL_BIN_DIR:-$WRENN_CACHE/k8s-ctrl-$KUBE_VERSION}
# The benchmark's peer (bench.sh): agent-sandbox's controller (Sandbox, and
# with --extensions SandboxClaim/SandboxTemplate/SandboxWarmPool) and its CRDs.
AGENT_SANDBOX_VERSION=${AGENT_SANDBOX_VERSION:-v1.0.1}
AGENT_SANDBOX_BIN_DIR=${AGENT_SANDBOX_BIN_DIR:-$WRENN_CACHE/agent-sandbox-$AGENT_SANDBOX_VERSION}
