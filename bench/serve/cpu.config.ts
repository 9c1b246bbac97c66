/**
 * Benchmark topology for the CPU engine (bench/serve/turn-ttft.ts): the embedded default's one
 * CPU engine with the generated tiny Qwen3, prefix caching per BENCH_PREFIX_CACHING ("0": off).
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"

const config: TopologyInput = {
  runners: [{ name: "local", roles: ["gateway", "gpu"], region: "local", gpus: ["gpu-0"] }],
  pools: {
    mini: {
      model: "default",
      gpus: [{ id: "gpu-0", device: "cpu" }],
      engine: {
        kv_cache_bytes: 256 * 1024 * 1024,
        max_num_batched_tokens: 512,
        max_num_seqs: 64,
        num_slots: 256,
        enable_prefix_caching: process.env["BENCH_PREFIX_CACHING"] !== "0"
      }
    }
  },
  tiers: { bench: { pool: "mini", priority: 0, rpm: 100_000_000, tpm: 2_000_000_000, ttft_p99_ms: 3_600_000 } },
  default_tier: "bench",
  generation: { max_tokens: 256, temperature: 0, top_p: 1, top_k: 0, client_buffer_tokens: 64 }
}

export default config
