/**
 * Conversation entity, one per conversation id, sharded freely over gateway runners.
 *
 * SendTurn: appends the user turn durably (the acknowledgement point, signalled by the first
 * event `Accepted`), assembles the prompt (system prompt + history + new turn through the
 * model's chat template, dropping the oldest turns if the context is short), takes a
 * DecodeSlot from a GPU of the conversation's pool and re-streams its text as TokenEvents.
 * The assistant turn is appended when the stream ends: `completed` with the finish reason,
 * `cancelled` on Cancel or when the caller goes away, `failed` on an engine error. Every
 * stream that is not cut off ends with exactly one DoneEvent.
 */
import { randomInt } from "node:crypto"
import { Entity } from "@effect/cluster"
import { Rpc } from "@effect/rpc"
import { Deferred, Effect, Layer, Option, Schema, Stream } from "effect"
import {
  type ConversationId,
  DoneEvent,
  type FinishReason,
  TokenEvent,
  TurnId,
  type TurnStatus,
  Usage
} from "../runtime/Domain.js"
import {
  ConversationNotFound,
  EngineError,
  GenerationFailed,
  PromptTooLong,
  StorageError,
  TurnInProgress
} from "../runtime/Errors.js"
import { type LoadedModel, Models } from "../runtime/Models.js"
import type { ChatMessage } from "../runtime/Tokenizer.js"
import { ConversationStore } from "../runtime/Storage.js"
import { TopologyService } from "../runtime/Topology.js"
import { DecodeSlot } from "./DecodeSlot.js"
import { GpuScheduler } from "./GpuScheduler.js"

/** First event of a SendTurn stream: the user turn is durable. */
export class Accepted extends Schema.TaggedClass<Accepted>()("Accepted", {
  user_turn_id: TurnId,
  turn_id: TurnId,
  num_prompt_tokens: Schema.Int
}) {}

export const ConversationEvent = Schema.Union(Accepted, TokenEvent, DoneEvent)
export type ConversationEvent = typeof ConversationEvent.Type

export const SendTurnError = Schema.Union(
  ConversationNotFound,
  TurnInProgress,
  PromptTooLong,
  StorageError,
  EngineError,
  GenerationFailed
)

export const Conversation = Entity.make("Conversation", [
  Rpc.make("Create", {
    payload: { pool: Schema.String, system_prompt: Schema.NullOr(Schema.String) },
    error: StorageError
  }),
  Rpc.make("SendTurn", {
    payload: {
      content: Schema.String,
      max_tokens: Schema.optional(Schema.Int),
      temperature: Schema.optional(Schema.Number)
    },
    success: ConversationEvent,
    error: SendTurnError,
    stream: true
  }),
  /** Stops the streaming turn, if any. @returns whether one was running. */
  Rpc.make("Cancel", { success: Schema.Boolean, error: Schema.Union(ConversationNotFound, StorageError) })
])

interface Loaded {
  readonly pool: string
  readonly systemPrompt: string | null
  readonly history: Array<ChatMessage>
  nextSeq: number
}

/** Entity-client failures that mean "the cluster could not deliver": surfaced as a 503. */
const clusterUnavailable = (e: { readonly _tag: string }) =>
  new EngineError({ code: "unavailable", message: `cluster could not deliver the message (${e._tag})` })

/**
 * Token ids of the prompt for `history` + `content`, dropping the oldest turns until the
 * prompt leaves room for at least `minNewTokens`. Fails with PromptTooLong if even the system
 * prompt and the new turn alone do not fit.
 */
const buildPrompt = (
  model: LoadedModel,
  systemPrompt: string | null,
  history: ReadonlyArray<ChatMessage>,
  content: string,
  minNewTokens: number
): Effect.Effect<Array<number>, PromptTooLong> => {
  const system: Array<ChatMessage> = systemPrompt === null ? [] : [{ role: "system", content: systemPrompt }]
  const limit = model.maxModelLen - minNewTokens
  let first = 0
  for (;;) {
    const ids = model.tokenizer.encode(
      model.tokenizer.renderChat([...system, ...history.slice(first), { role: "user", content }])
    )
    if (ids.length <= limit) return Effect.succeed(ids)
    if (first >= history.length) {
      return Effect.fail(new PromptTooLong({ num_prompt_tokens: ids.length, max_model_len: model.maxModelLen }))
    }
    // Drop a whole exchange (user + assistant) so the history never starts mid-exchange.
    first += history[first]?.role === "user" && history[first + 1]?.role === "assistant" ? 2 : 1
  }
}

