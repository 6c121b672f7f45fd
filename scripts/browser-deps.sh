#!/usr/bin/env bash
# Installs what the browser tests (tests/e2e/test_playground.py) need that is not a Python package:
# Debian's Chromium. Playwright drives it through executable_path=/usr/bin/chromium; its own browser
# download (`playwright install`) cannot work here and is never run. The `playwright` Python package itself
# comes from requirements/dev.txt. Idempotent: does nothing when /usr/bin/chromium is already there.
set -euo pipefail

if [[ -x /usr/bin/chromium ]]; then
    exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
