#!/usr/bin/env bash
# System packages the tests need beyond the Python lock file, installed with apt-get (`make test` runs
# this first). Chromium (Debian's `chromium` package) renders the comparison report in
# tests/unit/test_compare.py. Idempotent: installs only what is missing.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  elif [ "${CI:-}" = "true" ]; then
    echo "install-system-deps: chromium is missing and this user cannot run apt-get" >&2
    exit 1
  else
    echo "install-system-deps: chromium is missing (not root, no sudo): its browser test will skip" >&2
    exit 0
  fi
fi

echo "install-system-deps: installing chromium (apt-get)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version >&2
