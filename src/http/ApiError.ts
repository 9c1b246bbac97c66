/**
 * The errors of the HTTP API. Each is a `Schema.TaggedError` (what handlers fail with) plus a
 * wire schema (`…Json`) that encodes it as `{"error":{"code","message","type","param"}}` with its
 * HTTP status annotated (HttpApiSchema), which is what the endpoints declare.
 *
 * | class               | status | code                     |
 * |---------------------|--------|--------------------------|
 * | InvalidRequest      | 400    | `invalid_request`        |
 * | PromptTooLong       | 400    | `prompt_too_long`        |
 * | ContentFilter       | 400    | `content_filter`         |
 * | Unauthorized        | 401    | `unauthorized`           |
 * | NotFound            | 404    | `not_found` (no route)   |
 * | ConversationNotFound| 404    | `conversation_not_found` |
 * | ModelNotFound       | 404    | `model_not_found`        |
 * | StreamNotFound      | 404    | `stream_not_found`       |
 * | ShareNotFound       | 404    | `share_not_found`        |
 * | UserNotFound        | 404    | `user_not_found`         |
 * | MethodNotAllowed    | 405    | `method_not_allowed`     |
 * | TurnInProgress      | 409    | `turn_in_progress`       |
 * | DuplicateTurn       | 409    | `duplicate_turn`         |
 * | IdempotencyKeyReused| 422    | `idempotency_key_reused` |
 * | RateLimited         | 429    | `rate_limit_exceeded`    |
 * | PayloadTooLarge     | 413    | `payload_too_large`      |
 * | InternalError       | 500    | `internal`               |
 * | EngineUnavailable   | 503    | `engine_error`           |
 * | Overloaded          | 503    | `overloaded`             |
 * | StorageUnavailable  | 503    | `storage_unavailable`    |
 * | ShuttingDown        | 503    | `shutting_down`          |
 * | StreamUnavailable   | 503    | `stream_unavailable`     |
 * | NotReady            | 503    | `not_ready` (`/readyz`)  |
 *
 * `model_not_found` is a 404 like the OpenAI API answers it (the named resource does not exist).
 * The 503s carry `Retry-After` (seconds); messages are cut to {@link MAX_MESSAGE_CHARS}, so a
 * rejected value is never echoed whole.
 */
import { HttpApiSchema } from "@effect/platform"
import { Schema } from "effect"
import type * as Errors from "../runtime/Errors.js"

/** Longest `message` an error body carries (a prefix of the value that failed, at most). */
export const MAX_MESSAGE_CHARS = 512

/** `message` cut to {@link MAX_MESSAGE_CHARS}. */
export const truncateMessage = (message: string): string =>
  message.length <= MAX_MESSAGE_CHARS ? message : `${message.slice(0, MAX_MESSAGE_CHARS - 1)}…`

/**
 * `role: is missing; max_tokens: Expected …` from a decode's issues (at most 8, each cut
 * short): one line, where Effect's own message is a multi-line tree naming internal types.
 */
export const formatIssues = (
  issues: ReadonlyArray<{ readonly path: ReadonlyArray<PropertyKey>; readonly message: string }>,
  fallback: string
): string => {
  const parts = issues.slice(0, 8).map((issue) => {
    const text = issue.path.length > 0 ? `${issue.path.map(String).join(".")}: ${issue.message}` : issue.message
    return text.length > 160 ? `${text.slice(0, 159)}…` : text
  })
  return parts.length > 0 ? `Invalid request: ${parts.join("; ")}` : `Invalid request: ${fallback.slice(0, 160)}`
}

/**
 * OpenAI's error `type` for an HTTP status (its clients read `code`, `type`, `message`,
 * `param`): https://platform.openai.com/docs/guides/error-codes
 */
export const errorType = (status: number): string =>
  status === 401 ? "authentication_error"
  : status === 403 ? "permission_error"
  : status === 429 ? "rate_limit_exceeded"
  : status >= 500 ? "server_error"
  : "invalid_request_error"

/** The JSON body of every error response (OpenAI's shape: `param` is always null here). */
export const ErrorBody = <const Code extends string>(code: Code) =>
  Schema.Struct({
    error: Schema.Struct({
      code: Schema.Literal(code),
      message: Schema.String,
      type: Schema.String,
      param: Schema.Null
    })
  })

