#!/usr/bin/env bash
# System tools the tests use for real: Prometheus + promtool (Debian package `prometheus`).
set -euo pipefail
if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "install Prometheus (promtool + prometheus), e.g. 'apt-get install prometheus', then re-run" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus >/dev/null
# The package may start a server on install where an init system runs; the tests start their own.
(command -v systemctl >/dev/null && systemctl stop prometheus 2>/dev/null) || true
