/**
 * DecodeSlot entity `{gpu}/{slot}`: one sequence's life on its GPU.
 *
 * `Start` queues the sequence in the GPU's scheduler and returns; from then on the GPU step
 * loop calls the slot's sink with each sampled token, once per step (a step's tokens go out in
 * slices of 4 ms, with the event loop turning between them): the sink
 * detokenizes incrementally, applies stop strings and writes the text into the turn's
 * TurnStream, in this process or on the gateway runner that holds it (DataPlane). A full reader pauses the sequence (backpressure) until it
 * drains. At the end the slot reports the turn to its owner through `TurnFinisher` (the
 * Conversation entity stores it), then writes the terminal `done` (or `error`) event, and the
 * slot is free again.
 *
 * `Cancel` (POST cancel) and a reader that goes away (disconnect) stop the sequence: its KV
 * blocks are free before the next scheduler step, and the turn ends as `cancelled`.
 *
 * Slot state lives in the runner's RunningSlots (with the engine that holds the sequence, not
 * in the entity instance), so an entity that is idle between messages may be reaped while its
 * sequence runs. `Attach` moves the output to a reader that resumes from the slot's own buffer
 * when the turn log (Redis) is unavailable.
 */
import { ClusterSchema, Entity } from "@effect/cluster"
import { Rpc } from "@effect/rpc"
import { Context, Duration, Effect, Either, Layer, Runtime, Schema } from "effect"
import { ConversationId, DoneEvent, FinishReason, noValidation, TokenIds, TurnId, TurnStatus, Usage } from "../runtime/Domain.js"
import { EngineError, PromptTooLong, StorageError } from "../runtime/Errors.js"
import type { SeqHandle } from "../runtime/GpuWorker.js"
import { GpuWorkers } from "../runtime/GpuWorkers.js"
import { Models } from "../runtime/Models.js"
import { DataPlane } from "../runtime/DataPlane.js"
import { Moderation, repetitionGuard, type Verdict } from "../runtime/Moderation.js"
import { TurnEventLog } from "../runtime/TurnEventLog.js"
import { TurnStreamId } from "../runtime/TurnStream.js"
import { shardGroupOf, UnknownGpu } from "./GpuScheduler.js"
import { RunningSlots } from "./internal/runningSlots.js"
import { heldBack, StopStrings } from "./internal/stopStrings.js"

export const Sampling = Schema.Struct({
  temperature: Schema.Number,
  top_p: Schema.Number,
  top_k: Schema.Int,
  seed: Schema.Int
})

export const StartPayload = Schema.Struct({
  pool: Schema.String,
  conversation_id: ConversationId,
  turn_id: TurnId,
  /** The gateway's TurnStream that receives the text. */
  stream_id: TurnStreamId,
  prompt_token_ids: TokenIds,
  max_tokens: Schema.Int,
  sampling: Sampling,
  priority: Schema.Int,
  stop: Schema.Array(Schema.String),
  /**
   * Its text must not be kept at rest (a zero-retention org's turn, with the turn log in
   * Redis): nothing of it is logged, so resuming and failover rely on the slot itself.
   */
  ephemeral: Schema.optional(Schema.Boolean),
  /** A conversation's own turn (absent), or background work on it (BackgroundModel): not stored as a turn. */
  purpose: Schema.optional(Schema.Literal("summary", "facts")),
  /**
   * A failover: the turn continues here after its GPU runner was lost. `token_ids` (generated
   * there, as logged) are prefilled after the prompt; text and event indices go on from
   * `text` and `num_events`. The same sampling seed gives the same tokens from there on.
   */
  resume: Schema.optional(Schema.Struct({
    num_events: Schema.Int,
    text: Schema.String,
    token_ids: TokenIds
  }))
})
export type StartPayload = typeof StartPayload.Type

/** What a slot's sequence was started with, without a failover's `resume`. */
export type StartRequest = Omit<StartPayload, "resume">

export const DecodeSlot = Entity.make("DecodeSlot", [
  /**
   * Starts the turn in this slot, which AcquireSlot reserved as `reservation_id`; fails with
   * `slot_expired` unless that reservation is the slot's live one (see GpuWorker.claimSlot).
   */
  Rpc.make("Start", {
    payload: { ...StartPayload.fields, reservation_id: Schema.Int },
    error: Schema.Union(EngineError, PromptTooLong, UnknownGpu)
  }),
  /**
   * Stops the slot's sequence of `turn_id`, if it runs it (a Cancel that arrives late finds
   * the slot's next turn, which it must leave alone). @returns whether it ran.
   */
  Rpc.make("Cancel", { payload: { turn_id: TurnId }, success: Schema.Boolean }),
  /**
   * Stops the slot's sequence of `turn_id`, if it runs it, without ending the turn: no
   * FinishTurn, no terminal event. Failover sends it to a slot it gave up on (its runner did
   * not answer for a while, and may only have been slow): the turn goes on elsewhere.
   */
  Rpc.make("Abandon", { payload: { turn_id: TurnId }, success: Schema.Boolean }),
  /**
   * A reader resumes `turn_id` from this slot's own buffer (the turn log is unavailable): its
   * text goes to `stream_id` from token event `after_index + 1` on. @returns whether it could.
   */
  Rpc.make("Attach", { payload: { turn_id: TurnId, stream_id: TurnStreamId, after_index: Schema.Int }, success: Schema.Boolean })
]).annotate(ClusterSchema.ShardGroup, shardGroupOf)
  .annotate(ClusterSchema.ClientTracingEnabled, false) // no trace exporter (main.ts): spans would only cost CPU

