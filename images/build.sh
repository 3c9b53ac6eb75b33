#!/usr/bin/env bash
# Builds the guest artifacts a capsule VM boots in CI and development:
#   vmlinuz         Debian's cloud kernel (linux-image-cloud-amd64)
#   initramfs.img   busybox + the virtio/vsock modules that kernel lacks
#                   built in; mounts root= and execs init= (wrenn-guest)
#   rootfs.ext4     sparse ext4: busybox userland + /.wrenn/wrenn-guest
#   manifest.json   versions, sizes, sha256s, the kernel command line
# into ${WRENN_CACHE:-~/.cache/wrenn}/guest/<key>/, where <key> hashes every
# input (these scripts, the apt versions of the kernel and busybox, the
# wrenn-guest sources or binary, the disk size). A complete directory is
# reused; a changed input makes a new one. The directory is printed last.
#
#   images/build.sh              build if missing, print the directory
#   images/build.sh --print-dir  print the directory without building;
#                                exit 0 if it is complete, 1 if not built
#
# Environment:
#   WRENN_CACHE           cache root (default ${XDG_CACHE_HOME:-~/.cache}/wrenn)
#   WRENN_GUEST_BIN       a prebuilt static wrenn-guest instead of cargo build
#   WRENN_ROOTFS_SIZE     apparent size of rootfs.ext4 (default 512M; sparse)
#   WRENN_KERNEL_PACKAGE  the kernel metapackage (default linux-image-cloud-amd64)
#
# Needs root (the disk's files must be root-owned; nothing is mounted and
# nothing is installed on the host), apt with the Debian mirror reachable
# on a cold build, and the Debian packages kmod (depmod), cpio, e2fsprogs,
# util-linux (flock) and musl-tools (musl-gcc for the guest's C deps).
# The production kernel (no initramfs) is built by kernel/build-kernel.sh.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
log() { printf '[guest-image] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

mode=build
case ${1:-} in
  "") ;;
  --print-dir) mode=print ;;
  *) die "unknown argument $1 (use --print-dir or nothing)" ;;
esac
[ "$(uname -m)" = x86_64 ] || die "only x86_64 guests are built (this is $(uname -m))"

cache=${WRENN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/wrenn}
guest_path=/.wrenn/wrenn-guest # node-agent/src/images GUEST_PATH
vsock_port=1024                # wrenn-guest --vsock-port default
rootfs_size=${WRENN_ROOTFS_SIZE:-512M}
# no_timer_check: under TCG on a busy host the kernel's check that the PIT
# ticks through the IO-APIC fails at random (the vCPU is not scheduled for
# the 10 ms it waits), and the fallback timer routing can stall the boot.
cmdline="console=ttyS0 root=/dev/vda rw rootfstype=ext4 init=$guest_path panic=1 reboot=k random.trust_cpu=on no_timer_check quiet loglevel=3"
# Module names as modules.dep knows them; their dependencies are resolved
# from modules.dep. ptp_kvm is refused without KVM, so it is optional.
required_modules=(virtio_pci virtio_mmio virtio_blk virtio_net virtio_console virtio-rng
  vsock vmw_vsock_virtio_transport)
optional_modules=(ptp_kvm)

kernel_meta=${WRENN_KERNEL_PACKAGE:-linux-image-cloud-amd64}
# Two apt-cache calls in all: each one parses every package list.
kernel_pkg=$(apt-cache depends "$kernel_meta" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ <>]*\)$/\1/p' | head -1)
[ -n "$kernel_pkg" ] || die "cannot resolve $kernel_meta to a linux-image package (run apt-get update)"
policy=$(apt-cache policy "$kernel_pkg" busybox-static 2>/dev/null)
apt_candidate() {
  local v
  v=$(printf '%s\n' "$policy" | awk -v p="$1:" '$1 == p { on = 1; next } /^[^ ]/ { on = 0 } on && $1 == "Candidate:" { print $2; exit }')
  [ -n "$v" ] && [ "$v" != "(none)" ] || die "apt knows no package $1 (run apt-get update)"
  printf '%s' "$v"
}
kernel_ver=$(apt_candidate "$kernel_pkg")
busybox_ver=$(apt_candidate busybox-static)