// The entity clients are made once for all Conversation entities: each one holds an RPC
// client, and making them per entity cost ~hundreds of KB per live conversation.
export const layer = Layer.unwrapEffect(Effect.gen(function*() {
  const gpus = yield* GpuScheduler.client
  const slots = yield* DecodeSlot.client
  return Conversation.toLayer(
  Effect.gen(function*() {
    const address = yield* Entity.CurrentAddress
    const id = address.entityId as string as ConversationId
    const store = yield* ConversationStore
    const models = yield* Models
    const topology = yield* TopologyService
    let loaded: Loaded | undefined
    let active: Deferred.Deferred<void> | undefined
    let nextGpu = 0

    const load = Effect.gen(function*() {
      if (loaded !== undefined) return loaded
      const row = yield* store.getConversation(id)
      if (Option.isNone(row)) return yield* new ConversationNotFound({ conversation_id: id })
      const turns = yield* store.listTurns(id, { limit: 100_000 })
      loaded = {
        pool: row.value.model,
        systemPrompt: row.value.system_prompt,
        history: turns.filter((t) => t.role !== "system" && t.status !== "failed").map((t) => ({ role: t.role, content: t.content })),
        nextSeq: turns.length === 0 ? 0 : turns[turns.length - 1]!.seq + 1
      }
      return loaded
    })

    const sendTurn = (input: { readonly content: string; readonly max_tokens?: number | undefined; readonly temperature?: number | undefined }) =>
      Effect.gen(function*() {
        // Claim the conversation before the first yield: handlers run concurrently.
        if (active !== undefined) return yield* new TurnInProgress({ conversation_id: id })
        const cancel = yield* Deferred.make<void>()
        active = cancel
        yield* Effect.addFinalizer(() => Effect.sync(() => void (active === cancel && (active = undefined))))

        const conv = yield* load
        const model = models.get(conv.pool)
        const pool = topology.pools[conv.pool]
        if (model === undefined || pool === undefined) {
          return yield* new EngineError({ code: "unknown_pool", message: `pool ${conv.pool} is not configured` })
        }
        const maxTokens = input.max_tokens ?? topology.generation.max_tokens
        // Checked before anything is stored: a rejected turn changes nothing.
        const promptIds = yield* buildPrompt(model, conv.systemPrompt, conv.history, input.content, Math.min(maxTokens, 16))
        const userSeq = conv.nextSeq
        yield* store.appendTurn({
          conversation_id: id,
          seq: userSeq,
          role: "user",
          content: input.content,
          status: "completed",
          num_prompt_tokens: null,
          num_completion_tokens: null
        })
        conv.nextSeq = userSeq + 2 // the assistant turn's seq is reserved now
        conv.history.push({ role: "user", content: input.content })

        const assistantSeq = userSeq + 1
        const turnId = TurnId.make(`${id}:${assistantSeq}`)
        let text = ""
        let numCompletionTokens = 0
        let finishReason: FinishReason | undefined
        let persisted = false
        const persist = (status: TurnStatus): Effect.Effect<void, StorageError> =>
          Effect.suspend(() => {
            if (persisted) return Effect.void
            persisted = true
            conv.history.push({ role: "assistant", content: text })
            return store.appendTurn({
              conversation_id: id,
              seq: assistantSeq,
              role: "assistant",
              content: text,
              status,
              num_prompt_tokens: promptIds.length,
              num_completion_tokens: numCompletionTokens
            }).pipe(Effect.asVoid)
          })
        // Caller gone (disconnect) or any other early end: the turn is kept as cancelled.
        yield* Effect.addFinalizer(() => persist("cancelled").pipe(Effect.ignoreLogged))

        const gpuId = pool.gpus[nextGpu++ % pool.gpus.length]!.id
        const slotId = yield* gpus(gpuId).AcquireSlot().pipe(
          Effect.catchTags({
            NoFreeSlot: (e) => Effect.fail(new EngineError({ code: "no_free_slot", message: `all decode slots of ${e.gpu_id} are busy` })),
            UnknownGpu: (e) => Effect.fail(new EngineError({ code: "unknown_gpu", message: e.gpu_id })),
            MailboxFull: (e) => Effect.fail(clusterUnavailable(e)),
            AlreadyProcessingMessage: (e) => Effect.fail(clusterUnavailable(e)),
            PersistenceError: (e) => Effect.fail(clusterUnavailable(e))
          })
        )
        const temperature = input.temperature ?? topology.generation.temperature
        const chunks = slots(slotId).Generate({
          pool: conv.pool,
          prompt_token_ids: promptIds,
          max_tokens: Math.min(maxTokens, model.maxModelLen - promptIds.length),
          sampling: {
            temperature,
            top_p: topology.generation.top_p,
            top_k: topology.generation.top_k,
            seed: randomInt(0, 2 ** 31)
          },
          priority: topology.tiers[topology.default_tier]!.priority,
          stop: []
        }).pipe(
          Stream.catchTags({
            UnknownGpu: (e) => Stream.fail(new EngineError({ code: "unknown_gpu", message: e.gpu_id })),
            MailboxFull: (e) => Stream.fail(clusterUnavailable(e)),
            AlreadyProcessingMessage: (e) => Stream.fail(clusterUnavailable(e)),
            PersistenceError: (e) => Stream.fail(clusterUnavailable(e))
          })
        )

        let index = 0
        const tokens = chunks.pipe(
          Stream.interruptWhen(Deferred.await(cancel)),
          Stream.tap((chunk) =>
            Effect.sync(() => {
              text += chunk.text
              numCompletionTokens = chunk.num_completion_tokens
              if (chunk.finish_reason !== undefined) finishReason = chunk.finish_reason
            })
          ),
          Stream.filter((chunk) => chunk.text.length > 0),
          Stream.map((chunk) => new TokenEvent({ index: index++, text: chunk.text })),
          Stream.catchAll((error) =>
            Stream.fromEffect(persist("failed").pipe(Effect.ignoreLogged)).pipe(
              Stream.drain,
              Stream.concat(Stream.fail(new GenerationFailed({ message: `${error._tag}: ${"message" in error ? error.message : ""}` })))
            )
          )
        )
        const done = Stream.fromEffect(
          Effect.gen(function*() {
            const reason: FinishReason = finishReason ?? "cancelled"
            yield* persist(reason === "cancelled" ? "cancelled" : "completed")
            return new DoneEvent({
              turn_id: turnId,
              finish_reason: reason,
              usage: new Usage({ prompt_tokens: promptIds.length, completion_tokens: numCompletionTokens })
            })
          })
        )
        const accepted = new Accepted({
          user_turn_id: TurnId.make(`${id}:${userSeq}`),
          turn_id: turnId,
          num_prompt_tokens: promptIds.length
        })
        return Stream.succeed<ConversationEvent>(accepted).pipe(Stream.concat(tokens), Stream.concat(done))
      })

    return Conversation.of({
      Create: ({ payload }) =>
        store.createConversation({ id, model: payload.pool, system_prompt: payload.system_prompt }).pipe(
          Effect.tap(() =>
            Effect.sync(() => {
              loaded = { pool: payload.pool, systemPrompt: payload.system_prompt, history: [], nextSeq: 0 }
            })
          ),
          Effect.asVoid
        ),
      SendTurn: ({ payload }) => Stream.unwrapScoped(sendTurn(payload)),
      Cancel: () =>
        Effect.gen(function*() {
          yield* load
          if (active === undefined) return false
          yield* Deferred.succeed(active, undefined)
          return true
        })
    })
  }),
  // Cancel must reach the entity while SendTurn streams; a second SendTurn gets TurnInProgress.
  { concurrency: "unbounded" }
)
}))