/** How a turn ended, as the slot reports it to the turn's owner. */
export const FinishedTurn = Schema.Struct({
  conversation_id: ConversationId,
  turn_id: TurnId,
  /** The DecodeSlot that ran it: after a failover, a report from the earlier slot is ignored. */
  slot_id: Schema.String,
  text: Schema.String,
  status: TurnStatus,
  finish_reason: FinishReason,
  num_prompt_tokens: Schema.Int,
  num_completion_tokens: Schema.Int,
  /**
   * The generated token ids, when `text` is exactly their decoding (completed, no stop string
   * cut, no character replaced): the Conversation reuses them in later prompts.
   */
  completion_token_ids: Schema.optional(TokenIds),
  /** The verdict that stopped a `filtered` turn (JSON). */
  moderation_verdict: Schema.optional(Schema.String),
  /** As the turn was started with (a summary's is not the conversation's turn). */
  purpose: Schema.optional(Schema.Literal("summary", "facts"))
})
export type FinishedTurn = typeof FinishedTurn.Type

/**
 * Where a slot reports its finished turn (the Conversation entity, which stores it). The
 * slot writes the terminal event only after this succeeds, so a client that saw `done` finds
 * the turn in the history.
 */
export class TurnFinisher extends Context.Tag("chat/TurnFinisher")<TurnFinisher, {
  /**
   * Reports an ended turn to its owner. @returns false when the turn had been moved to another
   * slot (a failover): the report is void and the slot writes no end (the new slot does).
   */
  readonly finish: (turn: FinishedTurn) => Effect.Effect<boolean, StorageError | EngineError>
}>() {}

