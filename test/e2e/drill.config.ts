/**
 * Topology of the fault drills (test/e2e/drills.test.ts): the default one-runner CPU setup
 * with its running and waiting bounds from the environment (DRILL_MAX_NUM_SEQS,
 * DRILL_NUM_SLOTS), so that overload is reachable with a few clients, and a TTFT target that
 * a restarting engine's queue does not reach (a turn sent meanwhile must wait, not be refused).
 */
import type { TopologyInput } from "../../src/runtime/Topology.js"

const int = (name: string, fallback: number) => Number(process.env[name] ?? fallback)

const config: TopologyInput = {
  runners: [{ name: "local", roles: ["gateway", "gpu"], region: "local", gpus: ["gpu-0"] }],
  pools: {
    mini: {
      model: "default",
      gpus: [{ id: "gpu-0", device: "cpu" }],
      engine: {
        kv_cache_bytes: 64 * 1024 * 1024,
        max_num_batched_tokens: 512,
        max_num_seqs: int("DRILL_MAX_NUM_SEQS", 64),
        num_slots: int("DRILL_NUM_SLOTS", 256)
      }
    }
  },
  // A TTFT target far above what the drills' 4 running seats cause: these drills bound waiting
  // by slots (DRILL_NUM_SLOTS); refusal by TTFT target is tested in test/integration/gpu-worker.test.ts.
  tiers: { free: { pool: "mini", priority: 1, rpm: 60, tpm: 100_000, ttft_p99_ms: 60_000 } },
  default_tier: "free",
  generation: { max_tokens: 256, temperature: 0.7, top_p: 0.95, top_k: 0, client_buffer_tokens: 64 }
}

export default config
