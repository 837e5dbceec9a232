#!/usr/bin/env bash
# make docker-smoke: build both images on a private Docker daemon and train a few steps with them.
#
# 1. host packages if missing (Debian: docker.io, debootstrap; needs root) and grpcurl/hadolint into .tools/
# 2. a private dockerd (--bridge=none --iptables=false; own data/exec roots and socket in a temp dir)
# 3. a base image made locally: debootstrap bookworm (python3, python3-venv) + the host CA bundle -> docker import
#    (nothing is pulled from a registry). Cached as .tools/cache/base-bookworm.tar unless SMOKE_CACHE=0.
# 4. both images via deploy/docker/build.sh --offline (legacy builder; wheels come from the host's pip)
# 5. three containers on the host network, as the chart runs them (non-root, read-only root filesystem, tmpfs
#    /tmp, no capabilities, mutual TLS from `asyndgan certs`): a dial-in discriminator (hospital-a, listens; health
#    via grpcurl and the in-image exec probe), the generator started next, BEFORE the dial-out site (it must wait,
#    SERVING, and say in its log what it waits for), then a dial-out discriminator (hospital-b: --connect to the
#    generator's port, --server-name generator; it must listen on nothing but /metrics). The generator trains a
#    few steps at 32 px with both sites; Status shows both contributing; metrics scraped on all three; clean
#    SIGTERM exits with checkpoints everywhere.
# Everything it started (containers, dockerd, temp dirs) is stopped/removed on exit (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T0=$(date +%s)
log() { echo "[docker-smoke +$(($(date +%s) - T0))s] $*"; }
die() { echo "[docker-smoke] FAIL: $*" >&2; exit 1; }

