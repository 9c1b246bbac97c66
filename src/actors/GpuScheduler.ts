/**
 * GpuScheduler entity, one per GPU (entity id = GPU id, e.g. "gpu-0"), pinned by shard group
 * to the runner that owns the GPU and its engine. It is the GPU's address in the cluster:
 * admission (a DecodeSlot for a new generation) and state (engine and scheduler counters).
 * The continuous-batching step loop itself runs in that runner's GpuWorker.
 */
import { ClusterSchema, Entity } from "@effect/cluster"
import { Rpc } from "@effect/rpc"
import { Effect, Either, Schema } from "effect"
import { EngineError, PromptTooLong } from "../runtime/Errors.js"
import { TokenIds } from "../runtime/Domain.js"
import { GpuWorkers } from "../runtime/GpuWorkers.js"
import { RunningSlots } from "./internal/runningSlots.js"

/** Every GPU-pinned entity id starts with its GPU id: "gpu-0", "gpu-0/17". */
export const shardGroupOf = (entityId: string): string => entityId.split("/")[0]!

/** The GPU refused a new sequence (GpuWorker.admit): every slot is taken, or its predicted wait is past the TTFT target. */
export class AdmissionRefused extends Schema.TaggedError<AdmissionRefused>()("AdmissionRefused", {
  gpu_id: Schema.String,
  reason: Schema.Literal("no_free_slot", "ttft_target", "draining"),
  message: Schema.String,
  retry_after_s: Schema.Int
}) {}
export class UnknownGpu extends Schema.TaggedError<UnknownGpu>()("UnknownGpu", { gpu_id: Schema.String }) {}

/** A slot that AcquireSlot reserved (`<gpu_id>/<index>`) and the reservation's id. */
export const SlotReservation = Schema.Struct({ slot_id: Schema.String, reservation_id: Schema.Int })
export type SlotReservation = typeof SlotReservation.Type

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
  /**
   * Admits a new sequence: reserves a DecodeSlot of this GPU (returned when the slot's
   * sequence ends, or by ReleaseSlot if it is never started), or refuses it. The Start (and a
   * ReleaseSlot) must carry the reservation's id: a message that the cluster delivers late,
   * after the runner restarted, then claims nothing.
   */
  Rpc.make("AcquireSlot", {
    payload: { priority: Schema.Int, num_prompt_tokens: Schema.Int, ttft_target_ms: Schema.Int },
    success: SlotReservation,
    error: Schema.Union(AdmissionRefused, UnknownGpu, PromptTooLong)
  }),
  /** Gives back a slot that AcquireSlot reserved and that was never started (that reservation only). */
  Rpc.make("ReleaseSlot", { payload: SlotReservation, error: UnknownGpu }),
  Rpc.make("Stats", { success: GpuStats, error: Schema.Union(UnknownGpu, EngineError) }),
  /** Answers while the GPU's runner is up (failover's liveness probe, one per GPU, not per turn). */
  Rpc.make("Ping", {}),
  /**
   * Whether each of `turns` runs on its slot (of this GPU), in order: failover's slot check,
   * one call per GPU and period for every turn a runner watches there. A slot that answers
   * false lost its turn (its runner restarted) or never ran it (a Start cut off).
   */
  Rpc.make("RunningTurns", {
    payload: { turns: Schema.Array(Schema.Struct({ slot_id: Schema.String, turn_id: Schema.String })) },
    success: Schema.Array(Schema.Boolean)
  }),
  /**
   * The slot of this GPU that runs `turn_id`, and what started it; null when none does. A
   * Conversation that took a turn over after a shard move asks its pool's GPUs this (the turn
   * log, which says it too, may be unavailable).
   */
  Rpc.make("FindTurn", {
    payload: { turn_id: Schema.String },
    success: Schema.NullOr(Schema.Struct({ slot_id: Schema.String, request: Schema.Unknown }))
  }),
  /**
   * The embedding of `token_ids` by this GPU's model (the engine's `embed`: last-token
   * pooling, unit norm; at most 512 tokens), between its steps.
   */
  Rpc.make("Embed", {
    payload: { token_ids: TokenIds },
    success: Schema.Array(Schema.Number),
    error: Schema.Union(UnknownGpu, EngineError)
  })
]).annotate(ClusterSchema.ShardGroup, shardGroupOf)
  .annotate(ClusterSchema.ClientTracingEnabled, false) // no trace exporter (main.ts): spans would only cost CPU

export const layer = GpuScheduler.toLayer(
  Effect.gen(function*() {
    const address = yield* Entity.CurrentAddress
    const gpuId = address.entityId
    const workers = yield* GpuWorkers
    const running = yield* RunningSlots
    const worker = Effect.suspend(() => {
      const w = workers.get(gpuId)
      return w === undefined ? Effect.fail(new UnknownGpu({ gpu_id: gpuId })) : Effect.succeed(w)
    })
    return GpuScheduler.of({
      AcquireSlot: ({ payload }) =>
        Effect.gen(function*() {
          // Before anything is stored for the turn: a prompt this GPU's KV cache cannot hold
          // is the client's 400, not a failed reply.
          const gpu = yield* worker
          const fits = gpu.checkPrompt(payload.num_prompt_tokens)
          if (Either.isLeft(fits)) return yield* fits.left
          const admitted = gpu.admit({
            priority: payload.priority,
            numPromptTokens: payload.num_prompt_tokens,
            ttftTargetMs: payload.ttft_target_ms
          })
          if (Either.isLeft(admitted)) {
            const { message, reason, retryAfterS } = admitted.left
            return yield* new AdmissionRefused({ gpu_id: gpuId, reason, message, retry_after_s: retryAfterS })
          }
          return { slot_id: `${gpuId}/${admitted.right.slot}`, reservation_id: admitted.right.reservationId }
        }),
      Ping: () => Effect.void,
      RunningTurns: ({ payload }) => Effect.sync(() => payload.turns.map((t) => running.get(t.slot_id)?.turnId === t.turn_id)),
      FindTurn: ({ payload }) =>
        Effect.sync(() => {
          for (const [slotId, live] of running) {
            if (live.turnId === payload.turn_id && shardGroupOf(slotId) === gpuId) return { slot_id: slotId, request: live.request }
          }
          return null
        }),
      ReleaseSlot: ({ payload }) =>
        Effect.map(worker, (w) => w.releaseReservation(Number(payload.slot_id.split("/")[1]), payload.reservation_id)),
      Embed: ({ payload }) => Effect.flatMap(worker, (w) => w.engine().embed(payload.token_ids)),
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
