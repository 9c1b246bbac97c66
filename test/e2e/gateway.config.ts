/**
 * Topology of the gateway tests (test/e2e/gateway.test.ts): the default one-runner CPU setup
 * with tiers whose limits a test reaches with a few requests: `free` 5 requests and 600
 * tokens a minute, `paid` generous.
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"
import base from "../../cluster.config.js"

const config: TopologyInput = {
  ...base,
  tiers: {
    free: { pool: "mini", priority: 1, rpm: 5, tpm: 600, ttft_p99_ms: 60_000 },
    paid: { pool: "mini", priority: 0, rpm: 600, tpm: 1_000_000, ttft_p99_ms: 60_000 }
  },
  default_tier: "free"
}

export default config
