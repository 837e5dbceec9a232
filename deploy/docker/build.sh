#!/usr/bin/env bash
# Build the AsynDGAN images: asyndgan-discriminator:<version> and asyndgan-generator:<version>.
#
#   deploy/docker/build.sh [--offline] [--base IMAGE] [--target discriminator|generator|all] [--prefix REGISTRY/PATH/]
#
# The build context is a small temp dir (Dockerfile, asyndgan-health, wheels/): the asyndgan wheel built from this
# checkout and constraints.txt with the dependency versions of the project venv (`pip freeze`, torch excluded), so the
# image runs the versions the tests ran. Online (default), the build installs the rest from PyPI and torch from
# TORCH_INDEX_URL. With --offline every wheel is downloaded here first (the host's pip configuration applies: that is
# how a local CPU torch wheel gets in) and served to the build over HTTP on 127.0.0.1; the build needs no index.
# --offline needs the Docker daemon on this host and the same Python minor version as the base image.
#
# Env: DOCKER (docker CLI), PYTHON (a python with pip; default .venv/bin/python), TORCH_SPEC, TORCH_INDEX_URL,
#      DOCKER_BUILD_ARGS (extra args for docker build, word-split). A CUDA image, for example:
#      TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 deploy/docker/build.sh --prefix registry.example/ml/
set -euo pipefail
cd "$(dirname "$0")/../.."

DOCKER=${DOCKER:-docker}
PYTHON=${PYTHON:-.venv/bin/python}
[[ -x $PYTHON ]] || PYTHON=python3
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TORCH_INDEX_URL=${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}
offline=0 base="" target=all prefix=""
while (($#)); do
    case $1 in
        --offline) offline=1 ;;
        --base) base=$2; shift ;;
        --target) target=$2; shift ;;
        --prefix) prefix=$2; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "build.sh: unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done
case $target in
    all) targets=(discriminator generator) ;;
    discriminator|generator) targets=("$target") ;;
    *) echo "build.sh: --target is discriminator, generator or all" >&2; exit 2 ;;
esac

work=$(mktemp -d "${TMPDIR:-/tmp}/asyndgan-build.XXXXXX")
ctx=$work/context
server_pid=""
cleanup() {
    [[ -n $server_pid ]] && kill "$server_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$ctx/wheels" "$work/wheelhouse"
cp deploy/docker/Dockerfile "$ctx/"
install -m 0755 deploy/docker/asyndgan-health "$ctx/asyndgan-health"
pipq=(-q -q)  # -qq: errors only (the host pip config may name index dirs that are absent)

"$PYTHON" -m pip wheel "${pipq[@]}" --no-deps -w "$ctx/wheels" .
wheel=$(ls "$ctx"/wheels/asyndgan-*.whl)
version=$(basename "$wheel" | cut -d- -f2)

# Same dependency versions as the project venv (if there is one); torch stays free for TORCH_SPEC.
if "$PYTHON" -m pip freeze --exclude-editable >"$work/freeze.txt" 2>/dev/null; then
    grep -E '^[A-Za-z0-9_.-]+==' "$work/freeze.txt" | grep -viE '^(torch|asyndgan)==' >"$ctx/wheels/constraints.txt" || true
fi
touch "$ctx/wheels/constraints.txt"

build_args=(--build-arg "TORCH_SPEC=$TORCH_SPEC" --build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL"
    --build-arg "PIP_OFFLINE=$offline" --build-arg "ASYNDGAN_VERSION=$version")
[[ -n $base ]] && build_args+=(--build-arg "BASE_IMAGE=$base")

if ((offline)); then
    "$PYTHON" -m pip download "${pipq[@]}" --only-binary=:all: -c "$ctx/wheels/constraints.txt" \
        -d "$work/wheelhouse" "$wheel" "$TORCH_SPEC"
    python3 - "$work/wheelhouse" "$work/port" <<'PY' &
import functools, http.server, os, sys

class Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=sys.argv[1]))
with open(sys.argv[2] + ".tmp", "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
srv.serve_forever()
PY
    server_pid=$!
    for _ in $(seq 100); do [[ -s $work/port ]] && break; sleep 0.1; done
    [[ -s $work/port ]] || { echo "build.sh: wheelhouse server did not start" >&2; exit 1; }
    build_args+=(--build-arg "WHEELS_URL=http://127.0.0.1:$(cat "$work/port")/")
    echo "build.sh: offline: $(ls "$work/wheelhouse" | wc -l) wheels ($(du -sh "$work/wheelhouse" | cut -f1)) served on 127.0.0.1"
fi

# shellcheck disable=SC2206
extra=(${DOCKER_BUILD_ARGS:-})
for t in "${targets[@]}"; do
    echo "build.sh: building ${prefix}asyndgan-$t:$version (base ${base:-default}, $TORCH_SPEC)"
    "$DOCKER" build --network host "${build_args[@]}" "${extra[@]}" --target "$t" \
        -t "${prefix}asyndgan-$t:$version" "$ctx" >"$work/build-$t.log" 2>&1 \
        || { tail -40 "$work/build-$t.log" >&2; echo "build.sh: docker build failed" >&2; exit 1; }
    echo "build.sh: built ${prefix}asyndgan-$t:$version"
done