SUITE=${SMOKE_SUITE:-bookworm}
MIRROR=${SMOKE_MIRROR:-http://deb.debian.org/debian}
CACHE=${SMOKE_CACHE:-1}
ITERATIONS=${SMOKE_ITERATIONS:-4}
CACHE_TAR=$REPO/.tools/cache/base-$SUITE.tar
VENV=${VENV:-.venv}

[[ $(id -u) == 0 ]] || die "needs root (dockerd, debootstrap)"

# --- 1. tools ---------------------------------------------------------------------------------------------------
missing=()
command -v dockerd >/dev/null || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The docker CLI from the same package as dockerd (another docker on PATH may be much newer than the daemon).
DOCKER=$(dirname "$(command -v dockerd)")/../bin/docker
[[ -x $DOCKER ]] || DOCKER=$(command -v docker)
scripts/install_tools.sh grpcurl hadolint
GRPCURL=$REPO/.tools/bin/grpcurl
.tools/bin/hadolint deploy/docker/Dockerfile
log "hadolint clean"

# --- 2. private dockerd -----------------------------------------------------------------------------------------
WORK=$(mktemp -d /tmp/asyndgan-smoke.XXXXXX)
export DOCKER_HOST=unix://$WORK/docker.sock DOCKER_BUILDKIT=0
containers=()
DOCKERD_PID=""
cleanup() {
    local rc=$?
    set +e
    if ((rc)) && ((${#containers[@]})); then
        for c in "${containers[@]}"; do
            echo "----- logs of $c -----" >&2
            "$DOCKER" logs --tail 60 "$c" >&2
        done
    fi
    for c in "${containers[@]}"; do "$DOCKER" rm -f "$c" >/dev/null 2>&1; done
    if [[ -n $DOCKERD_PID ]]; then
        log "stopping dockerd"
        kill "$DOCKERD_PID" 2>/dev/null
        for _ in $(seq 100); do kill -0 "$DOCKERD_PID" 2>/dev/null || break; sleep 0.2; done
        kill -9 "$DOCKERD_PID" 2>/dev/null
    fi
    ((rc)) && [[ -f $WORK/dockerd.log ]] && tail -20 "$WORK/dockerd.log" >&2
    # dockerd unmounts its layers on shutdown; anything still mounted below WORK goes now.
    grep -o " $WORK[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null
    log "removing $WORK"
    rm -rf "$WORK"
    log "cleaned up (exit $rc)"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

dockerd --bridge=none --iptables=false --ip-masq=false \
    --data-root "$WORK/data" --exec-root "$WORK/exec" --pidfile "$WORK/dockerd.pid" \
    --host "$DOCKER_HOST" >"$WORK/dockerd.log" 2>&1 &
DOCKERD_PID=$!
for _ in $(seq 120); do "$DOCKER" version >/dev/null 2>&1 && break; sleep 0.5; done
"$DOCKER" version >/dev/null || die "dockerd did not start"
log "dockerd $("$DOCKER" version -f '{{.Server.Version}}') up, storage driver $("$DOCKER" info -f '{{.Driver}}')"

# --- 3. base image ----------------------------------------------------------------------------------------------
BASE=asyndgan-base:$SUITE
[[ $CACHE == 1 ]] || CACHE_TAR=$WORK/base-$SUITE.tar
if [[ $CACHE == 1 && -s $CACHE_TAR ]]; then
    log "base image from cache $CACHE_TAR"
else
    log "debootstrap $SUITE (python3, python3-venv)"
    debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$WORK/rootfs" "$MIRROR" \
        >"$WORK/debootstrap.log" 2>&1 || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap"; }
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/rootfs/etc/ssl/certs/ca-certificates.crt"
    rm -rf "$WORK"/rootfs/var/cache/apt/archives/*.deb "$WORK"/rootfs/var/lib/apt/lists/*
    mkdir -p "$(dirname "$CACHE_TAR")"
    tar -C "$WORK/rootfs" --numeric-owner -cf "$CACHE_TAR.tmp" .
    mv "$CACHE_TAR.tmp" "$CACHE_TAR"
    rm -rf "$WORK/rootfs"
fi
"$DOCKER" import "$CACHE_TAR" "$BASE" >/dev/null
log "base image $BASE imported"

# --- 4. images --------------------------------------------------------------------------------------------------
DOCKER=$DOCKER PYTHON=$VENV/bin/python deploy/docker/build.sh --offline --base "$BASE"
VERSION=$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("asyndgan"))')
DISC_IMAGE=asyndgan-discriminator:$VERSION GEN_IMAGE=asyndgan-generator:$VERSION
log "images: $("$DOCKER" images --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E '^asyndgan-(gen|disc)' | tr '\n' ' ')"
[[ $("$DOCKER" image inspect -f '{{.Config.User}}' "$DISC_IMAGE") == 10001:10001 ]] || die "image user is not 10001"

# --- 5. run -----------------------------------------------------------------------------------------------------
# Mutual TLS: one CA (the project's own dev CA tool). Each site's certificate names its site id: the generator dials
# hospital-a by that name, and admits hospital-b's Join only with a certificate naming hospital-b.
TLS=$WORK/tls
"$VENV/bin/asyndgan" certs init --dir "$TLS" 2>/dev/null
"$VENV/bin/asyndgan" certs issue hospital-a hospital-b generator --dir "$TLS" 2>/dev/null
chown -R 10001:10001 "$TLS" && chmod 0600 "$TLS"/*.key
mkdir -p "$WORK/ckpt-disc" "$WORK/ckpt-dialout" "$WORK/ckpt-gen"
chown 10001:10001 "$WORK/ckpt-disc" "$WORK/ckpt-dialout" "$WORK/ckpt-gen"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DPORT=$(free_port) DMETRICS=$(free_port) OMETRICS=$(free_port) GPORT=$(free_port) GMETRICS=$(free_port)
# What the chart's securityContext does, in docker terms.
hardened=(--network host --user 10001:10001 --read-only --tmpfs /tmp:rw,size=256m --cap-drop ALL
    --security-opt no-new-privileges -v "$TLS:/etc/asyndgan/tls:ro")
tls_args() { echo "--tls-cert /etc/asyndgan/tls/$1.pem --tls-key /etc/asyndgan/tls/$1.key --tls-ca /etc/asyndgan/tls/ca.pem"; }
site_args=(--size 32 --batch-size 4 --threads 1 --checkpoint-dir /var/lib/asyndgan/checkpoints --metrics-host 127.0.0.1)

run() {  # run NAME IMAGE ARGS...: start a detached container and remember it for cleanup
    local name=$1
    shift
    containers+=("$name")
    "$DOCKER" run -d --name "$name" "$@" >/dev/null
}

running() { [[ $("$DOCKER" inspect -f '{{.State.Running}}' "$1") == true ]]; }

wait_serving() {  # wait_serving CONTAINER PORT SERVER_NAME: poll the health service with grpcurl over mTLS
    local c=$1 port=$2 sname=$3 out=""
    for _ in $(seq 240); do
        running "$c" || die "$c exited before serving"
        out=$("$GRPCURL" -cacert "$TLS/ca.pem" -cert "$TLS/generator.pem" -key "$TLS/generator.key" \
            -servername "$sname" -max-time 3 "127.0.0.1:$port" grpc.health.v1.Health/Check 2>&1) || true
        [[ $out == *'"SERVING"'* ]] && return 0
        sleep 0.5
    done
    die "$c not SERVING on $port: $out"
}

# --- 5a. dial-in site (listens) ---
# shellcheck disable=SC2046
run smoke-disc "${hardened[@]}" -v "$WORK/ckpt-disc:/var/lib/asyndgan/checkpoints" "$DISC_IMAGE" \
    --site-id hospital-a --data 'embedded:icbm152?site=0&of=3' --listen "127.0.0.1:$DPORT" \
    --metrics-port "$DMETRICS" "${site_args[@]}" --allow-client generator $(tls_args hospital-a)
wait_serving smoke-disc "$DPORT" hospital-a
log "dial-in discriminator SERVING (grpcurl, mTLS)"
# The chart's exec probe for TLS ports: the pod's own certificate as client certificate.
# shellcheck disable=SC2046
"$DOCKER" exec smoke-disc asyndgan-health --address "127.0.0.1:$DPORT" --server-name hospital-a \
    $(tls_args hospital-a) | grep SERVING >/dev/null || die "exec probe"
# A client without a certificate must be refused.
if "$GRPCURL" -cacert "$TLS/ca.pem" -servername hospital-a -max-time 3 "127.0.0.1:$DPORT" \
    grpc.health.v1.Health/Check >/dev/null 2>&1; then die "discriminator accepted a client without certificate"; fi
# Only the generator's certificate may call the API: the hospital's own (same CA) gets PermissionDenied.
denied=$("$GRPCURL" -cacert "$TLS/ca.pem" -cert "$TLS/hospital-a.pem" -key "$TLS/hospital-a.key" \
    -servername hospital-a -max-time 5 "127.0.0.1:$DPORT" asyndgan.v1.DiscriminatorService/Status 2>&1 || true)
[[ $denied == *PermissionDenied* ]] || die "allow-list: another certificate of the CA was not refused: $denied"
log "exec probe SERVING; client without certificate refused; non-generator certificate PermissionDenied"

# --- 5b. the generator, before the dial-out site: it must wait (SERVING), not exit ---
# shellcheck disable=SC2046
run smoke-gen "${hardened[@]}" -v "$WORK/ckpt-gen:/var/lib/asyndgan/checkpoints" "$GEN_IMAGE" \
    --site "hospital-a=127.0.0.1:$DPORT" --site hospital-b --iterations "$ITERATIONS" --checkpoint-every 2 \
    --checkpoint-dir /var/lib/asyndgan/checkpoints --listen "127.0.0.1:$GPORT" --metrics-port "$GMETRICS" --metrics-host 127.0.0.1 \
    --serve --resume --threads 1 $(tls_args generator)
wait_serving smoke-gen "$GPORT" generator
# shellcheck disable=SC2046
"$DOCKER" exec smoke-gen asyndgan-health --address "127.0.0.1:$GPORT" --server-name generator \
    $(tls_args generator) | grep SERVING >/dev/null || die "generator exec probe"
waiting=""
for _ in $(seq 60); do
    waiting=$("$DOCKER" logs smoke-gen 2>&1 | grep -m1 'site hospital-b: has not dialed in' || true)
    [[ -n $waiting ]] && break
    running smoke-gen || die "generator exited while waiting for hospital-b"
    sleep 0.5
done
[[ -n $waiting ]] || die "the generator's log does not say it waits for hospital-b"
log "generator SERVING (grpcurl and exec probe) while it waits; its log: ${waiting#*: }"

# --- 5c. dial-out site: connects to the generator's port, listens on nothing but /metrics ---
# The image sets ASYNDGAN_LISTEN (the dial-in default); empty it, as the chart does for a dial-out pod.
# shellcheck disable=SC2046
run smoke-dialout "${hardened[@]}" -e ASYNDGAN_LISTEN= -v "$WORK/ckpt-dialout:/var/lib/asyndgan/checkpoints" "$DISC_IMAGE" \
    --site-id hospital-b --data 'embedded:icbm152?site=1&of=3' --connect "127.0.0.1:$GPORT" --server-name generator \
    --metrics-port "$OMETRICS" "${site_args[@]}" $(tls_args hospital-b)

gstatus() {
    "$GRPCURL" -cacert "$TLS/ca.pem" -cert "$TLS/hospital-a.pem" -key "$TLS/hospital-a.key" \
        -servername generator -max-time 5 "127.0.0.1:$GPORT" asyndgan.v1.GeneratorService/Status 2>&1 || true
}
status=""
for _ in $(seq 300); do
    status=$(gstatus)
    [[ $status == *"\"step\": \"$ITERATIONS\""* && $status != *'"training": true'* ]] && break
    for c in smoke-gen smoke-disc smoke-dialout; do running "$c" || die "$c exited"; done
    sleep 1
done
[[ $status == *"\"step\": \"$ITERATIONS\""* ]] || die "generator did not reach step $ITERATIONS: $status"
# Both sites contributed: the dial-out one over its Join stream.
python3 - "$status" <<'PY' || die "Status: a site did not contribute: $status"
import json, sys
sites = {s["site_id"]: s for s in json.loads(sys.argv[1])["sites"]}
for name in ("hospital-a", "hospital-b"):
    assert int(sites[name].get("steps_contributed", 0)) > 0, f"{name} contributed nothing: {sites.get(name)}"
print("Status: " + "; ".join(f"{n} {s.get('address')}: {s.get('steps_contributed')} steps" for n, s in sorted(sites.items())))
PY
"$DOCKER" logs smoke-dialout 2>&1 | grep 'joined the generator at' >/dev/null || die "dial-out site did not log its join"
log "generator trained $ITERATIONS steps with the dial-in and the dial-out site"

# The dial-out container listens on exactly one TCP port: its /metrics (host network: match the process's sockets
# against the host's LISTEN table).
python3 - "$("$DOCKER" inspect -f '{{.State.Pid}}' smoke-dialout)" "$OMETRICS" <<'PY' || die "dial-out site listens on a port"
import os, sys
pid, metrics = sys.argv[1], int(sys.argv[2])
inodes = set()
for root, _, files in os.walk(f"/proc/{pid}/task"):
    if root.endswith("/fd"):
        for f in files:
            try:
                link = os.readlink(os.path.join(root, f))
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
ports = set()
for table in ("/proc/net/tcp", "/proc/net/tcp6"):
    for line in open(table).read().splitlines()[1:]:
        f = line.split()
        if f[3] == "0A" and f[9] in inodes:  # LISTEN
            ports.add(int(f[1].rsplit(":", 1)[1], 16))
assert ports == {metrics}, f"listening on {sorted(ports)}, expected only metrics {metrics}"
print(f"dial-out site listens only on {metrics} (/metrics)")
PY

# Metrics: the services bind them inside the container; on the host network they are on 127.0.0.1 either way.
# The dial-out site serves no gRPC, so it has no grpc_server_* series: its own step counter instead.
for triple in "discriminator $DMETRICS grpc_server_handled_total" "generator $GMETRICS grpc_server_handled_total" \
    "dial-out-site $OMETRICS asyndgan_site_steps_total"; do
    set -- $triple
    python3 - "$1" "$2" "$3" <<'PY' || die "$1 metrics on port $2"
import sys, urllib.request
role, port, want = sys.argv[1], sys.argv[2], sys.argv[3]
text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
assert any(n.startswith("asyndgan_") for n in names), f"no asyndgan_* series on {role}"
assert want in names, f"no {want} on {role}"
print(f"{role}: {len(names)} series")
PY
done

# Graceful stop (SIGTERM): exit code 0 and a checkpoint on each side's volume.
"$DOCKER" stop -t 30 smoke-gen smoke-disc smoke-dialout >/dev/null
for c in smoke-gen smoke-disc smoke-dialout; do
    code=$("$DOCKER" inspect -f '{{.State.ExitCode}}' "$c")
    [[ $code == 0 ]] || die "$c exited with $code after SIGTERM"
done
for d in ckpt-disc ckpt-dialout ckpt-gen; do
    [[ -n $(find "$WORK/$d" -type f) ]] || die "no checkpoint in $d"
done
log "clean SIGTERM exits, checkpoints written: $(cd "$WORK" && find ckpt-* -type f | tr '\n' ' ')"
log "PASS in $(($(date +%s) - T0)) s"
