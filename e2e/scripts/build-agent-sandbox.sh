#!/usr/bin/env bash
# Builds the benchmark's peer, sigs.k8s.io/agent-sandbox's controller, from
# the Go module proxy with the machine's Go and caches it outside the repo,
# keyed by version (like build-control-plane.sh):
#
#   $AGENT_SANDBOX_BIN_DIR/agent-sandbox-controller   one binary; --extensions
#                                                     adds the SandboxClaim,
#                                                     SandboxTemplate and
#                                                     SandboxWarmPool controllers
#   $AGENT_SANDBOX_BIN_DIR/crds/*.yaml                its CRDs, copied from the
#                                                     module's k8s/crds
#
# The module has no replace directives, so a plain require in a throwaway
# module builds it (GOFLAGS=-mod=mod lets go resolve what its go.sum lacks).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"
export GOFLAGS="-buildvcs=false -mod=mod" CGO_ENABLED=0

log() { printf '[agent-sandbox] %s\n' "$*" >&2; }

if [ -x "$AGENT_SANDBOX_BIN_DIR/agent-sandbox-controller" ] && [ -d "$AGENT_SANDBOX_BIN_DIR/crds" ]; then
  log "agent-sandbox $AGENT_SANDBOX_VERSION cached in $AGENT_SANDBOX_BIN_DIR"; exit 0
fi
command -v go >/dev/null || { log "go is required (the machine's Go, >= 1.26)"; exit 1; }
log "building agent-sandbox-controller $AGENT_SANDBOX_VERSION (cold: ~5-10 min on 2 cores)"
t0=$(date +%s); w=$(mktemp -d); trap 'rm -rf "$w"' EXIT
m=sigs.k8s.io/agent-sandbox
(cd "$w" && go mod init local/agentsandboxbin >/dev/null 2>&1 \
  && go get -tool "$m/cmd/agent-sandbox-controller@$AGENT_SANDBOX_VERSION" \
  && rm -rf "$AGENT_SANDBOX_BIN_DIR.tmp" && mkdir -p "$AGENT_SANDBOX_BIN_DIR.tmp/crds" \
  && go build -trimpath -ldflags "-s -w" -o "$AGENT_SANDBOX_BIN_DIR.tmp/agent-sandbox-controller" \
       "$m/cmd/agent-sandbox-controller")
dir=$(cd "$w" && go list -m -f '{{.Dir}}' "$m")
cp "$dir"/k8s/crds/*.yaml "$AGENT_SANDBOX_BIN_DIR.tmp/crds/"
chmod -R u+w "$AGENT_SANDBOX_BIN_DIR.tmp"
# Moved into place only when complete: a half-built directory is never
# mistaken for a cached one.
rm -rf "$AGENT_SANDBOX_BIN_DIR"; mv "$AGENT_SANDBOX_BIN_DIR.tmp" "$AGENT_SANDBOX_BIN_DIR"
log "agent-sandbox $AGENT_SANDBOX_VERSION built in $(( $(date +%s) - t0 ))s"