/** An error body as plain JSON (for responses written outside the API's schemas). */
export const errorJson = (status: number, code: string, message: string) => ({
  error: { code, message: truncateMessage(message), type: errorType(status), param: null }
})

/** The shape shared by all error classes of this module. */
export interface ApiErrorClass<A extends { readonly message: string }> extends Schema.Schema<A, any> {
  new(props: { readonly message: string }): A
}

/**
 * Wire schema of an error class: `{"error":{"code":code,"message":…}}` with `status`.
 */
export const toJson = <A extends { readonly message: string }, const Code extends string>(
  self: ApiErrorClass<A>,
  code: Code,
  status: number
) =>
  Schema.transform(ErrorBody(code), Schema.typeSchema(self as Schema.Schema<A, any>), {
    strict: true,
    decode: ({ error }) => new self({ message: error.message }),
    encode: (e) => errorJson(status, code, e.message) as { readonly error: { readonly code: Code; readonly message: string; readonly type: string; readonly param: null } }
  }).annotations(HttpApiSchema.annotations({ status }))

/** Bad JSON body, schema failure, bad path or query parameters. */
export class InvalidRequest extends Schema.TaggedError<InvalidRequest>()(
  "InvalidRequest",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 400 })
) {}
export const InvalidRequestJson = toJson(InvalidRequest, "invalid_request", 400)

/** Another user's memory (only the caller's own, `me`, is visible). */
export class UserNotFound extends Schema.TaggedError<UserNotFound>()(
  "UserNotFound",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 404 })
) {}
export const UserNotFoundJson = toJson(UserNotFound, "user_not_found", 404)

/** No live share with this id (revoked, never made, or another user's). */
export class ShareNotFound extends Schema.TaggedError<ShareNotFound>()(
  "ShareNotFound",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 404 })
) {}
export const ShareNotFoundJson = toJson(ShareNotFound, "share_not_found", 404)

/** Input moderation refused the message; nothing was stored. */
export class ContentFilter extends Schema.TaggedError<ContentFilter>()(
  "ContentFilter",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 400 })
) {}
export const ContentFilterJson = toJson(ContentFilter, "content_filter", 400)

export class PromptTooLong extends Schema.TaggedError<PromptTooLong>()(
  "PromptTooLong",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 400 })
) {}
export const PromptTooLongJson = toJson(PromptTooLong, "prompt_too_long", 400)

export class Unauthorized extends Schema.TaggedError<Unauthorized>()(
  "Unauthorized",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 401 })
) {}
export const UnauthorizedJson = toJson(Unauthorized, "unauthorized", 401)

/** No route matches the method and path. */
export class NotFound extends Schema.TaggedError<NotFound>()(
  "NotFound",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 404 })
) {}
export const NotFoundJson = toJson(NotFound, "not_found", 404)

/** A path the API serves, with a method it does not serve there; `allow` lists those it does. */
export class MethodNotAllowed extends Schema.TaggedError<MethodNotAllowed>()(
  "MethodNotAllowed",
  { message: Schema.String, allow: Schema.String },
  HttpApiSchema.annotations({ status: 405 })
) {}

/** An operator route called without an admin key (ADMIN_API_KEYS). */
export class Forbidden extends Schema.TaggedError<Forbidden>()(
  "Forbidden",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 403 })
) {}
export const ForbiddenJson = toJson(Forbidden, "forbidden", 403)

/** No runner of that name has reported its status. */
export class RunnerNotFound extends Schema.TaggedError<RunnerNotFound>()(
  "RunnerNotFound",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 404 })
) {}
export const RunnerNotFoundJson = toJson(RunnerNotFound, "runner_not_found", 404)

export class ConversationNotFound extends Schema.TaggedError<ConversationNotFound>()(
  "ConversationNotFound",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 404 })
) {}
export const ConversationNotFoundJson = toJson(ConversationNotFound, "conversation_not_found", 404)

export class ModelNotFound extends Schema.TaggedError<ModelNotFound>()(
  "ModelNotFound",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 404 })
) {}
export const ModelNotFoundJson = toJson(ModelNotFound, "model_not_found", 404)

export class TurnInProgress extends Schema.TaggedError<TurnInProgress>()(
  "TurnInProgress",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 409 })
) {}
export const TurnInProgressJson = toJson(TurnInProgress, "turn_in_progress", 409)