# What the key hashes. wrenn-guest is keyed by its sources (so --print-dir
# needs no compiler) or by the prebuilt binary's hash.
inputs() {
  echo "format 1"
  echo "kernel $kernel_pkg $kernel_ver"
  echo "busybox-static $busybox_ver"
  echo "cmdline $cmdline"
  echo "rootfs_size $rootfs_size"
  echo "modules ${required_modules[*]} / ${optional_modules[*]}"
  (cd "$here" && sha256sum build.sh initramfs/init)
  if [ -n "${WRENN_GUEST_BIN:-}" ]; then
    echo "guest-bin $(sha256sum < "$WRENN_GUEST_BIN" | cut -d' ' -f1)"
  else
    (cd "$repo" && find images/guest proto Cargo.toml Cargo.lock rust-toolchain.toml \
        -type f -not -path '*/target/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum)
  fi
}
key=$(inputs | sha256sum | cut -c1-16)
dir=$cache/guest/$key

if [ "$mode" = print ]; then
  echo "$dir"
  [ -f "$dir/manifest.json" ]
  exit
fi
if [ -f "$dir/manifest.json" ]; then
  log "cached: kernel $kernel_ver, key $key"
  touch "$dir" 2>/dev/null || true # marks it used for the pruning below
  echo "$dir"
  exit 0
fi

[ "$(id -u)" = 0 ] || die "run as root: the root disk's files must be owned by root"
for tool in depmod cpio mkfs.ext4 e2fsck flock dpkg-deb apt-get gzip; do
  command -v "$tool" >/dev/null || die "$tool not found (Debian packages: kmod cpio e2fsprogs util-linux dpkg apt gzip)"
done
mkdir -p "$cache/guest/debs"
exec 9>"$cache/guest/.lock"
flock 9
if [ -f "$dir/manifest.json" ]; then # built by whoever held the lock
  echo "$dir"
  exit 0
fi
# Holding the lock, any scratch directory left is from a killed build.
rm -rf "$cache/guest/.build-"*
start=$(date +%s%N)
work=$(mktemp -d "$cache/guest/.build-$key.XXXXXX")
trap 'rm -rf "$work"' EXIT
out=$work/out
mkdir -p "$out"

# 1. wrenn-guest, static: musl when rustup has (or can add) the target,
#    else glibc with crt-static (rustup's server may be unreachable in CI).
if [ -n "${WRENN_GUEST_BIN:-}" ]; then
  guest_bin=$WRENN_GUEST_BIN
  target=prebuilt
else
  target=x86_64-unknown-linux-musl
  if ! (cd "$repo" && rustup target list --installed 2>/dev/null | grep -qx "$target") \
    && ! (cd "$repo" && rustup target add "$target" >&2); then
    log "rustup cannot add $target; linking wrenn-guest statically against glibc"
    target=x86_64-unknown-linux-gnu
  fi
  log "cargo build --release -p wrenn-guest --target $target"
  if [ "$target" = x86_64-unknown-linux-musl ]; then
    command -v musl-gcc >/dev/null || die "musl-gcc not found (Debian package musl-tools)"
    (cd "$repo" && CC_x86_64_unknown_linux_musl=musl-gcc \
      cargo build --release --locked -q -p wrenn-guest --target "$target" >&2)
  else
    # An explicit --target keeps RUSTFLAGS off build scripts and proc macros.
    (cd "$repo" && RUSTFLAGS="${RUSTFLAGS:-} -C target-feature=+crt-static" \
      cargo build --release --locked -q -p wrenn-guest --target "$target" >&2)
  fi
  guest_bin=${CARGO_TARGET_DIR:-$repo/target}/$target/release/wrenn-guest
fi
[ -x "$guest_bin" ] || die "no wrenn-guest binary at $guest_bin"
if LC_ALL=C ldd "$guest_bin" 2>&1 | grep -q '=>'; then
  die "$guest_bin is dynamically linked; the root disk has no libc"
fi

# 2. Debian packages, downloaded once per version (never installed).
fetch() { # package version -> path of the .deb (one directory per version)
  local d=$cache/guest/debs/$1/${2//:/%3a} f
  f=$(ls "$d"/*.deb 2>/dev/null | head -1 || true)
  if [ -z "$f" ]; then
    log "apt-get download $1=$2"
    mkdir -p "$d.tmp"
    (cd "$d.tmp" && apt-get download -q "$1=$2" 2>&1 \
      | { grep -v -e '^W: Download is performed unsandboxed' -e '^Get:' -e '^Fetched' || true; } >&2)
    ls "$d.tmp"/*.deb >/dev/null 2>&1 || die "apt-get download $1=$2 fetched nothing"
    rm -rf "$d"; mv "$d.tmp" "$d"
    f=$(ls "$d"/*.deb | head -1)
  fi
  printf '%s' "$f"
}
dpkg-deb -x "$(fetch "$kernel_pkg" "$kernel_ver")" "$work/kernel"
dpkg-deb -x "$(fetch busybox-static "$busybox_ver")" "$work/busybox"
busybox=$work/busybox/bin/busybox
[ -x "$busybox" ] || die "busybox-static $busybox_ver has no bin/busybox"

# 3. Kernel and its module graph (the package ships no modules.dep:
#    Debian's postinst runs depmod, which we run on the extracted tree).
release=$(ls "$work/kernel/lib/modules")
[ "$(printf '%s\n' "$release" | wc -l)" = 1 ] || die "$kernel_pkg ships modules for several releases: $release"
cp "$work/kernel/boot/vmlinuz-$release" "$out/vmlinuz"
depmod -b "$work/kernel" "$release"
moddir=$work/kernel/lib/modules/$release

# Appends to $load the path of module $1 after its dependencies, each once.
declare -A seen=()
load=()
add_path() {
  local path=$1 deps d i
  [ -z "${seen[$path]:-}" ] || return 0
  seen[$path]=1
  deps=$(awk -F: -v p="$path" '$1 == p { print $2; exit }' "$moddir/modules.dep")
  # modules.dep lists the dependencies of a module nearest-last.
  read -ra d <<< "$deps"
  for ((i = ${#d[@]} - 1; i >= 0; i--)); do add_path "${d[$i]}"; done
  load+=("$path")
}
module_path() { # name (- or _) -> path in modules.dep, or nothing if built in
  local n
  n=$(printf '%s' "$1" | sed 's/[-_]/[-_]/g')
  grep -oE "^([^:]*/)?$n\.ko(\.(xz|zst|gz))?:" "$moddir/modules.dep" | head -1 | tr -d :
}
declare -A need=()
for m in "${required_modules[@]}" "${optional_modules[@]}"; do
  p=$(module_path "$m")
  if [ -z "$p" ]; then
    grep -qE "/$(printf '%s' "$m" | sed 's/[-_]/[-_]/g')\.ko" "$moddir/modules.builtin" \
      || die "module $m is neither in $release's modules.dep nor built in"
    continue
  fi
  add_path "$p"
done
for m in "${optional_modules[@]}"; do
  p=$(module_path "$m")
  [ -z "$p" ] || need[$p]=optional
done

# 4. initramfs: busybox, the modules (decompressed: busybox insmod reads
#    plain .ko only), the list in load order, /init.
ird=$work/initramfs
mkdir -p "$ird"/{bin,dev,proc,sys,newroot,lib/modules}
cp "$busybox" "$ird/bin/busybox"
for applet in sh mount umount insmod switch_root usleep cat mkdir ip; do
  ln -s busybox "$ird/bin/$applet"
done
install -m 0755 "$here/initramfs/init" "$ird/init"
: > "$ird/lib/modules/load"
for p in "${load[@]}"; do
  plain=$(basename "$p"); plain=${plain%.xz}; plain=${plain%.zst}; plain=${plain%.gz}
  case $p in
    *.xz) xz -dc "$moddir/$p" > "$ird/lib/modules/$plain" ;;
    *.zst) zstd -qdc "$moddir/$p" > "$ird/lib/modules/$plain" ;;
    *.gz) gzip -dc "$moddir/$p" > "$ird/lib/modules/$plain" ;;
    *) cp "$moddir/$p" "$ird/lib/modules/$plain" ;;
  esac
  echo "$plain ${need[$p]:-required}" >> "$ird/lib/modules/load"
