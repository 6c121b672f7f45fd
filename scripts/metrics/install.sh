#!/usr/bin/env bash
# Installs the Debian packages of the autoscaling metrics path: Prometheus (the server binary only; the tests run
# it themselves with a generated config and a temporary storage dir). The Debian service is never enabled or
# started: when no policy-rc.d denies service starts, a temporary one does for the duration of the install.
# Idempotent and quiet when everything is present. Prints the path of the prometheus binary as its last line.
set -euo pipefail

log() { printf '[metrics/install.sh %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

need=()
for p in prometheus; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { log "need root to apt-get install ${need[*]}"; exit 1; }
  temp_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # 101 = "action not allowed": invoke-rc.d / deb-systemd-invoke then leave the service stopped.
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    temp_policy=/usr/sbin/policy-rc.d
  fi
  trap 'if [ -n "$temp_policy" ]; then rm -f "$temp_policy"; fi' EXIT
  log "apt-get install ${need[*]}"
  apt-get update -qq
  # --no-install-recommends: skips prometheus-node-exporter, which nothing here uses.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
# On a machine with systemd, make sure the packaged unit stays off (we run our own instance on other ports).
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
bin=$(command -v prometheus || echo /usr/bin/prometheus)
[ -x "$bin" ] || { log "prometheus binary missing after install"; exit 1; }
log "$("$bin" --version 2>&1 | head -1)"
echo "$bin"
