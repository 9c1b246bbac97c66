#!/usr/bin/env bash
# Installs the system packages the native engine needs (Debian/Ubuntu); with --browser also
# Debian's Chromium and a font, for the web client's browser tests (playwright-core drives
# /usr/bin/chromium; nothing is downloaded by playwright). Idempotent: does nothing when they
# are all present. Runs apt-get as root, or through sudo when available.
set -euo pipefail

PACKAGES=(build-essential cmake pkg-config libzmq3-dev libmsgpack-cxx-dev nlohmann-json3-dev libopenblas-dev)
for arg in "$@"; do
  case "$arg" in
    --browser) PACKAGES+=(chromium fonts-dejavu-core) ;;
    *) echo "install-system-deps: unknown flag $arg" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if [ ${#missing[@]} -eq 0 ]; then
  echo "install-system-deps: all packages present"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1; then
  SUDO="sudo"
else
  echo "install-system-deps: missing ${missing[*]} and not root (no sudo)" >&2
  exit 1
fi

echo "install-system-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
