#!/usr/bin/env bash
# Install Prometheus and promtool from Debian (the monitoring tests run both); idempotent: a second run
# only checks. The package's own service is never enabled or started: the tests and the laptop run start
# their own `prometheus` process with their own config, data directory and port.
# Usage: bash scripts/install-prometheus.sh
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

if ! command -v prometheus >/dev/null || ! command -v promtool >/dev/null; then
  echo "install-prometheus: installing the Debian package prometheus"
  $SUDO apt-get update -qq
  # policy-rc.d exit 101 keeps the package's init script from starting a service during the install;
  # an existing policy-rc.d (containers often have one) is left as it is.
  policy=/usr/sbin/policy-rc.d
  added_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod 0755 "$policy"
    added_policy=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus \
    >/dev/null
  [ -z "$added_policy" ] || $SUDO rm -f "$policy"
  # On a systemd host the package enables its unit at install: undo that (nothing here uses it).
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
  fi
fi

echo "install-prometheus: ok ($(prometheus --version 2>&1 | head -1), $(promtool --version 2>&1 | head -1))"
