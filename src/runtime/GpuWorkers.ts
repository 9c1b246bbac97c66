/**
 * The GpuWorkers of the GPUs this runner hosts (topology `runners[].gpus`), keyed by GPU id.
 * Built once per runner process; the GpuScheduler and DecodeSlot entities (pinned here by
 * shard group) look their worker up by id.
 */
import { mkdirSync } from "node:fs"
import { tmpdir } from "node:os"
import { join } from "node:path"
import { Context, Duration, Effect, Layer } from "effect"
import { EngineError } from "./Errors.js"
import * as GpuWorker from "./GpuWorker.js"
import { Models } from "./Models.js"
import { TopologyService } from "./Topology.js"

export interface GpuWorkersService {
  readonly get: (gpuId: string) => GpuWorker.GpuWorker | undefined
  readonly all: ReadonlyArray<GpuWorker.GpuWorker>
  /**
   * A drain: every GPU stops admitting, and this waits until their running and waiting
   * sequences have ended, or `graceMs` passed. @returns how many sequences were left.
   */
  readonly drain: (graceMs: number) => Effect.Effect<number>
}

export class GpuWorkers extends Context.Tag("chat/GpuWorkers")<GpuWorkers, GpuWorkersService>() {}

export interface GpuWorkersOptions {
  /** Name of this runner in the topology. */
  readonly runnerName: string
  /** Path of the `llm-engine` binary. */
  readonly engineBinary: string
  readonly threads?: number | undefined
  /** Forward engine stderr to ours with this prefix. */
  readonly logEngine?: boolean | undefined
  /**
   * Directory of the engines' ipc sockets (`engine-<gpu>.sock`), so operators and tests can
   * ask an engine for `info`; default: a per-process name in the temp directory.
   */
  readonly socketDir?: string | undefined
}

export const layer = (options: GpuWorkersOptions): Layer.Layer<GpuWorkers, EngineError, TopologyService | Models> =>
  Layer.scoped(
    GpuWorkers,
    Effect.gen(function*() {
      const topology = yield* TopologyService
      const models = yield* Models
      const hosted = new Set(topology.runners.find((r) => r.name === options.runnerName)?.gpus ?? [])
      const workers = new Map<string, GpuWorker.GpuWorker>()
      // RUN_DIR need not exist yet: the engines bind their sockets there.
      const socketDir = options.socketDir
      if (socketDir !== undefined && hosted.size > 0) {
        yield* Effect.try({
          try: () => mkdirSync(socketDir, { recursive: true }),
          catch: (e) => new EngineError({ code: "start_failed", message: `cannot create the engine socket directory ${socketDir}: ${String(e)}` })
        })
      }
      for (const [poolName, pool] of Object.entries(topology.pools)) {
        const model = models.get(poolName)!
        for (const gpu of pool.gpus) {
          if (!hosted.has(gpu.id) || workers.has(gpu.id)) continue
          const worker = yield* GpuWorker.make({
            gpuId: gpu.id,
            binary: options.engineBinary,
            modelDir: model.modelDir,
            device: gpu.device,
            // ipc paths are limited to ~107 bytes: keep them short and per-process.
            endpoint: options.socketDir === undefined
              ? `ipc://${join(tmpdir(), `llm-engine-${process.pid}-${gpu.id}.sock`)}`
              : `ipc://${join(options.socketDir, `engine-${gpu.id}.sock`)}`,
            kvCacheBytes: pool.engine.kv_cache_bytes,
            maxNumBatchedTokens: pool.engine.max_num_batched_tokens,
            simTimeScale: pool.engine.sim_time_scale,
            maxNumSeqs: pool.engine.max_num_seqs,
            numSlots: pool.engine.num_slots,
            enablePrefixCaching: pool.engine.enable_prefix_caching,
            bufferTokens: topology.generation.client_buffer_tokens,
            threads: options.threads,
            logPrefix: options.logEngine ? `[engine ${gpu.id}]` : undefined
          })
          yield* Effect.logInfo(
            `engine ${gpu.id} ready: ${worker.engineInfo.model.architecture} on ${worker.engineInfo.device}, ` +
              `${worker.engineInfo.num_blocks} KV blocks of ${worker.engineInfo.block_size} tokens`
          )
          workers.set(gpu.id, worker)
        }
      }
      const all = [...workers.values()]
      const numLive = Effect.map(Effect.forEach(all, (w) => w.stats), (stats) => stats.reduce((n, s) => n + s.numRunning + s.numWaiting, 0))
      return {
        get: (id) => workers.get(id),
        all,
        drain: (graceMs) =>
          Effect.gen(function*() {
            for (const w of all) w.stopAdmitting()
            const deadline = Date.now() + graceMs
            while ((yield* numLive) > 0 && Date.now() < deadline) yield* Effect.sleep(Duration.millis(50))
            return yield* numLive
          })
      }
    })
  )