done
mknod -m 600 "$ird/dev/console" c 5 1
epoch=${SOURCE_DATE_EPOCH:-0}
find "$ird" -exec touch -h -d "@$epoch" {} +
# GNU cpio's --reproducible renumbers inodes, so equal inputs give equal bytes.
(cd "$ird" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) \
  | gzip -9n > "$out/initramfs.img"

# 5. Root disk: busybox userland, accounts, and wrenn-guest where the
#    kernel command line's init= points.
rd=$work/rootfs
mkdir -p "$rd"/{bin,sbin,usr/bin,usr/sbin,etc,dev,proc,sys,run,tmp,var/tmp,root,home,.wrenn}
chmod 1777 "$rd/tmp" "$rd/var/tmp"
chmod 0700 "$rd/root"
cp "$busybox" "$rd/bin/busybox"
"$busybox" --list-full | while read -r applet; do
  [ -e "$rd/$applet" ] || [ -L "$rd/$applet" ] || ln -s /bin/busybox "$rd/$applet"
done
install -m 0755 "$guest_bin" "$rd$guest_path"
printf '%s\n' 'root:x:0:0:root:/root:/bin/sh' 'nobody:x:65534:65534:nobody:/nonexistent:/bin/false' > "$rd/etc/passwd"
printf '%s\n' 'root:x:0:' 'tty:x:5:' 'nogroup:x:65534:' > "$rd/etc/group"
printf '%s\n' 'root:*:0:0:99999:7:::' 'nobody:*:0:0:99999:7:::' > "$rd/etc/shadow"
chmod 0640 "$rd/etc/shadow"
printf 'capsule\n' > "$rd/etc/hostname"
printf '%s\n' '127.0.0.1 localhost' '::1 localhost' > "$rd/etc/hosts"
printf '%s\n' 'NAME="Wrenn base"' 'ID=wrenn-base' "VERSION_ID=\"busybox $busybox_ver\"" > "$rd/etc/os-release"
chown -R 0:0 "$rd"
find "$rd" -exec touch -h -d "@$epoch" {} +
uuid=$(printf '%s' "$key" | sha256sum | sed -E 's/^(.{8})(.{4})(.{4})(.{4})(.{12}).*/\1-\2-\3-\4-\5/')
E2FSPROGS_FAKE_TIME=$epoch mkfs.ext4 -q -F -L wrenn-root -U "$uuid" -E "hash_seed=$uuid,root_owner=0:0" \
  -m 0 -d "$rd" "$out/rootfs.ext4" "$rootfs_size" >/dev/null
