/**
 * Handlers of the API groups; they only translate between HTTP and the `Conversations` service.
 */
import { HttpApiBuilder, HttpApp, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Effect, Layer, Option, Runtime } from "effect"
import { CreateConversation, type Identity, TurnId } from "../runtime/Domain.js"
import { Conversations } from "../runtime/Conversations.js"
import { Metrics } from "../runtime/Metrics.js"
import type { TurnStream } from "../runtime/TurnStream.js"
import { Api, ConversationCreated, DrainRequested, Health, Me, OpsStatus, Ready } from "./Api.js"
import { RunnerStatusView } from "../runtime/RunnerStatus.js"
import { TopologyService } from "../runtime/Topology.js"
import * as ApiError from "./ApiError.js"
import { CurrentIdentity } from "./Auth.js"
import * as OpenAi from "./OpenAi.js"
import { type GenerationCost, RateLimits } from "./RateLimits.js"
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

/** A facade call as the API sees it: server failures logged, runtime errors mapped to API errors. */
const toApi = <A, E extends ApiError.RuntimeError, R>(effect: Effect.Effect<A, E, R>) =>
  effect.pipe(
    Effect.tapError(logServerFailure),
    Effect.mapError(ApiError.fromRuntime)
  )

/**
 * A route that takes no body ignores one, but not a malformed one: that is refused before the
 * route acts, as a route with a body refuses it (the guard in Server.ts has read the body
 * already, within its limits; the request keeps the text).
 */
const noBody = <A, E, R>(route: Effect.Effect<A, E, R>) =>
  Effect.gen(function*() {
    const request = yield* HttpServerRequest.HttpServerRequest
    const text = yield* Effect.orElseSucceed(request.text, () => "")
    if (!isJsonOrEmpty(text)) return yield* new ApiError.InvalidRequest({ message: "The request body is not valid JSON" })
    return yield* route
  })

/** Whether a body is empty (white space only) or parses as JSON. */
const isJsonOrEmpty = (text: string): boolean => {
  if (text.trim() === "") return true
  try {
    JSON.parse(text)
    return true
  } catch {
    return false
  }
}

/** A facade call for the caller, charged to their rate limits (see `rateLimited`). */
const forCaller = <A, E extends ApiError.RuntimeError, R>(call: (identity: Identity) => Effect.Effect<A, E, R>) =>
  Effect.flatMap(rateLimited(), ({ identity }) => toApi(call(identity)))

/**
 * Charges the request (and a generation's estimated tokens) to the caller's rate limits; the
 * `x-ratelimit-*` headers go on whatever response the request gets. @returns the caller and
 * `settleOn`, which corrects a generation's charge when its stream ends with `done`.
 */
const rateLimited = (generation?: GenerationCost) =>
  Effect.gen(function*() {
    const limits = yield* RateLimits
    const identity = yield* CurrentIdentity
    const charged = yield* limits.charge(identity, generation)
    if (Object.keys(charged.headers).length > 0) {
      yield* HttpApp.appendPreResponseHandler((_request, response) => Effect.succeed(HttpServerResponse.setHeaders(response, charged.headers)))
    }
    const runFork = Runtime.runFork(yield* Effect.runtime<never>())
    const settleOn = (stream: TurnStream) =>
      stream.observe({ onDone: (e) => void runFork(limits.settle(identity, charged.numTokens, e.usage.prompt_tokens + e.usage.completion_tokens)) })
    /** A generation refused after the charge (404, 409, 400, 503) used no tokens. */
    const refund = limits.settle(identity, charged.numTokens, 0)
    return { identity, settleOn, refund }
  })

