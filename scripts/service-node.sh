#!/usr/bin/env bash
# Runs node with the service's flags, then the arguments given, in this process (exec: signals
# reach node itself): `bash scripts/service-node.sh dist/src/main.js`. The flags and why are in
# scripts/nodeFlags.ts, which the tests and scripts/cluster-local.ts use; keep the two in step
# (test/unit/node-flags.test.ts compares them). The core count is node's own, as there, and
# V8_POOL_SIZE overrides the pool size in both.
set -euo pipefail
# NODE_OPTIONS cleared for this one probe (an --inspect-brk there would stop it).
pool=${V8_POOL_SIZE:-$(NODE_OPTIONS= node -p 'Math.min(4, require("node:os").availableParallelism())')}
exec node --max-semi-space-size=32 --v8-pool-size="$pool" --no-incremental-marking-task --incremental-marking-hard-trigger=80 "$@"