e2fsck -fn "$out/rootfs.ext4" >/dev/null 2>&1 || die "e2fsck found errors in the new rootfs.ext4"

# 6. Manifest.
file_json() { # name -> {"size":..,"sha256":..}
  local f=$out/$1
  printf '{"size": %s, "sha256": "%s"}' "$(stat -c %s "$f")" "$(sha256sum < "$f" | cut -d' ' -f1)"
}
ms=$((($(date +%s%N) - start) / 1000000))
elapsed=$(printf '%d.%03d' $((ms / 1000)) $((ms % 1000)))
cat > "$out/manifest.json" <<EOF
{
  "format": 1,
  "key": "$key",
  "kernel": {"package": "$kernel_pkg", "version": "$kernel_ver", "release": "$release"},
  "busybox": "$busybox_ver",
  "cmdline": "$cmdline",
  "guest": {"path": "$guest_path", "vsock_port": $vsock_port, "target": "$target", "sha256": "$(sha256sum < "$guest_bin" | cut -d' ' -f1)"},
  "modules": [$(printf '"%s",' "${load[@]##*/}" | sed 's/,$//')],
  "rootfs": {"fstype": "ext4", "label": "wrenn-root", "uuid": "$uuid", "allocated": $(($(stat -c %b "$out/rootfs.ext4") * $(stat -c %B "$out/rootfs.ext4")))},
  "files": {
    "vmlinuz": $(file_json vmlinuz),
    "initramfs.img": $(file_json initramfs.img),
    "rootfs.ext4": $(file_json rootfs.ext4)
  },
  "build_seconds": $elapsed
}
EOF
inputs > "$out/inputs.txt"
rm -rf "$dir"
mv "$out" "$dir"
# Entries for old inputs go after a week unused; the newest stay for
# whatever may still boot them.
find "$cache/guest" -mindepth 1 -maxdepth 1 -type d -name '[0-9a-f]*' -mtime +7 \
  -not -name "$key" -exec rm -rf {} + 2>/dev/null || true
log "built in ${elapsed}s: kernel $release ($kernel_ver), key $key"
echo "$dir"
