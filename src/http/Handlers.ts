/**
 * Handlers of the API groups; they only translate between HTTP and the `Conversations` service.
 */
import { HttpApiBuilder, HttpServerResponse } from "@effect/platform"
import { Effect, Layer, Option } from "effect"
import { CreateConversation, TurnId } from "../runtime/Domain.js"
import { Conversations } from "../runtime/Conversations.js"
import { Api, ConversationCreated, Health, Ready } from "./Api.js"
import * as ApiError from "./ApiError.js"
import * as Sse from "./Sse.js"

const logServerFailure = <E extends { readonly _tag: string }>(error: E) =>
  error._tag === "StorageError" || error._tag === "EngineError" || error._tag === "GenerationFailed"
    ? Effect.logError("request failed", error)
    : Effect.void

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
          conversations.create(payload ?? new CreateConversation({})).pipe(
            Effect.tapError(logServerFailure),
            Effect.mapError(ApiError.fromRuntime),
            Effect.map((conversation_id) => new ConversationCreated({ conversation_id }))
          ))
        .handle("sendTurn", ({ path, payload }) =>
          Effect.gen(function*() {
            // The outer effect fails (404/409/400/503) before any byte of the SSE response.
            const stream = yield* conversations.sendTurn(path.id, payload).pipe(
              Effect.tapError(logServerFailure),
              Effect.mapError(ApiError.fromRuntime)
            )
            const settings = yield* Sse.SseSettings
            return Sse.turnResponse(stream, settings)
          }))
        .handle("cancel", ({ path }) =>
          conversations.cancel(path.id).pipe(
            Effect.tapError(logServerFailure),
            Effect.mapError(ApiError.fromRuntime)
          ))
        .handle("resume", ({ headers, path, urlParams }) =>
          Effect.gen(function*() {
            const raw = headers["last-event-id"] ?? urlParams.last_event_id
            let after: { readonly turnId: TurnId; readonly index: number } | undefined
            if (raw !== undefined && raw !== "") {
              // `<conversation_id>:<seq>:<index>`, of this conversation.
              const m = /^([^:]+):([0-9]{1,9}):([0-9]{1,9})$/.exec(raw)
              if (m === null || m[1] !== path.id) {
                return yield* new ApiError.InvalidRequest({ message: "Last-Event-ID is not an event id of this conversation" })
              }
              after = { turnId: TurnId.make(`${m[1]}:${m[2]}`), index: Number(m[3]) }
            }
            const resumed = yield* conversations.resume(path.id, after).pipe(
              Effect.tapError(logServerFailure),
              Effect.mapError(ApiError.fromRuntime)
            )
            if (Option.isNone(resumed)) return HttpServerResponse.empty({ status: 204 })
            const settings = yield* Sse.SseSettings
            return Sse.resumeResponse(resumed.value.turnId, resumed.value.events, settings)
          }))
        .handle("history", ({ path, urlParams }) =>
          conversations.history(path.id, { before: urlParams.before, limit: urlParams.limit }).pipe(
            Effect.tapError(logServerFailure),
            Effect.mapError(ApiError.fromRuntime)
          ))
    })
)

/** Both groups; needs `Conversations` (and `ApiKeys` via the Authorization middleware layer). */
export const layer = Layer.mergeAll(HealthLive, ConversationsLive)
