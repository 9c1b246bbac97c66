/**
 * The HTTP API: groups `health` and `conversations` (the latter behind `Authorization`).
 *
 * - `POST /v1/conversations` CreateConversation → 201 `{conversation_id, model, region}`
 * - `GET  /v1/conversations?before=<cursor>&limit=<1..100, default 20>` → ConversationList (the
 *   caller's own, newest first)
 * - `POST /v1/conversations/:id/turns` UserTurnInput → 200 `text/event-stream` (see Sse.ts);
 *   with an `Idempotency-Key` this conversation already took, the stream of that turn (after
 *   `Last-Event-ID`, if given) instead of a new turn
 * - `POST /v1/conversations/:id/cancel` → 204
 * - `GET  /v1/conversations/:id/stream` (`Last-Event-ID` header or `last_event_id` query) →
 *   200 `text/event-stream` resuming the turn after that event, or the in-flight turn from its
 *   start; 204 when there is nothing to send
 * - `GET  /v1/conversations/:id?before=<cursor>&limit=<1..200, default 50>` → HistoryPage
 * - `DELETE /v1/conversations/:id` → 204 (the conversation, its turns and shares are gone)
 * - `POST /v1/conversations/:id/share` → 201 Share; `GET /v1/shared/:share_id` (no auth) →
 *   SharedConversation; `DELETE /v1/shared/:share_id` (its owner) → 204
 * - `GET|PATCH /v1/users/:user/memory` (`me`, or the caller's own id) → UserMemory
 * - `GET  /v1/me` → Me (the caller's user, tier, org and models)
 * - `GET  /v1/ops/status` (admin) → OpsStatus; `POST /v1/ops/runners/:runner/drain` (admin) → 202
 * - `GET  /healthz` → `{status:"ok"}` (liveness)
 * - `GET  /readyz` → `{status:"ready"}`, or 503 `not_ready` (engine down, database unreachable, stopping)
 * - `GET  /metrics` → Prometheus text (runtime/Metrics.ts)
 * - `POST /v1/chat/completions`, `GET /v1/models`, `GET /v1/models/:model`: the OpenAI-compatible API (OpenAi.ts)
 *
 * Every error is `{"error":{"code","message"}}` (ApiError.ts); decode failures of bodies,
 * paths and query strings become `invalid_request` (the global middleware in Server.ts
 * rewrites @effect/platform's HttpApiDecodeError), unknown routes `not_found`.
 */
import { HttpApi, HttpApiEndpoint, HttpApiGroup, HttpApiSchema } from "@effect/platform"
import { Schema } from "effect"
import { RunnerState } from "../runtime/RunnerStatus.js"
import { ConversationCursorFromString, ConversationId, ConversationList, CreateConversation, HistoryPage, MemoryUpdate, Share, SharedConversation, ShareId, StorableText, UserMemory, UserTurnInput } from "../runtime/Domain.js"
import * as ApiError from "./ApiError.js"
import { Authorization } from "./Auth.js"
import { ChatCompletionRequest, Model, ModelList } from "./OpenAi.js"

export class ConversationCreated extends Schema.Class<ConversationCreated>("ConversationCreated")({
  conversation_id: ConversationId,
  /** The model pool that serves it (the request's, or the caller's tier's). */
  model: Schema.String,
  /** Where that pool runs (the topology's runner region). */
  region: Schema.String
}) {}

/** `POST /v1/conversations` accepts an empty body as `{}` (every field is optional). */
export const CreateConversationPayload = Schema.Union(CreateConversation, Schema.Null)

export class Health extends Schema.Class<Health>("Health")({
  status: Schema.Literal("ok")
}) {}

/** A non-negative decimal integer in a query string. */
const IntFromString = Schema.String.pipe(
  Schema.pattern(/^[0-9]{1,15}$/, { message: () => "Expected a non-negative integer" }),
  Schema.compose(Schema.NumberFromString),
  Schema.int()
)

export const ListParams = Schema.Struct({
  /** Cursor from a previous page's `next_cursor`: only conversations older than it. */
  before: Schema.optional(ConversationCursorFromString),
  limit: Schema.optionalWith(IntFromString.pipe(Schema.between(1, 100)), { default: () => 20 })
})

export const HistoryParams = Schema.Struct({
  /** Cursor from a previous page's `next_cursor`: only turns with seq < before. */
  before: Schema.optional(IntFromString.pipe(Schema.between(0, 2_147_483_647))),
  limit: Schema.optionalWith(IntFromString.pipe(Schema.between(1, 200)), { default: () => 50 })
})

/** The success of the turn route is an SSE stream (documented here, produced as a raw response). */
export const EventStream = HttpApiSchema.Text({ contentType: "text/event-stream" }).annotations({
  description: "Server-Sent Events: `token` (id = token index, data {text}), then exactly one " +
    "`done` (data {turn_id, finish_reason, usage}) or `error` (data {error:{code,message}}); " +
    "`: keep-alive` comments while idle."
})

const id = HttpApiSchema.param("id", ConversationId)
const shareId = HttpApiSchema.param("share_id", ShareId)

