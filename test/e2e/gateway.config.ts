/**
 * Topology of the gateway tests (test/e2e/gateway.test.ts): one runner with two pools side by
 * side, `mini` (the tiny model on the CPU engine) and `frontier` (a simulated GPU), and tiers
 * whose limits a test reaches with a few requests: `free` (→ mini) 5 requests and 600 tokens a
 * minute, `paid` (→ frontier) generous.
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"
import base from "../../cluster.config.js"

const config: TopologyInput = {
  ...base,
  runners: [{ name: "local", roles: ["gateway", "gpu"], region: "local", gpus: ["gpu-0", "gpu-1"] }],
  pools: {
    ...base.pools,
    frontier: {
      model: "default",
      gpus: [{ id: "gpu-1", device: "sim" }],
      engine: { kv_cache_bytes: 256 * 1024 * 1024, max_num_batched_tokens: 2048, max_num_seqs: 64, num_slots: 128 }
    }
  },
  tiers: {
    // Free users are pinned to mini: naming frontier is model_not_found.
    free: { pool: "mini", priority: 1, rpm: 5, tpm: 600, ttft_p99_ms: 60_000, models: ["mini"] },
    paid: { pool: "frontier", priority: 0, rpm: 600, tpm: 1_000_000, ttft_p99_ms: 60_000 }
  },
  default_tier: "free"
}

export default config
