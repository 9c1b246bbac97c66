/**
 * Benchmark topology (CLUSTER_CONFIG=bench/serve/sim.config.ts): one runner, one pool "default"
 * with one simulated H100 (`device: "sim"`: the engine sleeps a modelled Llama-3.1-8B step time
 * and returns pseudo-random token ids of the tiny model's vocabulary), engine settings sized for
 * 2048 concurrent streams. The orchestrator (bench/serve/run.ts) tunes it through the
 * environment:
 *
 * - BENCH_DEVICE (default "sim"; "cpu" runs the tiny model on the CPU engine)
 * - BENCH_MAX_NUM_SEQS (default 2048): running sequences per step
 * - BENCH_NUM_SLOTS (default 4096): decode slots = the most concurrent streams admitted
 * - BENCH_MAX_NUM_BATCHED_TOKENS (default 8192): token budget per step (chunked prefill)
 * - BENCH_KV_CACHE_BYTES (default 8 GiB): the KV budget the engine is given (`--kv-cache-bytes`)
 * - BENCH_CLIENT_BUFFER_TOKENS (default 64): tokens a client may lag before backpressure
 * - BENCH_TTFT_P99_MS (default 800): the tier's TTFT target, past which admission refuses
 * - BENCH_NUM_GPUS (default 1): simulated GPUs in the pool, each with the settings above
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"

const int = (name: string, fallback: number): number => {
  const raw = process.env[name]
  if (raw === undefined || raw === "") return fallback
  const n = Number(raw)
  if (!Number.isInteger(n) || n <= 0) throw new Error(`${name} must be a positive integer, got ${raw}`)
  return n
}

const gpuIds = Array.from({ length: int("BENCH_NUM_GPUS", 1) }, (_, i) => `gpu-${i}`)
const gpu = (id: string) => ({ id, device: process.env.BENCH_DEVICE ?? "sim" })

const config: TopologyInput = {
  runners: [{ name: "bench", roles: ["gateway", "gpu"], region: "local", gpus: gpuIds }],
  pools: {
    default: {
      model: "default",
      gpus: [gpu(gpuIds[0]!), ...gpuIds.slice(1).map(gpu)],
      engine: {
        kv_cache_bytes: int("BENCH_KV_CACHE_BYTES", 8 * 1024 * 1024 * 1024),
        max_num_batched_tokens: int("BENCH_MAX_NUM_BATCHED_TOKENS", 8192),
        max_num_seqs: int("BENCH_MAX_NUM_SEQS", 2048),
        num_slots: int("BENCH_NUM_SLOTS", 4096)
      }
    }
  },
  // Generous limits: the benchmark measures serving, not rate limiting.
  tiers: {
    bench: { pool: "default", priority: 0, rpm: 100_000_000, tpm: 2_000_000_000, ttft_p99_ms: int("BENCH_TTFT_P99_MS", 800) }
  },
  default_tier: "bench",
  generation: {
    max_tokens: 256,
    temperature: 0.7,
    top_p: 0.95,
    top_k: 0,
    client_buffer_tokens: int("BENCH_CLIENT_BUFFER_TOKENS", 64)
  }
}

export default config
