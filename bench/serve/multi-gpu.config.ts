/**
 * Benchmark topology for prefix caching and routing (bench/serve/prefix-routing.ts): one runner
 * with four simulated H100s (`device: "sim"`, Llama-3.1-8B step times: prefill costs per
 * computed token, so cached tokens are time saved) in one pool. Tuned through the environment:
 *
 * - BENCH_ROUTING: "affinity" (default) or "random" (the pool's `routing`)
 * - BENCH_PREFIX_CACHING: "1" (default) or "0" (the pool's `enable_prefix_caching`)
 * - BENCH_SIM_TIME_SCALE (default 1): multiplies the sim's step times (`sim_time_scale`)
 * - BENCH_KV_CACHE_BYTES (default 32 GiB per GPU: an H100 with an 8B model), BENCH_MAX_NUM_SEQS (256), BENCH_NUM_SLOTS (1024)
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"

const int = (name: string, fallback: number): number => Number(process.env[name] ?? fallback)
const gpus = ["gpu-0", "gpu-1", "gpu-2", "gpu-3"] as const

const config: TopologyInput = {
  runners: [{ name: "bench", roles: ["gateway", "gpu"], region: "local", gpus: [...gpus] }],
  pools: {
    default: {
      model: "default",
      gpus: [{ id: gpus[0], device: "sim" }, ...gpus.slice(1).map((id) => ({ id, device: "sim" }))],
      engine: {
        kv_cache_bytes: int("BENCH_KV_CACHE_BYTES", 32 * 1024 * 1024 * 1024),
        max_num_batched_tokens: 8192,
        max_num_seqs: int("BENCH_MAX_NUM_SEQS", 256),
        num_slots: int("BENCH_NUM_SLOTS", 1024),
        enable_prefix_caching: process.env["BENCH_PREFIX_CACHING"] !== "0",
        sim_time_scale: int("BENCH_SIM_TIME_SCALE", 1)
      },
      routing: process.env["BENCH_ROUTING"] === "random" ? "random" : "affinity"
    }
  },
  // Every turn is admitted: the benchmark compares latency, it does not shed load.
  tiers: { bench: { pool: "default", priority: 0, rpm: 100_000_000, tpm: 2_000_000_000, ttft_p99_ms: 3_600_000 } },
  default_tier: "bench",
  generation: { max_tokens: 1024, temperature: 0.7, top_p: 0.95, top_k: 0, client_buffer_tokens: 64 }
}

export default config
