/**
 * DecodeSlot entity `{gpu}/{slot}`: one sequence's life on its GPU. `Generate` queues the
 * sequence in the GPU's scheduler, turns sampled tokens into text with incremental
 * detokenization, applies stop strings and max tokens, and streams chunks to the caller.
 * The GpuWorker's per-sequence buffer is the bounded buffer to the client: when the reader
 * lags by `client_buffer_tokens`, the scheduler leaves the sequence out of steps.
 *
 * Interruption (client gone, cancel) closes the stream's scope: the sequence is cancelled and
 * its KV blocks are free before the next scheduler step; the slot is returned.
 */
import { ClusterSchema, Entity } from "@effect/cluster"
import { Rpc } from "@effect/rpc"
import { Effect, Option, Schema, Stream } from "effect"
import { FinishReason } from "../runtime/Domain.js"
import { EngineError, PromptTooLong } from "../runtime/Errors.js"
import { GpuWorkers } from "../runtime/GpuWorkers.js"
import { Models } from "../runtime/Models.js"
import { shardGroupOf, UnknownGpu } from "./GpuScheduler.js"

export const Sampling = Schema.Struct({
  temperature: Schema.Number,
  top_p: Schema.Number,
  top_k: Schema.Int,
  seed: Schema.Int
})

/** Text produced since the previous chunk; the last chunk carries `finish_reason`. */
export const SlotChunk = Schema.Struct({
  text: Schema.String,
  num_completion_tokens: Schema.Int,
  finish_reason: Schema.optional(FinishReason)
})
export type SlotChunk = typeof SlotChunk.Type

export const DecodeSlot = Entity.make("DecodeSlot", [
  Rpc.make("Generate", {
    payload: {
      pool: Schema.String,
      prompt_token_ids: Schema.Array(Schema.Int),
      max_tokens: Schema.Int,
      sampling: Sampling,
      priority: Schema.Int,
      stop: Schema.Array(Schema.String)
    },
    success: SlotChunk,
    error: Schema.Union(EngineError, PromptTooLong, UnknownGpu),
    stream: true
  })
]).annotate(ClusterSchema.ShardGroup, shardGroupOf)

/** Most tokens coalesced into one chunk when a reader lags behind. */
const MAX_TOKENS_PER_CHUNK = 64

/** Index of the first stop string in `text`, searching from `from`; -1 if none. */
const findStop = (text: string, stops: ReadonlyArray<string>, from: number): number => {
  let best = -1
  for (const stop of stops) {
    const i = text.indexOf(stop, Math.max(0, from - stop.length + 1))
    if (i >= 0 && (best < 0 || i < best)) best = i
  }
  return best
}

export const layer = DecodeSlot.toLayer(
  Effect.gen(function*() {
    const address = yield* Entity.CurrentAddress
    const gpuId = shardGroupOf(address.entityId)
    const slot = Number(address.entityId.split("/")[1])
    const workers = yield* GpuWorkers
    const models = yield* Models

    return DecodeSlot.of({
      Generate: ({ payload }) =>
        Stream.unwrapScoped(
          Effect.gen(function*() {
            const worker = workers.get(gpuId)
            if (worker === undefined) return yield* new UnknownGpu({ gpu_id: gpuId })
            yield* Effect.addFinalizer(() => worker.releaseSlot(slot))
            const model = models.get(payload.pool)
            if (model === undefined) return yield* new EngineError({ code: "unknown_pool", message: payload.pool })
            const seq = yield* worker.generate({
              promptTokenIds: payload.prompt_token_ids,
              maxTokens: payload.max_tokens,
              sampling: payload.sampling,
              priority: payload.priority
            })
            const detokenizer = model.tokenizer.newDetokenizer()
            let text = ""
            let numTokens = 0
            let done = false
            // One chunk per pull: every token buffered so far (one when the reader keeps up,
            // many when it lags). Failing with Option.none ends the stream after the final chunk.
            const next: Effect.Effect<SlotChunk, Option.Option<EngineError>> = Effect.gen(function*() {
              if (done) return yield* Effect.fail(Option.none())
              const events = yield* seq.takeAvailable(MAX_TOKENS_PER_CHUNK)
              let delta = ""
              let finish: FinishReason | undefined
              for (const event of events) {
                if (event._tag === "Failed") return yield* Effect.fail(Option.some(event.error))
                numTokens++
                delta += detokenizer.push(event.tokenId)
                if (event.finishReason !== undefined) {
                  delta += detokenizer.flush()
                  finish = event.finishReason
                  break
                }
              }
              if (payload.stop.length > 0 && delta.length > 0) {
                const at = findStop(text + delta, payload.stop, text.length)
                if (at >= 0) {
                  delta = (text + delta).slice(text.length, at)
                  finish = "stop"
                }
              }
              text += delta
              if (finish !== undefined) done = true
              return finish === undefined
                ? { text: delta, num_completion_tokens: numTokens }
                : { text: delta, num_completion_tokens: numTokens, finish_reason: finish }
            })
            return Stream.repeatEffectOption(next).pipe(
              Stream.filter((c) => c.text.length > 0 || c.finish_reason !== undefined)
            )
          })
        )
    })
  })
)