/** The body is larger than the configured limit (`MAX_BODY_BYTES`). */
export class PayloadTooLarge extends Schema.TaggedError<PayloadTooLarge>()(
  "PayloadTooLarge",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 413 })
) {}
export const PayloadTooLargeJson = toJson(PayloadTooLarge, "payload_too_large", 413)

export class InternalError extends Schema.TaggedError<InternalError>()(
  "InternalError",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 500 })
) {}
export const InternalErrorJson = toJson(InternalError, "internal", 500)

/** The engine failed before the turn could start (the SSE stream reports later failures). */
export class EngineUnavailable extends Schema.TaggedError<EngineUnavailable>()(
  "EngineUnavailable",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 503 })
) {}
export const EngineUnavailableJson = toJson(EngineUnavailable, "engine_error", 503)

/** Fields of the 503s: when to try again. */
const retryable = { message: Schema.String, retry_after_s: Schema.optionalWith(Schema.Int, { default: () => 1 }) }

/** The turn was refused up front (its GPU pool is past its waiting bound or TTFT target); nothing was stored. */
export class Overloaded extends Schema.TaggedError<Overloaded>()(
  "Overloaded",
  retryable,
  HttpApiSchema.annotations({ status: 503 })
) {}
export const OverloadedJson = toJson(Overloaded, "overloaded", 503)

/** The database could not be reached (after retries); nothing was acknowledged. */
export class StorageUnavailable extends Schema.TaggedError<StorageUnavailable>()(
  "StorageUnavailable",
  retryable,
  HttpApiSchema.annotations({ status: 503 })
) {}
export const StorageUnavailableJson = toJson(StorageUnavailable, "storage_unavailable", 503)

/** The server is stopping and takes no new turns. */
export class ShuttingDown extends Schema.TaggedError<ShuttingDown>()(
  "ShuttingDown",
  retryable,
  HttpApiSchema.annotations({ status: 503 })
) {}
export const ShuttingDownJson = toJson(ShuttingDown, "shutting_down", 503)

/** A turn re-sent with a used Idempotency-Key whose stream can no longer be replayed. */
export class DuplicateTurn extends Schema.TaggedError<DuplicateTurn>()(
  "DuplicateTurn",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 409 })
) {}
export const DuplicateTurnJson = toJson(DuplicateTurn, "duplicate_turn", 409)

/** A turn sent with an Idempotency-Key that was used for another message of the conversation. */
export class IdempotencyKeyReused extends Schema.TaggedError<IdempotencyKeyReused>()(
  "IdempotencyKeyReused",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 422 })
) {}
export const IdempotencyKeyReusedJson = toJson(IdempotencyKeyReused, "idempotency_key_reused", 422)

/** A resume named a turn whose stream log is unknown or expired. */
export class StreamNotFound extends Schema.TaggedError<StreamNotFound>()(
  "StreamNotFound",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 404 })
) {}
export const StreamNotFoundJson = toJson(StreamNotFound, "stream_not_found", 404)

/** The stream logs (Redis) cannot be read just now. */
export class StreamUnavailable extends Schema.TaggedError<StreamUnavailable>()(
  "StreamUnavailable",
  retryable,
  HttpApiSchema.annotations({ status: 503 })
) {}
export const StreamUnavailableJson = toJson(StreamUnavailable, "stream_unavailable", 503)

/** Readiness failed: the engine is down, the database unreachable, or the server stopping. */
export class NotReady extends Schema.TaggedError<NotReady>()(
  "NotReady",
  retryable,
  HttpApiSchema.annotations({ status: 503 })
) {}
export const NotReadyJson = toJson(NotReady, "not_ready", 503)

/**
 * A tier's RPM or TPM limit is reached (OpenAI's 429): `headers` are the `x-ratelimit-*`
 * values of the limit that refused, sent with `retry-after`.
 */
export class RateLimited extends Schema.TaggedError<RateLimited>()(
  "RateLimited",
  { message: Schema.String, retry_after_s: Schema.Int, headers: Schema.Record({ key: Schema.String, value: Schema.String }) },
  HttpApiSchema.annotations({ status: 429 })
) {}
export const RateLimitedJson = Schema.transform(
  ErrorBody("rate_limit_exceeded"),
  Schema.typeSchema(RateLimited),
  {
    strict: true,
    decode: ({ error }) => new RateLimited({ message: error.message, retry_after_s: 1, headers: {} }),
    encode: (e) => errorJson(429, "rate_limit_exceeded", e.message) as { readonly error: { readonly code: "rate_limit_exceeded"; readonly message: string; readonly type: string; readonly param: null } }
  }
).annotations(HttpApiSchema.annotations({ status: 429 }))

