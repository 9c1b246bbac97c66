/**
 * Handlers of the API groups; they only translate between HTTP and the `Conversations` service.
 */
import { HttpApiBuilder, HttpServerResponse } from "@effect/platform"
import { Effect, Layer, Option } from "effect"
import { CreateConversation, TurnId } from "../runtime/Domain.js"
import { Conversations } from "../runtime/Conversations.js"
import { Api, ConversationCreated, Health, Ready } from "./Api.js"
import * as ApiError from "./ApiError.js"
import { CurrentIdentity } from "./Auth.js"
import * as OpenAi from "./OpenAi.js"
import * as Sse from "./Sse.js"

const logServerFailure = <E extends { readonly _tag: string }>(error: E) =>
  error._tag === "StorageError" || error._tag === "EngineError" || error._tag === "GenerationFailed"
    ? Effect.logError("request failed", error)
    : Effect.void

/**
 * A Last-Event-ID `<conversation_id>:<seq>:<index>` of conversation `id`: its turn and index;
 * undefined when absent, null when malformed or of another conversation.
 */
const parseLastEventId = (raw: string | undefined, id: string): { readonly turnId: TurnId; readonly index: number } | undefined | null => {
  if (raw === undefined || raw === "") return undefined
  const m = /^([^:]+):([0-9]{1,9}):([0-9]{1,9})$/.exec(raw)
  if (m === null || m[1] !== id) return null
  return { turnId: TurnId.make(`${m[1]}:${m[2]}`), index: Number(m[3]) }
}

export const HealthLive = HttpApiBuilder.group(
  Api,
  "health",
  (handlers) =>
    Effect.gen(function*() {
      const conversations = yield* Conversations
      return handlers
        .handle("healthz", () => Effect.succeed(new Health({ status: "ok" })))
        .handle("readyz", () =>
          Effect.flatMap(conversations.notReady, (reason) =>
            reason === undefined
              ? Effect.succeed(new Ready({ status: "ready" }))
              : Effect.fail(new ApiError.NotReady({ message: `Not ready: ${reason}`, retry_after_s: 1 }))))
    })
)

export const ConversationsLive = HttpApiBuilder.group(
  Api,
  "conversations",
  (handlers) =>
    Effect.gen(function*() {
      const conversations = yield* Conversations
      return handlers
        .handle("create", ({ payload }) =>
          Effect.flatMap(CurrentIdentity, (owner) => conversations.create(owner, payload ?? new CreateConversation({}))).pipe(
            Effect.tapError(logServerFailure),
            Effect.mapError(ApiError.fromRuntime),
            Effect.map((conversation_id) => new ConversationCreated({ conversation_id }))
          ))
        .handle("sendTurn", ({ headers, path, payload }) =>
          Effect.gen(function*() {
            const settings = yield* Sse.SseSettings
            const owner = yield* CurrentIdentity
            // The outer effect fails (404/409/400/503) before any byte of the SSE response.
            const sent = yield* conversations.sendTurn(owner, path.id, payload, { idempotencyKey: headers["idempotency-key"] }).pipe(
              Effect.map((stream) => Sse.turnResponse(stream, settings)),
              // A re-sent turn (same Idempotency-Key): that turn's stream, from Last-Event-ID.
              Effect.catchTag("DuplicateTurn", (e) =>
                Effect.gen(function*() {
                  const after = parseLastEventId(headers["last-event-id"], path.id)
                  const turnId = TurnId.make(e.turn_id)
                  const resumed = yield* conversations.resume(owner, path.id, {
                    turnId,
                    index: after?.turnId === turnId ? after.index : -1
                  }).pipe(Effect.catchTag("StreamNotFound", () => Effect.fail(e)))
                  if (Option.isNone(resumed)) return HttpServerResponse.empty({ status: 204 })
                  return Sse.resumeResponse(turnId, resumed.value.events, settings)
                })
              ),
              Effect.tapError(logServerFailure),
              Effect.mapError(ApiError.fromRuntime)
            )
            return sent
          }))
        .handle("cancel", ({ path }) =>
          Effect.flatMap(CurrentIdentity, (owner) => conversations.cancel(owner, path.id)).pipe(
            Effect.tapError(logServerFailure),
            Effect.mapError(ApiError.fromRuntime)
          ))
        .handle("resume", ({ headers, path, urlParams }) =>
          Effect.gen(function*() {
            const raw = headers["last-event-id"] ?? urlParams.last_event_id
            const after = parseLastEventId(raw, path.id)
            if (after === null) {
              return yield* new ApiError.InvalidRequest({ message: "Last-Event-ID is not an event id of this conversation" })
            }
            const resumed = yield* conversations.resume(yield* CurrentIdentity, path.id, after).pipe(
              Effect.tapError(logServerFailure),
              Effect.mapError(ApiError.fromRuntime)
            )
            if (Option.isNone(resumed)) return HttpServerResponse.empty({ status: 204 })
            const settings = yield* Sse.SseSettings
            return Sse.resumeResponse(resumed.value.turnId, resumed.value.events, settings)
          }))
        .handle("history", ({ path, urlParams }) =>
          Effect.flatMap(CurrentIdentity, (owner) => conversations.history(owner, path.id, { before: urlParams.before, limit: urlParams.limit })).pipe(
            Effect.tapError(logServerFailure),
            Effect.mapError(ApiError.fromRuntime)
          ))
    })
)

export const OpenAiLive = HttpApiBuilder.group(
  Api,
  "openai",
  (handlers) =>
    Effect.gen(function*() {
      const conversations = yield* Conversations
      return handlers
        .handle("chatCompletions", ({ payload }) =>
          Effect.gen(function*() {
            const request = yield* OpenAi.toConversation(payload)
            const owner = yield* CurrentIdentity
            const { conversationId, stream } = yield* conversations.complete(owner, request).pipe(
              Effect.tapError(logServerFailure),
              Effect.mapError(ApiError.fromRuntime)
            )
            const completion = { conversationId, model: payload.model, stream }
            if (payload.stream !== true) return yield* OpenAi.jsonResponse(completion)
            const settings = yield* Sse.SseSettings
            return OpenAi.streamResponse(completion, {
              includeUsage: payload.stream_options?.include_usage === true,
              keepAliveInterval: settings.keepAliveInterval
            })
          }))
        .handle("models", () =>
          Effect.succeed(new OpenAi.ModelList({
            object: "list",
            data: conversations.models().map((id) => ({ id, object: "model" as const, created: 0, owned_by: "chat-serve" }))
          })))
    })
)

/** Every group; needs `Conversations` (and `Authenticator` via the Authorization middleware layer). */
export const layer = Layer.mergeAll(HealthLive, ConversationsLive, OpenAiLive)