/** A Last-Event-ID as sent back by a client: `<turn_id>:<index>` (ids are short; longer is invalid). */
const LastEventId = Schema.String.pipe(Schema.maxLength(200))
export const ResumeParams = Schema.Struct({ last_event_id: Schema.optional(LastEventId) })
export const ResumeHeaders = Schema.Struct({ "last-event-id": Schema.optional(LastEventId) })
/** `Idempotency-Key`: a client's own id for a turn, so that re-sending it never makes a second turn. */
export const SendTurnHeaders = Schema.Struct({
  "idempotency-key": Schema.optional(Schema.String.pipe(Schema.minLength(1), Schema.maxLength(200))),
  "last-event-id": Schema.optional(LastEventId)
})

export class Ready extends Schema.Class<Ready>("Ready")({
  status: Schema.Literal("ready")
}) {}

/** Liveness (`/healthz`: the process answers) and readiness (`/readyz`: engine up, database reachable, not stopping). */
export class HealthGroup extends HttpApiGroup.make("health")
  .add(HttpApiEndpoint.get("healthz", "/healthz").addSuccess(Health))
  .add(HttpApiEndpoint.get("readyz", "/readyz").addSuccess(Ready).addError(ApiError.NotReadyJson))
  .add(HttpApiEndpoint.get("metrics", "/metrics").addSuccess(HttpApiSchema.Text({ contentType: "text/plain; version=0.0.4" })))
{}

export class ConversationsGroup extends HttpApiGroup.make("conversations")
  .add(
    HttpApiEndpoint.post("create", "/v1/conversations")
      .setPayload(CreateConversationPayload)
      .addSuccess(ConversationCreated, { status: 201 })
      .addError(ApiError.ModelNotFoundJson)
      .addError(ApiError.PromptTooLongJson)
      .addError(ApiError.ContentFilterJson)
      .addError(ApiError.EngineUnavailableJson)
  )
  .add(
    HttpApiEndpoint.get("list", "/v1/conversations")
      .setUrlParams(ListParams)
      .addSuccess(ConversationList)
  )
  .add(
    HttpApiEndpoint.post("sendTurn")`/v1/conversations/${id}/turns`
      .setPayload(UserTurnInput)
      .setHeaders(SendTurnHeaders)
      .addSuccess(EventStream)
      .addError(ApiError.ConversationNotFoundJson)
      .addError(ApiError.TurnInProgressJson)
      .addError(ApiError.DuplicateTurnJson)
      .addError(ApiError.IdempotencyKeyReusedJson)
      .addError(ApiError.StreamUnavailableJson)
      .addError(ApiError.PromptTooLongJson)
      .addError(ApiError.ContentFilterJson)
      .addError(ApiError.EngineUnavailableJson)
      .addError(ApiError.OverloadedJson)
  )
  .add(
    HttpApiEndpoint.post("cancel")`/v1/conversations/${id}/cancel`
      .addError(ApiError.ConversationNotFoundJson)
      .addError(ApiError.EngineUnavailableJson)
  )
  .add(
    HttpApiEndpoint.get("resume")`/v1/conversations/${id}/stream`
      .setUrlParams(ResumeParams)
      .setHeaders(ResumeHeaders)
      .addSuccess(EventStream)
      .addSuccess(HttpApiSchema.NoContent)
      .addError(ApiError.ConversationNotFoundJson)
      .addError(ApiError.StreamNotFoundJson)
      .addError(ApiError.StreamUnavailableJson)
      .addError(ApiError.EngineUnavailableJson)
  )
  .add(
    HttpApiEndpoint.del("remove")`/v1/conversations/${id}`
      .addSuccess(HttpApiSchema.NoContent)
      .addError(ApiError.ConversationNotFoundJson)
      .addError(ApiError.EngineUnavailableJson)
  )
  .add(
    HttpApiEndpoint.post("share")`/v1/conversations/${id}/share`
      .addSuccess(Share, { status: 201 })
      .addError(ApiError.ConversationNotFoundJson)
  )
  .add(
    HttpApiEndpoint.del("revokeShare")`/v1/shared/${shareId}`
      .addSuccess(HttpApiSchema.NoContent)
      .addError(ApiError.ShareNotFoundJson)
  )
  .add(
    HttpApiEndpoint.get("history")`/v1/conversations/${id}`
      .setUrlParams(HistoryParams)
      .addSuccess(HistoryPage)
      .addError(ApiError.ConversationNotFoundJson)
  )
  .middleware(Authorization)
{}

/** A user's long-term memory: `me` (or the caller's own id); any user's with an admin key (ADMIN_API_KEYS). */
const user = HttpApiSchema.param("user", StorableText.pipe(Schema.minLength(1), Schema.maxLength(256)))

export class MemoryGroup extends HttpApiGroup.make("memory")
  .add(
    HttpApiEndpoint.get("memory")`/v1/users/${user}/memory`
      .addSuccess(UserMemory)
      .addError(ApiError.UserNotFoundJson)
  )
  .add(
    HttpApiEndpoint.patch("updateMemory")`/v1/users/${user}/memory`
      .setPayload(MemoryUpdate)
      .addSuccess(UserMemory)
      .addError(ApiError.UserNotFoundJson)
  )
  .middleware(Authorization)
{}