export const HealthLive = HttpApiBuilder.group(
  Api,
  "health",
  (handlers) =>
    Effect.gen(function*() {
      const conversations = yield* Conversations
      const metrics = yield* Metrics
      return handlers
        .handle("healthz", () => Effect.succeed(new Health({ status: "ok" })))
        .handle("metrics", () =>
          Effect.map(metrics.scrape, ({ contentType, text }) => HttpServerResponse.text(text, { contentType })))
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
          forCaller((identity) => conversations.create(identity, payload ?? new CreateConversation({}))).pipe(
            Effect.map((created) => new ConversationCreated({ conversation_id: created.id, model: created.model, region: created.region }))
          ))
        .handle("sendTurn", ({ headers, path, payload }) =>
          Effect.gen(function*() {
            const settings = yield* Sse.SseSettings
            // Read only for a re-sent turn, but refused up front when malformed, as GET …/stream
            // refuses it: bad input changes nothing.
            const after = parseLastEventId(headers["last-event-id"], path.id)
            if (after === null) {
              return yield* new ApiError.InvalidRequest({ message: "Last-Event-ID is not an event id of this conversation" })
            }
            const { identity: owner, refund, settleOn } = yield* rateLimited({ numPromptChars: payload.content.length, maxTokens: payload.max_tokens })
            // The outer effect fails (404/409/400/503) before any byte of the SSE response.
            const sent = yield* conversations.sendTurn(owner, path.id, payload, { idempotencyKey: headers["idempotency-key"] }).pipe(
              Effect.tapError(() => refund),
              Effect.map((stream) => {
                settleOn(stream)
                return Sse.turnResponse(stream, settings)
              }),
              // A re-sent turn (same Idempotency-Key): that turn's stream, from Last-Event-ID.
              Effect.catchTag("DuplicateTurn", (e) =>
                Effect.gen(function*() {
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
          noBody(forCaller((identity) => conversations.cancel(identity, path.id))))
        .handle("resume", ({ headers, path, urlParams }) =>
          Effect.gen(function*() {
            const raw = headers["last-event-id"] ?? urlParams.last_event_id
            const after = parseLastEventId(raw, path.id)
            if (after === null) {
              return yield* new ApiError.InvalidRequest({ message: "Last-Event-ID is not an event id of this conversation" })
            }
            const resumed = yield* conversations.resume((yield* rateLimited()).identity, path.id, after).pipe(
              Effect.tapError(logServerFailure),
              Effect.mapError(ApiError.fromRuntime)
            )
            if (Option.isNone(resumed)) return HttpServerResponse.empty({ status: 204 })
            const settings = yield* Sse.SseSettings
            return Sse.resumeResponse(resumed.value.turnId, resumed.value.events, settings)
          }))
        .handle("remove", ({ path }) =>
          noBody(forCaller((identity) => conversations.remove(identity, path.id))))
        .handle("share", ({ path }) =>
          noBody(forCaller((identity) => conversations.share(identity, path.id))))
        .handle("revokeShare", ({ path }) =>
          noBody(forCaller((identity) => conversations.revokeShare(identity, path.share_id))))
        .handle("list", ({ urlParams }) =>
          forCaller((identity) => conversations.list(identity, { before: urlParams.before, limit: urlParams.limit })))
        .handle("history", ({ path, urlParams }) =>
          forCaller((identity) => conversations.history(identity, path.id, { before: urlParams.before, limit: urlParams.limit })))
    })
)

export const MemoryLive = HttpApiBuilder.group(
  Api,
  "memory",
  (handlers) =>
    Effect.map(Conversations, (conversations) =>
      handlers
        .handle("memory", ({ path }) =>
          forCaller((identity) => conversations.memory(identity, path.user)))
        .handle("updateMemory", ({ path, payload }) =>
          forCaller((identity) => conversations.updateMemory(identity, path.user, payload))))
)

export const SharedLive = HttpApiBuilder.group(
  Api,
  "shared",
  (handlers) =>
    Effect.map(Conversations, (conversations) =>
      handlers.handle("shared", ({ path }) =>
        toApi(conversations.shared(path.share_id))))
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
            const numPromptChars = request.history.reduce((n, m) => n + m.content.length, request.turn.content.length + (request.system_prompt?.length ?? 0))
            const { identity: owner, refund, settleOn } = yield* rateLimited({ numPromptChars, maxTokens: request.turn.max_tokens })
            const { conversationId, stream } = yield* conversations.complete(owner, request).pipe(
              Effect.tapError(() => refund),
              Effect.tapError(logServerFailure),
              Effect.mapError(ApiError.fromRuntime)
            )
            settleOn(stream)
            const storedUsage = conversations.history(owner, conversationId, { limit: 1 }).pipe(
              Effect.map((page): OpenAi.CompletionUsage | undefined => {
                const reply = page.turns.at(-1)
                if (reply?.role !== "assistant" || reply.num_prompt_tokens === null || reply.num_completion_tokens === null) return undefined
                return OpenAi.completionUsage(reply.num_prompt_tokens, reply.num_completion_tokens)
              }),
              Effect.orElseSucceed(() => undefined)
            )
            const completion = { conversationId, model: payload.model, stream, storedUsage }
            if (payload.stream !== true) return yield* OpenAi.jsonResponse(completion)
            const settings = yield* Sse.SseSettings
            return OpenAi.streamResponse(completion, {
              includeUsage: payload.stream_options?.include_usage === true,
              keepAliveInterval: settings.keepAliveInterval
            })
          }))
        .handle("models", () =>
          Effect.map(rateLimited(), ({ identity }) => new OpenAi.ModelList({ object: "list", data: conversations.models(identity).map(OpenAi.model) })))
        .handle("model", ({ path }) =>
          Effect.flatMap(rateLimited(), ({ identity }) =>
            conversations.models(identity).includes(path.model)
              ? Effect.succeed(OpenAi.model(path.model))
              : Effect.fail(new ApiError.ModelNotFound({ message: `Model ${path.model} not found` }))))
    })
)

