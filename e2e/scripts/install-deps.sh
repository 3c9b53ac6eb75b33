#!/usr/bin/env bash
# Installs everything a fresh machine lacks to build, run and test Wrenn:
# Debian packages (listed in .ci/apt-packages plus what these scripts use),
# the pinned Rust toolchain's components, and the Go-built control plane
# (cached outside the repo by version). Idempotent: fast when all is there.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
log() { printf '[install] %s\n' "$*" >&2; }

# Tools the scripts themselves use, then what crates and tests need.
pkgs=(curl openssl python3 iproute2 protobuf-compiler)
while read -r p; do
  p=${p%%#*}; p=${p//[[:space:]]/}
  [ -n "$p" ] && pkgs+=("$p")
done < "$root/.ci/apt-packages"

missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "need root to apt-get install: ${missing[*]}"; exit 1; }
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  log "Debian packages present"
fi

command -v cargo >/dev/null || { log "cargo not found: install Rust with rustup (the toolchain is pinned in rust-toolchain.toml)"; exit 1; }
# rustup reads rust-toolchain.toml and adds the pinned channel's components.
(cd "$root" && rustup show active-toolchain >/dev/null && cargo fmt --version >/dev/null && cargo clippy --version >/dev/null) \
  || { log "the pinned Rust toolchain or its rustfmt/clippy components are missing"; exit 1; }

command -v go >/dev/null || { log "go not found: the control plane is built from the Go module proxy with the machine's Go (>= 1.26)"; exit 1; }
"$root/e2e/scripts/build-control-plane.sh"

# --- chart tooling (charts/wrenn, e2e/tests/chart.rs) ------------------------
# helm, kube-controller-manager, kube-scheduler and kwok, built from the Go
# module proxy and cached by version like the control plane (cold ~12 min on
# 2 cores, of which helm ~5; warm: instant).
"$root/e2e/scripts/build-helm.sh" all
# The benchmark's peer (e2e/scripts/bench.sh and its CI ratio gate):
# agent-sandbox's controller, from the Go module proxy (cold ~5 min).
"$root/e2e/scripts/build-agent-sandbox.sh"
# --- end chart tooling --------------------------------------------------------
# >>> guest image (issue 5, images/): kernel, initramfs and root disk for
# tier-3 VM tests, cached in ${WRENN_CACHE:-~/.cache/wrenn}/guest/<input hash>/
# so a warm CI run only computes the key. Needs root (CI is root).
if [ "$(id -u)" = 0 ]; then
  "$root/images/build.sh" >/dev/null
else
  log "not root: skipping images/build.sh (the guest boot test builds or skips)"
fi
# <<< guest image

# vhost-device-vsock: QEMU's vsock backend for the QEMU VMM backend and the
# tier-3 VM tests. Not packaged in Debian; built from crates.io (cold ~4 min
# on 2 cores), installed into ~/.cargo/bin once per version.
VHOST_VSOCK_VERSION=0.3.0
if ! vhost-device-vsock --version 2>/dev/null | grep -q "$VHOST_VSOCK_VERSION"; then
  log "cargo install vhost-device-vsock $VHOST_VSOCK_VERSION"
  # Outside the workspace so its toolchain pin does not apply.
  (cd / && env -u CARGO_TARGET_DIR cargo install -q --locked vhost-device-vsock --version "$VHOST_VSOCK_VERSION")
else
  log "vhost-device-vsock $VHOST_VSOCK_VERSION present"
fi
