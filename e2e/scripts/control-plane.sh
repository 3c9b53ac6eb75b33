#!/usr/bin/env bash
# Runs a throwaway etcd + kube-apiserver on loopback ports chosen at run time.
#
#   control-plane.sh run DIR    start, write DIR/kubeconfig, print "ready <kubeconfig>",
#                               then stay in the foreground until stdin closes or a
#                               signal arrives, and stop both processes.
#   control-plane.sh start DIR  the same, detached; `stop DIR` ends it.
#   control-plane.sh stop DIR
#   control-plane.sh kubectl-path   where the matching kubectl is cached
#
# Binaries come from build-control-plane.sh (built and cached when absent).
# Authentication is a static admin token in system:masters; the API server's
# serving certificate is self-signed and written to DIR/pki.
# WRENN_CP_FRONT_PROXY=1 adds the front-proxy flags aggregated API servers need;
# WRENN_CP_EXTRA_TOKENS=FILE adds the static-token lines of FILE;
# WRENN_CP_REQUEST_TIMEOUT=5s shortens --request-timeout (default 60s).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.sh
. "$here/versions.sh"

log() { printf '[control-plane] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

stop_dir() {
  local d=$1 pid
  for f in apiserver etcd; do
    [ -f "$d/$f.pid" ] || continue
    pid=$(cat "$d/$f.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$d/$f.pid"
  done
}

# Starts etcd and the API server of directory $1 on ports $2 (etcd client),
# $3 (etcd peer) and $4 (API server), and writes the admin kubeconfig for
# token $5. Reads `aggregator` and `timeout` from the caller.
launch() {
  local d=$1 ep=$2 pp=$3 ap=$4 token=$5
  "$ETCD_BIN_DIR/etcd" --name=default --data-dir="$d/etcd" --unsafe-no-fsync=true \
    --listen-client-urls="http://127.0.0.1:$ep" --advertise-client-urls="http://127.0.0.1:$ep" \
    --listen-peer-urls="http://127.0.0.1:$pp" --initial-advertise-peer-urls="http://127.0.0.1:$pp" \
    --initial-cluster="default=http://127.0.0.1:$pp" --log-level=warn \
    >"$d/etcd.log" 2>&1 &
  echo $! > "$d/etcd.pid"

  "$K8S_BIN_DIR/kube-apiserver" --etcd-servers="http://127.0.0.1:$ep" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$ap" \
    --cert-dir="$d/pki" --token-auth-file="$d/tokens.csv" --authorization-mode=RBAC \
    --service-account-issuer="https://127.0.0.1:$ap" --service-account-key-file="$d/pki/sa.pub" \
    --service-account-signing-key-file="$d/pki/sa.key" --service-cluster-ip-range=10.0.0.0/24 \
    --allow-privileged=true --disable-admission-plugins=ServiceAccount \
    --enable-priority-and-fairness=false --endpoint-reconciler-type=none --v=0 "${aggregator[@]}" "${timeout[@]}" \
    >"$d/apiserver.log" 2>&1 &
  echo $! > "$d/apiserver.pid"

  cat > "$d/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: wrenn-test
  cluster:
    server: https://127.0.0.1:$ap
    certificate-authority: $d/pki/apiserver.crt
contexts:
- name: wrenn-test
  context: {cluster: wrenn-test, user: admin, namespace: default}
current-context: wrenn-test
users:
- name: admin
  user: {token: $token}
KC
  chmod 600 "$d/kubeconfig"
}

# Waits until the API server of directory $1 on port $2 answers /readyz for
# token $3; on an exit or the deadline, shows the log, stops both and fails.
wait_ready() {
  local d=$1 ap=$2 token=$3 f
  local deadline=$(( $(date +%s) + ${WRENN_APISERVER_TIMEOUT:-90} ))
  until [ -f "$d/pki/apiserver.crt" ] && curl -fsS --cacert "$d/pki/apiserver.crt" \
        -H "Authorization: Bearer $token" "https://127.0.0.1:$ap/readyz" >/dev/null 2>&1; do
    for f in etcd apiserver; do
      kill -0 "$(cat "$d/$f.pid")" 2>/dev/null || {
        tail -20 "$d/$f.log" >&2; stop_dir "$d"; log "$f exited during start; log: $d/$f.log"; return 1
      }
    done
    [ "$(date +%s)" -lt "$deadline" ] || {
      tail -20 "$d/apiserver.log" >&2; stop_dir "$d"
      log "kube-apiserver not ready within ${WRENN_APISERVER_TIMEOUT:-90}s"; return 1
    }
    sleep 0.2
  done
}

start_dir() {
  local d=$1
  mkdir -p "$d/pki" "$d/etcd"
  d=$(cd "$d" && pwd)
  "$here/build-control-plane.sh"
  local t0; t0=$(date +%s%N)
  local ep pp ap
  [ -f "$d/pki/sa.key" ] || {
    openssl ecparam -genkey -name prime256v1 -noout -out "$d/pki/sa.key" 2>/dev/null
    openssl ec -in "$d/pki/sa.key" -pubout -out "$d/pki/sa.pub" 2>/dev/null
  }
  local token; token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  printf '%s,admin,admin-uid,"system:masters"\n' "$token" > "$d/tokens.csv"
  # More users (token,user,uid,"group,...") for RBAC tests.
  if [ -n "${WRENN_CP_EXTRA_TOKENS:-}" ]; then cat "$WRENN_CP_EXTRA_TOKENS" >> "$d/tokens.csv"; fi
  chmod 600 "$d/tokens.csv"

  # Front proxy for aggregated API servers (WRENN_CP_FRONT_PROXY=1): a
  # request-header CA, the proxy's client certificate (CN front-proxy-client)
  # and aggregator routing to APIService endpoints.
  local aggregator=()
  if [ -n "${WRENN_CP_FRONT_PROXY:-}" ]; then
    [ -f "$d/pki/front-proxy-client.crt" ] || {
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
        -keyout "$d/pki/front-proxy-ca.key" -out "$d/pki/front-proxy-ca.crt" -subj "/CN=wrenn test front-proxy CA" 2>/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
        -keyout "$d/pki/front-proxy-client.key" -out "$d/pki/front-proxy-client.csr" -subj "/CN=front-proxy-client" 2>/dev/null
      printf 'extendedKeyUsage=clientAuth\n' > "$d/pki/front-proxy-client.ext"
      openssl x509 -req -in "$d/pki/front-proxy-client.csr" -CA "$d/pki/front-proxy-ca.crt" \
        -CAkey "$d/pki/front-proxy-ca.key" -CAcreateserial -days 2 \
        -extfile "$d/pki/front-proxy-client.ext" -out "$d/pki/front-proxy-client.crt" 2>/dev/null
    }
    aggregator=(--requestheader-client-ca-file="$d/pki/front-proxy-ca.crt"
      --requestheader-allowed-names=front-proxy-client
      --requestheader-username-headers=X-Remote-User --requestheader-group-headers=X-Remote-Group
      --requestheader-extra-headers-prefix=X-Remote-Extra-
      --proxy-client-cert-file="$d/pki/front-proxy-client.crt" --proxy-client-key-file="$d/pki/front-proxy-client.key"
      --enable-aggregator-routing=true)
  fi

  local timeout=()
  if [ -n "${WRENN_CP_REQUEST_TIMEOUT:-}" ]; then timeout=(--request-timeout="$WRENN_CP_REQUEST_TIMEOUT"); fi

  # Ports are picked free, then bound by etcd and the API server a moment
  # later; with other control planes and tests starting beside this one,
  # another process can take one in between. A start that fails on a
  # taken port is retried on fresh ports.
  local attempt
  for attempt in 1 2 3; do
    ep=$(free_port); pp=$(free_port); ap=$(free_port)
    launch "$d" "$ep" "$pp" "$ap" "$token"
    if wait_ready "$d" "$ap" "$token"; then break; fi
    if [ "$attempt" -lt 3 ] && grep -qs "address already in use" "$d/etcd.log" "$d/apiserver.log"; then
      log "a port was taken before it was bound; starting again on other ports"
      # Nothing was stored yet; a fresh data directory keeps etcd from
      # recalling the old peer address.
      rm -rf "$d/etcd"; mkdir -p "$d/etcd"
      continue
    fi
    die "control plane did not start; logs: $d/etcd.log $d/apiserver.log"
  done
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  echo "$ms" > "$d/start-ms"
  log "kube-apiserver $KUBE_VERSION ready on https://127.0.0.1:$ap in ${ms}ms"
}

cmd=${1:-}; dir=${2:-}
if [ "$cmd" = kubectl-path ]; then echo "$K8S_BIN_DIR/kubectl"; exit 0; fi
[ -n "$cmd" ] && [ -n "$dir" ] || die "usage: $0 run|start|stop DIR | kubectl-path"
case $cmd in
  run)
    # A run's directory is scratch: removed at exit (only if it is one of
    # ours) unless WRENN_KEEP_CONTROL_PLANE asks to keep its logs.
    trap 'stop_dir "$dir"; [ -n "${WRENN_KEEP_CONTROL_PLANE:-}" ] || { [ -f "$dir/tokens.csv" ] && rm -rf "$dir"; }' EXIT
    trap 'exit 0' INT TERM
    start_dir "$dir"
    echo "ready $(cd "$dir" && pwd)/kubeconfig"
    # The caller holds our stdin; when it exits, for any reason, we stop.
    cat >/dev/null || true
    ;;
  start)
    start_dir "$dir"
    echo "$(cd "$dir" && pwd)/kubeconfig"
    ;;
  stop) stop_dir "$dir" ;;
  *) die "unknown command $cmd" ;;
esac
