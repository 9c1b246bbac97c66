/**
 * Benchmark topology for the CPU engine (bench/serve/turn-ttft.ts): the embedded default's
 * (cluster.config.ts: one CPU engine with the generated tiny Qwen3) with more KV cache, greedy
 * sampling, a tier that admits every turn, and prefix caching per BENCH_PREFIX_CACHING ("0": off).
 */
import base from "../../cluster.config.js"
import type { TopologyInput } from "../../src/runtime/Topology.js"

const mini = base.pools["mini"]!

const config: TopologyInput = {
  ...base,
  pools: {
    mini: {
      ...mini,
      engine: { ...mini.engine, kv_cache_bytes: 256 * 1024 * 1024, enable_prefix_caching: process.env["BENCH_PREFIX_CACHING"] !== "0" }
    }
  },
  tiers: { bench: { pool: "mini", priority: 0, rpm: 100_000_000, tpm: 2_000_000_000, ttft_p99_ms: 3_600_000 } },
  default_tier: "bench",
  generation: { ...base.generation, temperature: 0, top_p: 1 }
}

export default config
