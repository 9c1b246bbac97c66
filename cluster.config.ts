/**
 * Cluster topology: runners and their roles, model pools and their GPUs, tier routing, rate
 * limits and SLOs. Validated with Schema at start-up (src/runtime/Topology.ts). The default
 * is the embedded single-process deployment: one runner that is both gateway and GPU host,
 * one CPU engine serving the generated tiny model.
 */
import type { TopologyInput } from "./src/runtime/Topology.js"

const config: TopologyInput = {
  runners: [{ name: "local", roles: ["gateway", "gpu"], region: "local", gpus: ["gpu-0"] }],
  pools: {
    mini: {
      // "default" = the seeded tiny Qwen3 generated into DATA_DIR; or a Hugging Face checkpoint directory.
      model: "default",
      gpus: [{ id: "gpu-0", device: "cpu" }],
      engine: { kv_cache_bytes: 64 * 1024 * 1024, max_num_batched_tokens: 512, max_num_seqs: 64, num_slots: 256 }
    }
  },
  tiers: {
    // Free conversations are deleted 30 days after their last turn; paid ones are kept.
    free: { pool: "mini", priority: 1, rpm: 60, tpm: 100_000, ttft_p99_ms: 2000, retention_days: 30 },
    paid: { pool: "mini", priority: 0, rpm: 600, tpm: 1_000_000, ttft_p99_ms: 800 }
  },
  default_tier: "free",
  generation: { max_tokens: 256, temperature: 0.7, top_p: 0.95, top_k: 0, client_buffer_tokens: 64 }
}

export default config