export type ApiError =
  | UserNotFound
  | ShareNotFound
  | ContentFilter
  | RateLimited
  | InvalidRequest
  | PromptTooLong
  | Unauthorized
  | NotFound
  | MethodNotAllowed
  | ConversationNotFound
  | ModelNotFound
  | TurnInProgress
  | PayloadTooLarge
  | InternalError
  | EngineUnavailable
  | Overloaded
  | StorageUnavailable
  | ShuttingDown
  | NotReady
  | StreamNotFound
  | StreamUnavailable
  | DuplicateTurn
  | IdempotencyKeyReused
  | Forbidden
  | RunnerNotFound

const classes: ReadonlyArray<new(...args: Array<any>) => ApiError> = [
  UserNotFound,
  ShareNotFound,
  ContentFilter,
  RateLimited,
  InvalidRequest,
  PromptTooLong,
  Unauthorized,
  NotFound,
  MethodNotAllowed,
  ConversationNotFound,
  ModelNotFound,
  TurnInProgress,
  PayloadTooLarge,
  InternalError,
  EngineUnavailable,
  Overloaded,
  StorageUnavailable,
  ShuttingDown,
  NotReady,
  StreamNotFound,
  StreamUnavailable,
  DuplicateTurn,
  IdempotencyKeyReused,
  Forbidden,
  RunnerNotFound
]

/** The HTTP status and body code of an API error. */
export const statusAndCode = (e: ApiError): { readonly status: number; readonly code: string } => {
  switch (e._tag) {
    case "RateLimited":
      return { status: 429, code: "rate_limit_exceeded" }
    case "ContentFilter":
      return { status: 400, code: "content_filter" }
    case "ShareNotFound":
      return { status: 404, code: "share_not_found" }
    case "UserNotFound":
      return { status: 404, code: "user_not_found" }
    case "InvalidRequest":
      return { status: 400, code: "invalid_request" }
    case "PromptTooLong":
      return { status: 400, code: "prompt_too_long" }
    case "Unauthorized":
      return { status: 401, code: "unauthorized" }
    case "NotFound":
      return { status: 404, code: "not_found" }
    case "MethodNotAllowed":
      return { status: 405, code: "method_not_allowed" }
    case "ConversationNotFound":
      return { status: 404, code: "conversation_not_found" }
    case "ModelNotFound":
      return { status: 404, code: "model_not_found" }
    case "TurnInProgress":
      return { status: 409, code: "turn_in_progress" }
    case "PayloadTooLarge":
      return { status: 413, code: "payload_too_large" }
    case "InternalError":
      return { status: 500, code: "internal" }
    case "EngineUnavailable":
      return { status: 503, code: "engine_error" }
    case "Overloaded":
      return { status: 503, code: "overloaded" }
    case "StorageUnavailable":
      return { status: 503, code: "storage_unavailable" }
    case "ShuttingDown":
      return { status: 503, code: "shutting_down" }
    case "NotReady":
      return { status: 503, code: "not_ready" }
    case "StreamNotFound":
      return { status: 404, code: "stream_not_found" }
    case "StreamUnavailable":
      return { status: 503, code: "stream_unavailable" }
    case "DuplicateTurn":
      return { status: 409, code: "duplicate_turn" }
    case "IdempotencyKeyReused":
      return { status: 422, code: "idempotency_key_reused" }
    case "Forbidden":
      return { status: 403, code: "forbidden" }
    case "RunnerNotFound":
      return { status: 404, code: "runner_not_found" }
  }
}

export const isApiError = (u: unknown): u is ApiError => classes.some((cls) => u instanceof cls)

// ----------------------------------------------------------------------------
// runtime errors → API errors
// ----------------------------------------------------------------------------

