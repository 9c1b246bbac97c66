#!/usr/bin/env bash
# One-time (and idempotent) set-up for a fresh clone on Debian/Ubuntu:
#   1. system packages for the native engine (apt-get, as root or through sudo);
#   2. npm dependencies (npm ci) when node_modules is missing or older than package-lock.json;
#   3. the engine build (cmake; a no-op when up to date);
#   4. the web client's bundle (dist/web);
#   5. the default tiny model in DATA_DIR (default .data), generated once from a seed.
# Flags: --quiet (less output), --no-model (skip step 5), --browser (also Debian's Chromium,
# for the browser tests).
set -euo pipefail
cd "$(dirname "$0")/.."

quiet=0
model=1
deps_flags=()
for arg in "$@"; do
  case "$arg" in
    --quiet) quiet=1 ;;
    --no-model) model=0 ;;
    --browser) deps_flags+=(--browser) ;;
    *) echo "setup: unknown flag $arg" >&2; exit 2 ;;
  esac
done
say() { [ "$quiet" -eq 1 ] || echo "setup: $*"; }

bash scripts/install-system-deps.sh "${deps_flags[@]}" | { [ "$quiet" -eq 1 ] && cat >/dev/null || cat; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  say "installing npm dependencies (npm ci)"
  # The lock file lists every platform's optional packages, so npm ci accepts it and never
  # rewrites it.
  npm ci --no-audit --no-fund --loglevel=error
fi

say "building the engine"
if [ "$quiet" -eq 1 ]; then
  bash scripts/build-engine.sh >/dev/null
else
  bash scripts/build-engine.sh
fi

say "bundling the web client"
node --import tsx scripts/build-web.ts >/dev/null

if [ "$model" -eq 1 ] && [ -z "${MODEL_DIR:-}" ]; then
  node --import tsx scripts/gen-default-model.ts | { [ "$quiet" -eq 1 ] && cat >/dev/null || sed 's/^/setup: default model at /'; }
fi
say "done"