/** The operator routes: an admin identity (ADMIN_API_KEYS) or 403. */
export const OpsLive = HttpApiBuilder.group(
  Api,
  "ops",
  (handlers) =>
    Effect.gen(function*() {
      const view = yield* RunnerStatusView
      const metrics = yield* Metrics
      const topology = yield* TopologyService
      const pools = Object.fromEntries(Object.entries(topology.pools).map(([name, pool]) => [name, pool.gpus.map((g) => g.id)]))
      const asAdmin = Effect.flatMap(CurrentIdentity, (identity) =>
        identity.admin === true ? Effect.void : Effect.fail(new ApiError.Forbidden({ message: "Operator routes need an admin key (ADMIN_API_KEYS)" })))
      return handlers
        .handle("status", () =>
          Effect.gen(function*() {
            yield* asAdmin
            const [runners, snapshot] = yield* Effect.all([toApi(view.list), metrics.snapshot], { concurrency: 2 })
            return new OpsStatus({ now_ms: Date.now(), runners, pools, metrics: snapshot.metrics, recent_errors: snapshot.recentErrors })
          }))
        .handle("drain", ({ path }) =>
          noBody(Effect.gen(function*() {
            yield* asAdmin
            if (!(yield* toApi(view.requestDrain(path.runner)))) {
              return yield* new ApiError.RunnerNotFound({ message: `No runner named ${path.runner} has reported` })
            }
            yield* Effect.logWarning(`drain of runner ${path.runner} requested from /ops`)
            return new DrainRequested({ runner: path.runner, drain_requested: true })
          })))
    })
)

export const MeLive = HttpApiBuilder.group(
  Api,
  "me",
  (handlers) =>
    Effect.map(TopologyService, (topology) =>
      handlers.handle("me", () =>
        Effect.map(rateLimited(), ({ identity }) => {
          const tier = topology.tiers[identity.tier]
          return new Me({
            user_id: identity.user_id,
            tier: identity.tier,
            org_id: identity.org_id,
            admin: identity.admin === true,
            default_model: tier?.pool ?? "",
            models: tier?.models ?? Object.keys(topology.pools)
          })
        })))
)

/** Every group; needs `Conversations`, `RateLimits` (and `Authenticator` via the Authorization middleware layer). */
export const layer = Layer.mergeAll(HealthLive, ConversationsLive, SharedLive, MemoryLive, OpenAiLive, OpsLive, MeLive)