export const layer = Layer.unwrapEffect(Effect.gen(function*() {
  const workers = yield* GpuWorkers
  const models = yield* Models
  const dataPlane = yield* DataPlane
  const eventLog = yield* TurnEventLog
  const finisher = yield* TurnFinisher
  const moderation = yield* Moderation
  const runFork = Runtime.runFork(yield* Effect.runtime<never>())
  const running = yield* RunningSlots

  return DecodeSlot.toLayer(
    Effect.gen(function*() {
      const address = yield* Entity.CurrentAddress
      const slotId = address.entityId
      const gpuId = shardGroupOf(slotId)
      const slot = Number(slotId.split("/")[1])

      const start = (payload: StartPayload, reservationId: number) =>
        Effect.gen(function*() {
          const log: Pick<typeof eventLog, "append"> = payload.ephemeral === true ? { append: () => {} } : eventLog
          if (running.has(slotId)) return yield* new EngineError({ code: "slot_busy", message: `slot ${slotId} is running` })
          const worker = workers.get(gpuId)
          if (worker === undefined) return yield* new UnknownGpu({ gpu_id: gpuId })
          if (!worker.claimSlot(slot, reservationId)) {
            return yield* new EngineError({ code: "slot_expired", message: `slot ${slotId} was not reserved (its reservation expired)` })
          }
          // From here on a failed Start gives the slot back (claimed from AcquireSlot's reservation).
          const fail = <E>(error: E) => Effect.zipRight(worker.releaseSlot(slot), Effect.fail(error))
          const model = models.get(payload.pool)
          if (model === undefined) return yield* fail(new EngineError({ code: "unknown_pool", message: payload.pool }))
          const first = dataPlane.sink(payload.stream_id, payload.resume?.num_events ?? 0)
          if (first === undefined) {
            return yield* fail(
              new EngineError({ code: "stream_not_found", message: `no open token stream ${payload.stream_id}` })
            )
          }

          /** Where the text goes: the turn's reader, or one that resumed it from this slot (Attach). */
          let stream = first
          const resume = payload.resume
          /** Token event index of `deltas[0]`: 0, or where this slot took the turn over. */
          const firstIndex = resume?.num_events ?? 0
          /** The text of every token event this slot wrote (a resuming reader's replay). */
          const deltas: Array<string> = []
          const detokenizer = model.tokenizer.newDetokenizer()
          // A failover continues the detokenizer's state where the lost slot's text ended.
          let decodedBefore = ""
          if (resume !== undefined) for (const id of resume.token_ids) decodedBefore += detokenizer.push(id)
          /** The text a lost slot wrote before this one took over (a failover); "" otherwise. */
          const textBefore = resume?.text ?? ""
          /**
           * The turn's text is `textBefore` + `deltas`, joined once at its end: one string per
           * token concatenated onto the text would keep a rope node per token alive until then.
           */
          const textOf = () => textBefore + deltas.join("")
          // A failover goes on with what the lost slot held back as the possible start of a
          // stop string (its logged ids decode past its logged text).
          const stops = payload.stop.length > 0 ? new StopStrings(payload.stop, heldBack(decodedBefore, textBefore)) : undefined
          /** The generated ids while `text` is exactly their decoding (see FinishedTurn). */
          let tokenIds: Array<number> | undefined = resume === undefined ? [] : undefined
          let numTokens = resume?.token_ids.length ?? 0
          /** Prompt tokens the GPU's prefix cache served (OpenAI's `cached_tokens`). */
          let numCachedTokens = 0
          let handle: SeqHandle | undefined
          let ended = false
          /** Token events written so far: the next one's index (as the stream numbers them). */
          let numEvents = resume?.num_events ?? 0
          /** Tokens generated since the last token event: logged with the next one. */
          let unloggedIds: Array<number> = []
          const failStream = (code: string, message: string) => {
            log.append(payload.turn_id, { index: numEvents, kind: "error", code, message })
            stream.fail(code, message)
          }
          const outputCheck = moderation.outputCheck()
          /** Text the output check holds back (see OutputCheck.holding). */
          let heldText = ""
          const loops = repetitionGuard()
          // A failover goes on where the lost slot was: both checks see what it generated (else
          // a loop already under way would need 16 more repeats, and the text would differ
          // from an undisturbed run's).
          if (resume !== undefined) {
            outputCheck.push(resume.text)
            for (const id of resume.token_ids) loops.push(id)
          }
          /** The verdict that stopped the turn (output moderation), if one did. */
          let verdict: Verdict | undefined
          const end = (status: TurnStatus, finishReason: FinishReason, error?: EngineError) => {
            if (ended) return
            ended = true
            running.delete(slotId)
            runFork(
              worker.releaseSlot(slot).pipe(
                Effect.zipRight(finisher.finish({
                  conversation_id: payload.conversation_id,
                  turn_id: payload.turn_id,
                  slot_id: slotId,
                  text: textOf(),
                  status,
                  finish_reason: finishReason,
                  num_prompt_tokens: payload.prompt_token_ids.length,
                  num_completion_tokens: numTokens,
                  ...(status === "completed" && tokenIds !== undefined ? { completion_token_ids: tokenIds } : {}),
                  ...(verdict === undefined ? {} : { moderation_verdict: JSON.stringify({ category: verdict.category }) }),
                  ...(payload.purpose === undefined ? {} : { purpose: payload.purpose })
                })),
                Effect.tapError((e) => Effect.logError(`turn ${payload.turn_id} could not be stored`, e)),
                Effect.match({
                  onFailure: (e) => failStream("storage_error", `the turn could not be stored: ${e.message}`),
                  onSuccess: (taken) => {
                    if (!taken) return void stream.drop?.()
                    if (error !== undefined) return failStream("generation_failed", `EngineError: ${error.message}`)
                    if (status === "filtered") return failStream("content_filter", "The reply was stopped by content moderation")
                    const usage = {
                      prompt_tokens: payload.prompt_token_ids.length,
                      completion_tokens: numTokens,
                      prompt_tokens_details: { cached_tokens: numCachedTokens }
                    }
                    log.append(payload.turn_id, { index: numEvents, kind: "done", done: { turn_id: payload.turn_id, finish_reason: finishReason, usage } })
                    stream.done(new DoneEvent({ turn_id: payload.turn_id, finish_reason: finishReason, usage: new Usage(usage, noValidation) }, noValidation))
                  }
                })
              )
            )
          }
          const started = worker.start(
            {
              promptTokenIds: resume === undefined ? payload.prompt_token_ids : [...payload.prompt_token_ids, ...resume.token_ids],
              maxTokens: payload.max_tokens - (resume?.token_ids.length ?? 0),
              sampling: payload.sampling,
              priority: payload.priority
            },
            {
              onToken: (tokenId, finishReason, cached) => {
                if (ended) return
                numCachedTokens = cached
                numTokens++
                unloggedIds.push(tokenId)
                // The end-of-sequence token is not part of the text.
                if (finishReason !== "stop") tokenIds?.push(tokenId)
                let delta = detokenizer.push(tokenId)
                if (finishReason !== undefined) delta += detokenizer.flush()
                // PostgreSQL text cannot hold U+0000; the client sees what is stored.
                if (delta.includes("\u0000")) {
                  delta = delta.replaceAll("\u0000", "\uFFFD")
                  tokenIds = undefined
                }
                let finish: FinishReason | undefined = finishReason
                if (stops !== undefined) {
                  const cut = stops.push(delta)
                  delta = cut.text
                  if (cut.stopped) {
                    finish = "stop"
                    tokenIds = undefined
                    if (finishReason === undefined) handle?.cancel()
                  }
                }
                const repeating = finish === undefined && loops.push(tokenId)
                if (repeating) {
                  finish = "repetition"
                  // Stopped here, the detokenizer may hold bytes of a character: the text is
                  // not then exactly the ids' decoding.
                  tokenIds = undefined
                }
                // Ending for another reason: what might have begun a stop string goes out.
                if (finish !== undefined && stops !== undefined) delta += stops.flush()
                // Output moderation before the text goes out: a flagged delta is never sent, nor
                // one the check holds until the next shows whether a blocked word ends there.
                const flagged = outputCheck.push(delta, finish !== undefined)
                if (flagged !== undefined) {
                  verdict = flagged
                  if (finishReason === undefined) handle?.cancel()
                  return end("filtered", "content_filter")
                }
                if (outputCheck.holding) {
                  heldText += delta
                  delta = ""
                } else if (heldText.length > 0) {
                  delta = heldText + delta
                  heldText = ""
                }
                if (repeating) handle?.cancel()
                if (delta.length > 0) {
                  deltas.push(delta)
                  log.append(payload.turn_id, { index: numEvents++, kind: "token", text: delta, ids: unloggedIds })
                  unloggedIds = []
                  if (!stream.token(delta)) handle?.pause()
                }
                if (finish !== undefined) end("completed", finish)
              },
              onFailed: (error) => end("failed", "error", error)
            }
          )
          if (Either.isLeft(started)) return yield* fail(started.left)
          // The turn is in the log before its first token: a follower that comes now finds it,
          // and so does its Conversation's next owner after a shard move (see Conversation.ts).
          const { resume: _, ...request } = payload
          log.append(payload.turn_id, { index: -1, kind: "start", slot_id: slotId, request })
          const h = started.right
          handle = h
          const cancel = () => {
            if (!h.cancel()) return false
            end("cancelled", "cancelled")
            return true
          }
          const abandon = () => {
            if (ended) return false
            ended = true
            running.delete(slotId)
            h.cancel()
            stream.drop?.()
            runFork(worker.releaseSlot(slot))
            return true
          }
          const attach = (streamId: TurnStreamId, afterIndex: number): boolean => {
            if (ended || afterIndex + 1 < firstIndex || afterIndex + 1 > numEvents) return false
            const sink = dataPlane.sink(streamId, afterIndex + 1)
            if (sink === undefined) return false
            // One reader per turn: the earlier one is told, and its departure no longer cancels.
            const earlier = stream
            stream = sink
            earlier.fail("stream_resumed", "this turn's stream was resumed by another connection")
            for (let i = afterIndex + 1; i < numEvents; i++) sink.token(deltas[i - firstIndex]!)
            sink.setProducer({ onDrain: () => h.resume(), onCancel: cancel })
            h.resume() // the earlier reader may have paused it
            return true
          }
          running.set(slotId, { turnId: payload.turn_id, request, cancel, abandon, attach })
          stream.setProducer({ onDrain: () => h.resume(), onCancel: cancel })
        })

      return DecodeSlot.of({
        Start: ({ payload: { reservation_id, ...payload } }) => start(payload, reservation_id),
        Cancel: ({ payload }) =>
          Effect.sync(() => {
            const live = running.get(slotId)
            return live?.turnId === payload.turn_id && live.cancel()
          }),
        Abandon: ({ payload }) =>
          Effect.sync(() => {
            const live = running.get(slotId)
            return live?.turnId === payload.turn_id && live.abandon()
          }),
        Attach: ({ payload }) =>
          Effect.sync(() => {
            const live = running.get(slotId)
            return live?.turnId === payload.turn_id && live.attach(payload.stream_id, payload.after_index)
          })
      })
    }),
    // Stateless between messages (the sequence lives in RunningSlots), but kept for a minute:
    // slots are reused last-freed-first, so a busy GPU's slot instances live on instead of
    // being made and reaped per turn. Reaped after 1 s, the idle reaper closed hundreds at once
    // every 5 s at 2,048 streams: 50-160 ms event-loop stalls (bench/results/event-loop.json).
    // The cost: ~20 KB per slot used in the last minute.
    { concurrency: "unbounded", maxIdleTime: Duration.minutes(1) }
  )
}))

