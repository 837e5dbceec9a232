#!/usr/bin/env bash
# Regenerate Python stubs (+ .pyi) from protos/ into OUT (default: repo root).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-.}"
PY="${PYTHON:-python}"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$out" --grpc_python_out="$out" --mypy_out="$out" --mypy_grpc_out="$out" \
  protos/asyndgan/v1/*.proto
