/**
 * A four-process cluster on this machine (`npm run cluster:local`): gateway runners gw-1
 * (HTTP 8081) and gw-2 (HTTP 8082), which hold the Conversation entities and serve the whole
 * API, and GPU runners gpu-1 and gpu-2, each with one simulated GPU (`device: "sim"`) of the
 * pool "mini". Every runner needs the PostgreSQL of DATABASE_URL.
 *
 * Ports: HTTP at CLUSTER_LOCAL_HTTP_BASE + 1, + 2 (default 8080); cluster RPC at
 * CLUSTER_LOCAL_PORT_BASE + 1..4 and the token data plane at CLUSTER_LOCAL_PORT_BASE + 11..14
 * (default 34400), so that tests can run several clusters side by side. Engine settings per
 * GPU: CLUSTER_LOCAL_MAX_NUM_SEQS (256), CLUSTER_LOCAL_NUM_SLOTS (512),
 * CLUSTER_LOCAL_KV_CACHE_BYTES (1 GiB) (the cluster benchmark sets the one-process bench's).
 */
import type { TopologyInput } from "../src/runtime/Topology.js"

const base = Number(process.env["CLUSTER_LOCAL_PORT_BASE"] ?? 34400)
const httpBase = Number(process.env["CLUSTER_LOCAL_HTTP_BASE"] ?? 8080)
const int = (name: string, fallback: number) => Number(process.env[name] ?? fallback)

const runner = (name: string, i: number, roles: Array<"gateway" | "gpu">, gpus: Array<string>) => ({
  name,
  roles,
  region: "local",
  gpus,
  host: "127.0.0.1",
  cluster_port: base + i,
  data_port: base + 10 + i,
  ...(roles.includes("gateway") ? { http_port: httpBase + i } : {})
})

const config: TopologyInput = {
  runners: [
    runner("gw-1", 1, ["gateway"], []),
    runner("gw-2", 2, ["gateway"], []),
    runner("gpu-1", 3, ["gpu"], ["sim-1"]),
    runner("gpu-2", 4, ["gpu"], ["sim-2"])
  ],
  pools: {
    mini: {
      model: "default",
      gpus: [{ id: "sim-1", device: "sim" }, { id: "sim-2", device: "sim" }],
      engine: {
        kv_cache_bytes: int("CLUSTER_LOCAL_KV_CACHE_BYTES", 1024 * 1024 * 1024),
        max_num_batched_tokens: 4096,
        max_num_seqs: int("CLUSTER_LOCAL_MAX_NUM_SEQS", 256),
        num_slots: int("CLUSTER_LOCAL_NUM_SLOTS", 512)
      }
    }
  },
  tiers: {
    free: { pool: "mini", priority: 1, rpm: 60, tpm: 100_000, ttft_p99_ms: 2000 },
    paid: { pool: "mini", priority: 0, rpm: 600, tpm: 1_000_000, ttft_p99_ms: 800 }
  },
  default_tier: "free",
  generation: { max_tokens: 256, temperature: 0.7, top_p: 0.95, top_k: 0, client_buffer_tokens: 64 }
}

export default config
