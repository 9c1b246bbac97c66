/**
 * GpuScheduler entity, one per GPU (entity id = GPU id, e.g. "gpu-0"), pinned by shard group
 * to the runner that owns the GPU and its engine. It is the GPU's address in the cluster:
 * admission (a DecodeSlot for a new generation) and state (engine and scheduler counters).
 * The continuous-batching step loop itself runs in that runner's GpuWorker.
 */
import { ClusterSchema, Entity } from "@effect/cluster"
import { Rpc } from "@effect/rpc"
import { Effect, Schema } from "effect"
import { EngineError } from "../runtime/Errors.js"
import { GpuWorkers } from "../runtime/GpuWorkers.js"

/** Every GPU-pinned entity id starts with its GPU id: "gpu-0", "gpu-0/17". */
export const shardGroupOf = (entityId: string): string => entityId.split("/")[0]!

export class NoFreeSlot extends Schema.TaggedError<NoFreeSlot>()("NoFreeSlot", { gpu_id: Schema.String }) {}
export class UnknownGpu extends Schema.TaggedError<UnknownGpu>()("UnknownGpu", { gpu_id: Schema.String }) {}

export const GpuStats = Schema.Struct({
  gpu_id: Schema.String,
  device: Schema.String,
  num_blocks: Schema.Int,
  num_free_blocks: Schema.Int,
  num_running: Schema.Int,
  num_waiting: Schema.Int,
  num_steps: Schema.Int,
  num_engine_restarts: Schema.Int,
  engine_num_used_blocks: Schema.Int,
  engine_num_active_seqs: Schema.Int
})
export type GpuStats = typeof GpuStats.Type

export const GpuScheduler = Entity.make("GpuScheduler", [
  /** Reserves a DecodeSlot of this GPU; the slot is returned when its Generate stream ends. */
  Rpc.make("AcquireSlot", { success: Schema.String, error: Schema.Union(NoFreeSlot, UnknownGpu) }),
  Rpc.make("Stats", { success: GpuStats, error: Schema.Union(UnknownGpu, EngineError) })
]).annotate(ClusterSchema.ShardGroup, shardGroupOf)
  .annotate(ClusterSchema.ClientTracingEnabled, false) // no trace exporter (main.ts): spans would only cost CPU

export const layer = GpuScheduler.toLayer(
  Effect.gen(function*() {
    const address = yield* Entity.CurrentAddress
    const gpuId = address.entityId
    const workers = yield* GpuWorkers
    const worker = Effect.suspend(() => {
      const w = workers.get(gpuId)
      return w === undefined ? Effect.fail(new UnknownGpu({ gpu_id: gpuId })) : Effect.succeed(w)
    })
    return GpuScheduler.of({
      AcquireSlot: () =>
        Effect.gen(function*() {
          const slot = yield* (yield* worker).acquireSlot
          if (slot === undefined) return yield* new NoFreeSlot({ gpu_id: gpuId })
          return `${gpuId}/${slot}`
        }),
      Stats: () =>
        Effect.gen(function*() {
          const w = yield* worker
          const stats = yield* w.stats
          const info = yield* w.engine().info
          return {
            gpu_id: gpuId,
            device: info.device,
            num_blocks: stats.numBlocks,
            num_free_blocks: stats.numFreeBlocks,
            num_running: stats.numRunning,
            num_waiting: stats.numWaiting,
            num_steps: stats.numSteps,
            num_engine_restarts: stats.numEngineRestarts,
            engine_num_used_blocks: info.num_used_blocks,
            engine_num_active_seqs: info.num_active_seqs
          }
        })
    })
  }),
  // Admission must not queue behind a slow Stats call.
  { concurrency: "unbounded" }
)
