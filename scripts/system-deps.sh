#!/usr/bin/env bash
# Debian libraries that wheels need but do not ship: libibverbs1 for the Mooncake wheel,
# iproute2 for the test network namespaces, openssl for the test control plane's certs.
set -euo pipefail
need=()
for p in libibverbs1 iproute2 openssl; do dpkg -s "$p" >/dev/null 2>&1 || need+=("$p"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
