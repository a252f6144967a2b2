#!/usr/bin/env bash
# System packages beyond the Python lock file, installed with apt-get when missing. Idempotent.
#   build: libjpeg-turbo's headers (libjpeg-dev: libjpeg62-turbo-dev on Debian), for the loader's batch JPEG
#          decoder, a C extension built by `pip install -e .` (`make` runs this before it);
#   test:  Chromium (Debian's `chromium`), which renders the comparison report in
#          tests/unit/test_compare.py (`make test` runs this).
# Without root or sudo, outside CI it says what is missing and goes on (the extension is optional and
# the browser test skips); under CI (CI=true) it fails.
set -euo pipefail

packages=()
for what in "${@:-build test}"; do
  for part in $what; do
    case "$part" in
      build) [ -f /usr/include/jpeglib.h ] || packages+=(libjpeg-dev) ;;
      test) [ -x /usr/bin/chromium ] || packages+=(chromium) ;;
      *) echo "install-system-deps: unknown part '$part' (build, test)" >&2; exit 2 ;;
    esac
  done
done
[ "${#packages[@]}" -eq 0 ] && exit 0

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO="sudo"
  elif [ "${CI:-}" = "true" ]; then
    echo "install-system-deps: missing ${packages[*]} and this user cannot run apt-get" >&2
    exit 1
  else
    echo "install-system-deps: missing ${packages[*]} (not root, no sudo): going on without" >&2
    exit 0
  fi
fi

echo "install-system-deps: installing ${packages[*]} (apt-get)" >&2
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
