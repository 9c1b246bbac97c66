#!/usr/bin/env bash
# Runs node with the service's flags, then the arguments given, in this process (exec: signals
# reach node itself): `bash scripts/service-node.sh dist/src/main.js`. The flags and why are in
# scripts/nodeFlags.ts, which the tests and scripts/cluster-local.ts use; keep the two in step
# (test/unit/node-flags.test.ts compares them).
set -euo pipefail
cores=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN)
exec node --max-semi-space-size=64 --v8-pool-size=$((cores < 4 ? cores : 4)) "$@"
