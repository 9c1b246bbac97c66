/**
 * An in-memory `Conversations` for HTTP tests: a fake generation yields `tokens` token events
 * `tokenDelay` apart, then a Done event. It records how each generation ended (completed,
 * cancelled through `cancel`, interrupted by the consumer, failed).
 *
 * Magic user contents:
 * - `!too_long`      → sendTurn fails with PromptTooLong
 * - `!engine_error`  → sendTurn fails with EngineError
 * - `!fail_stream`   → 2 tokens, then the stream fails with EngineError
 * - `!no_done`       → the tokens, then the stream ends without a Done event
 * - `!defect`        → 1 token, then the stream dies
 * A `model` of `missing` makes create fail with ModelNotFound.
 */
import { TurnStream } from "../../src/runtime/TurnStream.js"
import { Cause, Context, Deferred, Duration, Effect, Exit, type FiberId, Layer, Option, Schedule, Stream } from "effect"
import type { ConversationsService } from "../../src/runtime/Conversations.js"
import { Conversations } from "../../src/runtime/Conversations.js"
import {
  ConversationId,
  ConversationList,
  CreateConversation,
  DoneEvent,
  HistoryPage,
  type Identity,
  TokenEvent,
  Turn,
  TurnId,
  type TurnEvent,
  type TurnStatus,
  Usage
} from "../../src/runtime/Domain.js"
import {
  ConversationNotFound,
  EngineError,
  ModelNotFound,
  PromptTooLong,
  ShareNotFound,
  StorageError,
  TurnInProgress,
  UserNotFound
} from "../../src/runtime/Errors.js"

export interface FakeOptions {
  readonly tokens?: number
  readonly tokenDelay?: Duration.DurationInput
}

/** How one generation ended. */
export interface GenerationEnd {
  readonly conversation_id: string
  readonly how: "completed" | "cancelled" | "interrupted" | "failed"
  readonly at_ms: number
  /** For `interrupted`: the fibers that interrupted the stream. */
  readonly interruptors: ReadonlyArray<FiberId.FiberId>
}

export interface FakeControl {
  /** Generations that have ended, in order. */
  readonly ends: Effect.Effect<ReadonlyArray<GenerationEnd>>
  /** `cancel` calls received, in order. */
  readonly cancelCalls: Effect.Effect<ReadonlyArray<string>>
  /** Waits (polling, up to `timeout`) for a generation end matching `predicate`. */
  readonly waitForEnd: (
    predicate: (end: GenerationEnd) => boolean,
    timeout?: Duration.DurationInput
  ) => Effect.Effect<GenerationEnd, Error>
  /** Whether a generation is running in the conversation. */
  readonly isActive: (id: string) => Effect.Effect<boolean>
}

export class FakeConversationsControl extends Context.Tag("test/FakeConversationsControl")<
  FakeConversationsControl,
  FakeControl
>() {}

/** Token text of index `i`; index 1 carries a newline and quotes to exercise SSE framing. */
export const tokenText = (i: number): string => i === 1 ? "multi\nline \"quoted\"\r\n" : `tok${i} `

interface ConversationState {
  readonly id: ConversationId
  readonly owner: string
  readonly turns: Array<Turn>
  active: Deferred.Deferred<void> | undefined
}

