#!/usr/bin/env bash
# Builds Wrenn's production guest kernel from Debian's kernel source:
# x86_64_defconfig + wrenn.config (everything a capsule needs built in, no
# modules, no initramfs). Slow (30-60 min on 2 cores), so CI does not run it;
# CI boots Debian's cloud kernel with an initramfs instead (../build.sh).
#
#   images/kernel/build-kernel.sh [--config-only] [--out DIR]
#
# Source: the `linux-source-<series>` Debian package (a tarball of the exact
# Debian tree, patches applied), fetched with `apt-get download`, so no
# deb-src entry is needed; with deb-src configured, `apt-get source linux`
# gives the same tree. The package version is pinned by LINUX_SOURCE_VERSION
# (default: apt's candidate) and recorded in the output.
#
# Output (default ${WRENN_CACHE:-~/.cache/wrenn}/kernel/<version>-<config hash>/):
#   vmlinuz   bzImage (Cloud Hypervisor and QEMU direct boot)
#   vmlinux   ELF with the PVH note (Cloud Hypervisor's faster path)
#   config    the full resolved .config
#   version   `make kernelrelease`
# Boot it with the same command line as the CI kernel (../README.md); it
# needs no initramfs. Host packages: build-essential bc bison flex
# libelf-dev libssl-dev xz-utils.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
log() { printf '[kernel] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

config_only=0 out=
while [ $# -gt 0 ]; do
  case $1 in
    --config-only) config_only=1 ;;
    --out) out=$2; shift ;;
    *) die "unknown argument $1 (use --config-only, --out DIR)" ;;
  esac
  shift
done

series=${LINUX_SOURCE_SERIES:-6.1}
pkg=linux-source-$series
version=${LINUX_SOURCE_VERSION:-$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: *//p')}
[ -n "$version" ] && [ "$version" != "(none)" ] || die "apt knows no $pkg (apt-get update?)"
frag_hash=$(sha256sum "$here/wrenn.config" "$0" | sha256sum | cut -c1-12)
cache=${WRENN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}
out=${out:-$cache/kernel/$version-$frag_hash}

if [ "$config_only" = 0 ]; then
  missing=()
  for p in build-essential bc bison flex libelf-dev libssl-dev xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] || die "missing host packages: apt-get install ${missing[*]}"
fi

work=$cache/kernel/src-$version
if [ ! -f "$work/tree/Makefile" ]; then
  log "fetching $pkg=$version"
  rm -rf "$work"; mkdir -p "$work/deb"
  (cd "$work/deb" && apt-get download -q "$pkg=$version" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2 || true)
  deb=$(ls "$work/deb"/*.deb 2>/dev/null | head -1)
  [ -n "$deb" ] || die "apt-get download $pkg=$version fetched nothing"
  dpkg-deb -x "$deb" "$work/x"
  tarball=$(ls "$work/x/usr/src/$pkg".tar.* | head -1)
  log "unpacking $(basename "$tarball")"
  mkdir -p "$work/tree"
  tar -xf "$tarball" -C "$work/tree" --strip-components=1
  rm -rf "$work/x" "$work/deb"
fi

cd "$work/tree"
# Reproducible metadata baked into the image.
export KBUILD_BUILD_USER=wrenn KBUILD_BUILD_HOST=wrenn \
  KBUILD_BUILD_TIMESTAMP="Debian $pkg $version" KBUILD_BUILD_VERSION=1
make -s x86_64_defconfig
scripts/kconfig/merge_config.sh -m -O . .config "$here/wrenn.config" >/dev/null
make -s olddefconfig
# Every line of the fragment must have survived olddefconfig.
dropped=0
while read -r line; do
  case $line in
    CONFIG_*=*) want=$line ;;
    "# CONFIG_"*" is not set") want=$line ;;
    *) continue ;;
  esac
  if ! grep -qxF "$want" .config; then
    opt=${want#\# }; opt=${opt%%[= ]*}
    log "wrenn.config wants '$want' but .config has '$(grep -E "(^|# )$opt[= ]" .config || echo "$opt absent")'"
    dropped=1
  fi
done < "$here/wrenn.config"
[ "$dropped" = 0 ] || die "the config fragment does not apply to $pkg $version"
log "config for $(make -s kernelrelease) verified against wrenn.config"
if [ "$config_only" = 1 ]; then
  mkdir -p "$out"; cp .config "$out/config"
  log "config written to $out/config"
  echo "$out"; exit 0
fi

log "building bzImage and vmlinux with $(nproc) jobs"
make -s -j"$(nproc)" bzImage vmlinux
mkdir -p "$out.tmp"
cp arch/x86/boot/bzImage "$out.tmp/vmlinuz"
cp vmlinux "$out.tmp/vmlinux"
cp .config "$out.tmp/config"
make -s kernelrelease > "$out.tmp/version"
rm -rf "$out"; mv "$out.tmp" "$out"
log "kernel $(cat "$out/version") in $out"
echo "$out"