export type RuntimeError =
  | Errors.UserNotFound
  | Errors.ShareNotFound
  | Errors.ContentFiltered
  | Errors.ConversationNotFound
  | Errors.TurnInProgress
  | Errors.ModelNotFound
  | Errors.PromptTooLong
  | Errors.EngineError
  | Errors.GenerationFailed
  | Errors.StorageError
  | Errors.Overloaded
  | Errors.ShuttingDown
  | Errors.StreamNotFound
  | Errors.TurnEventsUnavailable
  | Errors.DuplicateTurn
  | Errors.IdempotencyKeyReused

/** The API error a runtime error maps to (distributes over unions). */
export type FromRuntime<E> = E extends Errors.UserNotFound ? UserNotFound
  : E extends Errors.ShareNotFound ? ShareNotFound
  : E extends Errors.ContentFiltered ? ContentFilter
  : E extends Errors.ConversationNotFound ? ConversationNotFound
  : E extends Errors.TurnInProgress ? TurnInProgress
  : E extends Errors.ModelNotFound ? ModelNotFound
  : E extends Errors.PromptTooLong ? PromptTooLong
  : E extends Errors.EngineError ? EngineUnavailable
  : E extends Errors.GenerationFailed ? InternalError
  : E extends Errors.StorageError ? StorageUnavailable
  : E extends Errors.Overloaded ? Overloaded
  : E extends Errors.ShuttingDown ? ShuttingDown
  : E extends Errors.StreamNotFound ? StreamNotFound
  : E extends Errors.TurnEventsUnavailable ? StreamUnavailable
  : E extends Errors.DuplicateTurn ? DuplicateTurn
  : E extends Errors.IdempotencyKeyReused ? IdempotencyKeyReused
  : never

/** Maps a typed runtime failure to the API error the client sees. */
export const fromRuntime = <E extends RuntimeError>(error: E): FromRuntime<E> => {
  const e = error as RuntimeError
  switch (e._tag) {
    case "UserNotFound":
      return new UserNotFound({ message: `User ${e.user_id.slice(0, 64)} not found` }) as FromRuntime<E>
    case "ShareNotFound":
      return new ShareNotFound({ message: `Share ${e.share_id} not found` }) as FromRuntime<E>
    case "ContentFiltered":
      return new ContentFilter({ message: `The message was refused by content moderation (${e.category})` }) as FromRuntime<E>
    case "ConversationNotFound":
      return new ConversationNotFound({ message: `Conversation ${e.conversation_id} not found` }) as FromRuntime<E>
    case "TurnInProgress":
      return new TurnInProgress({
        message: `A turn is already being generated in conversation ${e.conversation_id}`
      }) as FromRuntime<E>
    case "ModelNotFound":
      return new ModelNotFound({ message: `Model ${e.model} not found` }) as FromRuntime<E>
    case "PromptTooLong":
      return new PromptTooLong({
        message: `The prompt has ${e.num_prompt_tokens} tokens; the model accepts at most ${e.max_model_len}`
      }) as FromRuntime<E>
    case "EngineError":
      return new EngineUnavailable({ message: `Engine error (${e.code}): ${e.message}` }) as FromRuntime<E>
    case "GenerationFailed":
      return new InternalError({ message: `Generation failed: ${e.message}` }) as FromRuntime<E>
    case "StorageError":
      return new StorageUnavailable({ message: "The database is unavailable; nothing was stored", retry_after_s: 2 }) as FromRuntime<E>
    case "Overloaded":
      return new Overloaded({ message: e.message, retry_after_s: e.retry_after_s }) as FromRuntime<E>
    case "ShuttingDown":
      return new ShuttingDown({ message: "The server is shutting down", retry_after_s: 5 }) as FromRuntime<E>
    case "StreamNotFound":
      return new StreamNotFound({ message: `No stream is kept for turn ${e.turn_id} (unknown, or expired after its end)` }) as FromRuntime<E>
    case "TurnEventsUnavailable":
      return new StreamUnavailable({ message: "Streams cannot be resumed just now", retry_after_s: 2 }) as FromRuntime<E>
    case "DuplicateTurn":
      return new DuplicateTurn({ message: `This Idempotency-Key was used for turn ${e.turn_id}; read it from the history` }) as FromRuntime<E>
    case "IdempotencyKeyReused":
      return new IdempotencyKeyReused({
        message: `This Idempotency-Key was used for another message (turn ${e.turn_id}); send a new message with a new key`
      }) as FromRuntime<E>
  }
}
