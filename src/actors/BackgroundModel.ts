/**
 * Model calls that are not a conversation's turn (a summary, facts mined from a conversation):
 * greedy, as a sequence of the lowest priority on one of a pool's GPUs, read from a TurnStream
 * of this runner. The DecodeSlot runs it like a turn, but its `purpose` keeps it out of the
 * conversation's history (Conversation.layerTurnFinisher).
 */
import { Context, Duration, Effect, Layer, Stream } from "effect"
import { type ConversationId, TurnId } from "../runtime/Domain.js"
import { EngineError } from "../runtime/Errors.js"
import { type LoadedModel, Models } from "../runtime/Models.js"
import { lookup, TopologyService } from "../runtime/Topology.js"
import { TurnStreams } from "../runtime/TurnStream.js"
import { DecodeSlot } from "./DecodeSlot.js"
import { GpuScheduler, shardGroupOf, type SlotReservation } from "./GpuScheduler.js"
import { quietly } from "./internal/callTimeout.js"
import { askGpu, gpuOrder } from "./internal/gpuOrder.js"

/** Background sequences are served after every tier's turns. */
const BACKGROUND_PRIORITY = 1_000
/** How long a GPU may queue one before it starts. */
const BACKGROUND_TTFT_TARGET_MS = 60_000
/** The longest one may take. */
const BACKGROUND_TIMEOUT = Duration.minutes(2)

export interface BackgroundRequest {
  readonly pool: string
  /** The conversation it is about (its turn id is `<id>:<purpose>`). */
  readonly conversationId: ConversationId
  /** The prompt's token ids, for the pool's model. */
  readonly prompt: (model: LoadedModel) => Effect.Effect<ReadonlyArray<number>>
  readonly maxTokens: number
  readonly purpose: "summary" | "facts"
}

export class BackgroundModel extends Context.Tag("chat/BackgroundModel")<BackgroundModel, {
  /**
   * The generated text. EngineError: `unknown_pool`, `overloaded` (every GPU of the pool
   * refused it), `timeout`, or the generation's own failure.
   */
  readonly generate: (request: BackgroundRequest) => Effect.Effect<string, EngineError>
}>() {}

export const layer = Layer.effect(
  BackgroundModel,
  Effect.gen(function*() {
    const models = yield* Models
    const topology = yield* TopologyService
    const streams = yield* TurnStreams
    const gpus = yield* GpuScheduler.client
    const slots = yield* DecodeSlot.client
    return BackgroundModel.of({
      generate: (request) =>
        Effect.gen(function*() {
          const model = models.get(request.pool)
          const pool = lookup(topology.pools, request.pool)
          if (model === undefined || pool === undefined) return yield* new EngineError({ code: "unknown_pool", message: request.pool })
          const promptIds = [...(yield* request.prompt(model))]
          const order = gpuOrder(pool.gpus.map((g) => g.id))
          let reserved: SlotReservation | undefined
          for (const gpuId of order) {
            const acquired = yield* askGpu(
              gpuId,
              gpus(gpuId).AcquireSlot({
                priority: BACKGROUND_PRIORITY,
                num_prompt_tokens: promptIds.length,
                ttft_target_ms: BACKGROUND_TTFT_TARGET_MS
              }),
              Duration.seconds(10)
            ).pipe(Effect.either)
            if (acquired._tag === "Right") {
              reserved = acquired.right
              break
            }
            // The pool's GPUs share one KV cache size: no other takes it either.
            if (acquired.left._tag === "PromptTooLong") return yield* new EngineError({ code: "start_failed", message: `${request.purpose}: PromptTooLong` })
          }
          if (reserved === undefined) return yield* new EngineError({ code: "overloaded", message: `no GPU of pool ${request.pool} took the ${request.purpose}` })
          const stream = streams.make(topology.generation.client_buffer_tokens)
          // Interrupted before it is read (a Start cut short): the slot's sequence stops then.
          stream.cancelIfNotAttachedWithin(15_000)
          const slotId = reserved.slot_id
          const started = yield* slots(slotId).Start({
            reservation_id: reserved.reservation_id,
            pool: request.pool,
            conversation_id: request.conversationId,
            turn_id: TurnId.make(`${request.conversationId}:${request.purpose}`),
            stream_id: stream.id,
            prompt_token_ids: promptIds,
            max_tokens: Math.max(1, Math.min(request.maxTokens, model.maxModelLen - promptIds.length)),
            sampling: { temperature: 0, top_p: 1, top_k: 0, seed: 0 },
            priority: BACKGROUND_PRIORITY,
            stop: [],
            purpose: request.purpose
          }).pipe(
            // PromptTooLong and UnknownGpu gave the slot back (or there is none); a message not delivered did not.
            Effect.mapError((e) =>
              e._tag === "EngineError"
                ? e
                : new EngineError({ code: e._tag === "PromptTooLong" || e._tag === "UnknownGpu" ? "start_failed" : "unavailable", message: `${request.purpose}: ${e._tag}` })
            ),
            Effect.either
          )
          if (started._tag === "Left") {
            stream.cancel()
            if (started.left.code === "unavailable") yield* quietly(gpus(shardGroupOf(slotId)).ReleaseSlot(reserved))
            return yield* started.left
          }
          return yield* stream.toStream().pipe(
            Stream.runFold("", (acc, event) => event._tag === "Token" ? acc + event.text : acc),
            Effect.timeoutFail({ duration: BACKGROUND_TIMEOUT, onTimeout: () => new EngineError({ code: "timeout", message: `${request.purpose} generation timed out` }) }),
            Effect.mapError((e) => e._tag === "EngineError" ? e : new EngineError({ code: "generation_failed", message: e.message })),
            Effect.onInterrupt(() => Effect.sync(() => stream.cancel())),
            Effect.tapError(() => Effect.sync(() => stream.cancel()))
          )
        })
    })
  })
)