/** A shared conversation: public, read-only (the share id is the capability). */
export class SharedGroup extends HttpApiGroup.make("shared")
  .add(
    HttpApiEndpoint.get("shared")`/v1/shared/${shareId}`
      .addSuccess(SharedConversation)
      .addError(ApiError.ShareNotFoundJson)
  )
{}

/** `GET /v1/me`: who the caller is, and the models (pools) their tier may name. */
export class Me extends Schema.Class<Me>("Me")({
  user_id: Schema.String,
  tier: Schema.String,
  org_id: Schema.NullOr(Schema.String),
  admin: Schema.Boolean,
  /** The pool a conversation created without `model` gets. */
  default_model: Schema.String,
  models: Schema.Array(Schema.String)
}) {}

export class MeGroup extends HttpApiGroup.make("me")
  .add(HttpApiEndpoint.get("me", "/v1/me").addSuccess(Me))
  .middleware(Authorization)
{}

/** A turn that ended in an error, as `/ops` lists it. */
export const RecentError = Schema.Struct({
  at_ms: Schema.Number,
  model: Schema.String,
  tier: Schema.String,
  code: Schema.String,
  message: Schema.String
})

/**
 * What the operator dashboard polls: every runner's last report (as `npm run cluster -- status`
 * shows them), each model pool's GPUs, this gateway's dashboard series (prom-client JSON of
 * `time_to_first_token_seconds`, `generation_tokens_total`, `request_success_total` and the
 * per-GPU gauges; rates and quantiles are the client's, from successive polls) and its recent
 * turn errors, newest first.
 */
export class OpsStatus extends Schema.Class<OpsStatus>("OpsStatus")({
  now_ms: Schema.Number,
  runners: Schema.Array(RunnerState),
  pools: Schema.Record({ key: Schema.String, value: Schema.Array(Schema.String) }),
  metrics: Schema.Array(Schema.Unknown),
  recent_errors: Schema.Array(RecentError)
}) {}

export class DrainRequested extends Schema.Class<DrainRequested>("DrainRequested")({
  runner: Schema.String,
  drain_requested: Schema.Literal(true)
}) {}

const modelName = HttpApiSchema.param("model", Schema.String.pipe(Schema.maxLength(256)))
const runnerName = HttpApiSchema.param("runner", Schema.String.pipe(Schema.pattern(/^[A-Za-z0-9_.-]{1,64}$/)))

/** Operators' routes (`/ops` dashboard): admin keys only (ADMIN_API_KEYS), others get 403. */
export class OpsGroup extends HttpApiGroup.make("ops")
  .add(
    HttpApiEndpoint.get("status", "/v1/ops/status")
      .addSuccess(OpsStatus)
      .addError(ApiError.ForbiddenJson)
      .addError(ApiError.StorageUnavailableJson)
  )
  .add(
    HttpApiEndpoint.post("drain")`/v1/ops/runners/${runnerName}/drain`
      .addSuccess(DrainRequested, { status: 202 })
      .addError(ApiError.ForbiddenJson)
      .addError(ApiError.RunnerNotFoundJson)
      .addError(ApiError.StorageUnavailableJson)
  )
  .middleware(Authorization)
{}

/** The OpenAI-compatible routes (OpenAi.ts), behind the same authentication. */
export class OpenAiGroup extends HttpApiGroup.make("openai")
  .add(
    HttpApiEndpoint.post("chatCompletions", "/v1/chat/completions")
      .setPayload(ChatCompletionRequest)
      .addSuccess(EventStream)
      .addError(ApiError.ModelNotFoundJson)
      .addError(ApiError.ContentFilterJson)
      // A new conversation is never missing nor busy: these are declared for the shared mapping.
      .addError(ApiError.ConversationNotFoundJson)
      .addError(ApiError.TurnInProgressJson)
      .addError(ApiError.DuplicateTurnJson)
      .addError(ApiError.IdempotencyKeyReusedJson)
      .addError(ApiError.PromptTooLongJson)
      .addError(ApiError.EngineUnavailableJson)
      .addError(ApiError.OverloadedJson)
  )
  .add(HttpApiEndpoint.get("models", "/v1/models").addSuccess(ModelList))
  .add(HttpApiEndpoint.get("model")`/v1/models/${modelName}`.addSuccess(Model).addError(ApiError.ModelNotFoundJson))
  .middleware(Authorization)
{}

export class Api extends HttpApi.make("chat")
  .add(HealthGroup)
  .add(ConversationsGroup)
  .add(SharedGroup)
  .add(MemoryGroup)
  .add(OpenAiGroup)
  .add(OpsGroup)
  .add(MeGroup)
  .addError(ApiError.InvalidRequestJson)
  .addError(ApiError.RateLimitedJson)
  .addError(ApiError.NotFoundJson)
  .addError(ApiError.PayloadTooLargeJson)
  .addError(ApiError.InternalErrorJson)
  .addError(ApiError.StorageUnavailableJson)
  .addError(ApiError.ShuttingDownJson)
{}