export const make = (options: FakeOptions = {}) =>
  Effect.sync(() => {
    const numTokens = options.tokens ?? 5
    const tokenDelay = Duration.decode(options.tokenDelay ?? Duration.millis(20))
    const conversations = new Map<string, ConversationState>()
    const ends: Array<GenerationEnd> = []
    const cancelCalls: Array<string> = []
    let counter = 0

    // As the real service: another user's conversation is not found.
    const lookup = (owner: Identity, id: string) =>
      Effect.suspend(() => {
        const state = conversations.get(id)
        return state === undefined || state.owner !== owner.user_id
          ? Effect.fail(new ConversationNotFound({ conversation_id: id }))
          : Effect.succeed(state)
      })

    const appendTurn = (state: ConversationState, role: "user" | "assistant", content: string, status: TurnStatus, tokens: { prompt: number | null; completion: number | null }) => {
      const seq = state.turns.length
      const turn = new Turn({
        turn_id: TurnId.make(`${state.id}:${seq}`),
        conversation_id: state.id,
        seq,
        role,
        content,
        status,
        num_prompt_tokens: tokens.prompt,
        num_completion_tokens: tokens.completion,
        moderation_verdict: null,
        created_at_ms: Date.now()
      })
      state.turns.push(turn)
      return turn
    }

    const service: ConversationsService = {
      drain: () => Effect.void,
      models: () => ["mini"],
      // Memory is driven through the real service (test/e2e/gateway.test.ts).
      memory: (_owner, user) => Effect.fail(new UserNotFound({ user_id: user })),
      updateMemory: (_owner, user) => Effect.fail(new UserNotFound({ user_id: user })),
      remove: (owner, id) => Effect.map(lookup(owner, id), () => void conversations.delete(id)),
      // Sharing is driven through the real service (test/e2e/gateway.test.ts): none here.
      share: (owner, id) => Effect.flatMap(lookup(owner, id), () => Effect.fail(new StorageError({ message: "no sharing in the fake" }))),
      shared: (shareId) => Effect.fail(new ShareNotFound({ share_id: shareId })),
      revokeShare: (_owner, shareId) => Effect.fail(new ShareNotFound({ share_id: shareId })),
      notReady: Effect.succeed(undefined),
      // The HTTP unit tests drive resuming through the real service (test/e2e): nothing to resume here.
      resume: (owner, id) => Effect.as(lookup(owner, id), Option.none()),
      create: (owner, input) =>
        Effect.suspend(() => {
          if (input.model === "missing") {
            return Effect.fail(new ModelNotFound({ model: input.model }))
          }
          counter++
          const id = ConversationId.make(`conv_${counter.toString(16).padStart(32, "0")}`)
          conversations.set(id, { id, owner: owner.user_id, turns: [], active: undefined })
          return Effect.succeed({ id, model: input.model ?? "mini", region: "local" })
        }),

      // As the real service: a conversation holding the earlier messages, then the turn.
      complete: (owner, request) =>
        Effect.gen(function*() {
          const { id: conversationId } = yield* service.create(owner, new CreateConversation({ model: request.model }))
          const state = conversations.get(conversationId)!
          for (const m of request.history) appendTurn(state, m.role, m.content, "completed", { prompt: null, completion: null })
          const stream = yield* service.sendTurn(owner, conversationId, request.turn)
          return { conversationId, stream }
        }),

      sendTurn: (owner, id, input) =>
        Effect.gen(function*() {
          const state = yield* lookup(owner, id)
          if (state.active !== undefined) {
            return yield* new TurnInProgress({ conversation_id: id })
          }
          if (input.content === "!too_long") {
            return yield* new PromptTooLong({ num_prompt_tokens: 9000, max_model_len: 4096 })
          }
          if (input.content === "!engine_error") {
            return yield* new EngineError({ code: "unavailable", message: "no engine" })
          }
          // Acknowledgement point: the user turn is stored before generation starts.
          const promptTokens = input.content.length
          appendTurn(state, "user", input.content, "completed", { prompt: promptTokens, completion: null })
          const assistantSeq = state.turns.length
          const cancelled = yield* Deferred.make<void>()
          state.active = cancelled
          const limit = input.max_tokens !== undefined && input.max_tokens < numTokens ? input.max_tokens : numTokens
          const mode = input.content
          let emitted = 0
          let text = ""

          const token = (i: number) =>
            Effect.sleep(tokenDelay).pipe(Effect.as(new TokenEvent({ index: i, text: tokenText(i) })))

          const tokenCount = mode === "!fail_stream" ? 2 : mode === "!defect" ? 1 : limit
          let tokens: Stream.Stream<TurnEvent, EngineError> = Stream.iterate(0, (i) => i + 1).pipe(
            Stream.take(tokenCount),
            Stream.mapEffect(token),
            Stream.tap((event) =>
              Effect.sync(() => {
                emitted++
                text += event.text
              })
            ),
            Stream.interruptWhen(Deferred.await(cancelled))
          )
          if (mode === "!fail_stream") {
            tokens = Stream.concat(tokens, Stream.fail(new EngineError({ code: "step_failed", message: "engine step failed" })))
          } else if (mode === "!defect") {
            tokens = Stream.concat(tokens, Stream.die(new Error("boom")))
          }
          const done = Effect.gen(function*() {
            const wasCancelled = yield* Deferred.isDone(cancelled)
            return new DoneEvent({
              turn_id: TurnId.make(`${id}:${assistantSeq}`),
              finish_reason: wasCancelled ? "cancelled" : limit < numTokens ? "length" : "stop",
              usage: new Usage({ prompt_tokens: promptTokens, completion_tokens: emitted, prompt_tokens_details: { cached_tokens: 0 } })
            })
          })
          const events = mode === "!no_done" ? tokens : Stream.concat(tokens, Stream.fromEffect(done))

          return yield* TurnStream.fromStream(Stream.unwrapScoped(
            Effect.as(
              Effect.addFinalizer((exit) =>
                Effect.gen(function*() {
                  const wasCancelled = yield* Deferred.isDone(cancelled)
                  const how: GenerationEnd["how"] = Exit.isSuccess(exit)
                    ? (wasCancelled ? "cancelled" : "completed")
                    : Exit.isInterrupted(exit)
                    ? "interrupted"
                    : "failed"
                  ends.push({
                    conversation_id: id,
                    how,
                    at_ms: Date.now(),
                    interruptors: Exit.isFailure(exit) ? Array.from(Cause.interruptors(exit.cause)) : []
                  })
                  appendTurn(state, "assistant", text, how === "completed" ? "completed" : how === "failed" ? "failed" : "cancelled", {
                    prompt: promptTokens,
                    completion: emitted
                  })
                  state.active = undefined
                })
              ),
              events
            )
          ))
        }),

      cancel: (owner, id) =>
        Effect.gen(function*() {
          const state = yield* lookup(owner, id)
          cancelCalls.push(id)
          if (state.active !== undefined) {
            yield* Deferred.succeed(state.active, undefined)
          }
        }),

      list: () => Effect.succeed(new ConversationList({ data: [], next_cursor: null })),

      history: (owner, id, { before, limit }) =>
        Effect.gen(function*() {
          const state = yield* lookup(owner, id)
          const older = before === undefined ? state.turns : state.turns.filter((turn) => turn.seq < before)
          const page = older.slice(Math.max(0, older.length - limit))
          const first = page[0]
          return new HistoryPage({
            turns: page,
            next_cursor: first !== undefined && first.seq > 0 ? String(first.seq) : null
          })
        })
    }

    const control: FakeControl = {
      ends: Effect.sync(() => [...ends]),
      cancelCalls: Effect.sync(() => [...cancelCalls]),
      waitForEnd: (predicate, timeout = Duration.seconds(1)) =>
        Effect.suspend(() => Option.fromNullable(ends.find(predicate))).pipe(
          Effect.retry(Schedule.spaced(Duration.millis(5))),
          Effect.timeoutFail({ duration: timeout, onTimeout: () => new Error("timed out waiting for a generation end") })
        ),
      isActive: (id) => Effect.sync(() => conversations.get(id)?.active !== undefined)
    }
    return { service, control }
  })

/** `Conversations` and its `FakeConversationsControl`. */
export const layer = (options: FakeOptions = {}): Layer.Layer<Conversations | FakeConversationsControl> =>
  Layer.effectContext(
    Effect.map(make(options), ({ control, service }) =>
      Context.make(Conversations, service).pipe(Context.add(FakeConversationsControl, control))
    )
  )
