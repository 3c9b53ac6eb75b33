# syntax=docker/dockerfile:1.7
#
# Wrenn's images, from one multi-stage build (run on a machine with
# internet access; nothing is fetched when a node starts):
#
#   docker build --target operator   -t REGISTRY/wrenn-operator:0.1.0 .
#   docker build --target gateway    -t REGISTRY/wrenn-gateway:0.1.0 .
#   docker build --target node-agent -t REGISTRY/wrenn-node-agent:0.1.0 \
#       --build-arg CH_SHA256=<sha256 of cloud-hypervisor-static of CH_VERSION> .
#
# then `helm install ... --set image.registry=REGISTRY` (docs/quickstart.md).
#
#   operator    one static binary on an empty base, run as uid 65532
#   node-agent  static wrenn-node-agent; cloud-hypervisor (pinned, checksum
#               verified); the guest kernel, initramfs and base root disk
#               from images/build.sh; wrenn-guest (injected into template
#               root disks); the few host tools the agent runs
#               (mkfs.ext4, qemu-img; QEMU itself with --build-arg WITH_QEMU=1)

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- static binaries (musl) ---------------------------------------------------
FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools protobuf-compiler clang libclang-dev \
      libdevmapper-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ENV TARGET=x86_64-unknown-linux-musl
# rust-toolchain.toml pins the toolchain; rustup installs it and the target here.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    rustup target add "$TARGET" \
 && cargo build --release --locked --target "$TARGET" \
      -p wrenn-operator -p wrenn-gateway -p wrenn-node-agent -p wrenn-guest \
 && mkdir -p /out \
 && for b in wrenn-operator wrenn-gateway wrenn-node-agent wrenn-guest; do \
      cp "target/$TARGET/release/$b" /out/ \
      && { file "/out/$b" | grep -Eq 'static(-pie)? linked|statically linked' \
           || { echo "$b is not static" >&2; exit 1; }; }; \
    done

# --- guest kernel, initramfs, base root disk (images/build.sh) -----------------
FROM ${RUST_IMAGE} AS guest
RUN apt-get update \
 && apt-get install -y --no-install-recommends kmod cpio e2fsprogs util-linux musl-tools \
 && rm -rf /var/lib/apt/lists/*
COPY images /src/images
COPY --from=build /out/wrenn-guest /out/wrenn-guest
# build.sh fetches Debian's cloud kernel and busybox with apt-get download and
# prints its output directory last.
RUN apt-get update \
 && dir=$(WRENN_CACHE=/cache WRENN_GUEST_BIN=/out/wrenn-guest /src/images/build.sh | tail -n 1) \
 && mkdir -p /guest \
 && cp "$dir/vmlinuz" "$dir/initramfs.img" "$dir/rootfs.ext4" "$dir/manifest.json" /guest/ \
 && rm -rf /var/lib/apt/lists/* /cache

# --- cloud-hypervisor, pinned and verified -------------------------------------
FROM ${RUNTIME_IMAGE} AS cloud-hypervisor
# Snapshots restore only on the same CH version: bump it with the node fleet
# in mind. The checksum is required; take it from the release you reviewed.
ARG CH_VERSION=v53.0
ARG CH_SHA256=
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
RUN test -n "$CH_SHA256" || { echo "set --build-arg CH_SHA256 (sha256 of cloud-hypervisor-static $CH_VERSION)" >&2; exit 1; } \
 && curl -fsSL -o /cloud-hypervisor \
      "https://github.com/cloud-hypervisor/cloud-hypervisor/releases/download/$CH_VERSION/cloud-hypervisor-static" \
 && echo "$CH_SHA256  /cloud-hypervisor" | sha256sum -c - \
 && chmod 0755 /cloud-hypervisor \
 && /cloud-hypervisor --version

# --- node agent ------------------------------------------------------------------
FROM ${RUNTIME_IMAGE} AS node-agent
ARG WITH_QEMU=0
# ca-certificates: the agent pulls template images from OCI registries.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates e2fsprogs qemu-utils \
      $(if [ "$WITH_QEMU" = 1 ]; then echo qemu-system-x86; fi) \
 && rm -rf /var/lib/apt/lists/*
COPY --from=cloud-hypervisor /cloud-hypervisor /opt/wrenn/bin/cloud-hypervisor
COPY --from=guest /guest/ /opt/wrenn/share/
COPY --from=build /out/wrenn-guest /opt/wrenn/share/wrenn-guest
COPY --from=build /out/wrenn-node-agent /usr/local/bin/wrenn-node-agent
# Paths match the chart's nodeAgent.chBinary, .kernel and .initramfs defaults.
ENV WRENN_CH_BINARY=/opt/wrenn/bin/cloud-hypervisor \
    WRENN_KERNEL=/opt/wrenn/share/vmlinuz \
    WRENN_INITRAMFS=/opt/wrenn/share/initramfs.img
# Privileged by design (the DaemonSet says why); root inside the pod.
USER 0:0
ENTRYPOINT ["/usr/local/bin/wrenn-node-agent"]

# --- operator ----------------------------------------------------------------------
FROM scratch AS operator
COPY --from=build /out/wrenn-operator /wrenn-operator
USER 65532:65532
ENTRYPOINT ["/wrenn-operator"]

# --- gateway (subresources.wrenn.dev aggregated API) -------------------------------
FROM scratch AS gateway
COPY --from=build /out/wrenn-gateway /wrenn-gateway
USER 65532:65532
ENTRYPOINT ["/wrenn-gateway"]
