/**
 * The errors of the HTTP API. Each is a `Schema.TaggedError` (what handlers fail with) plus a
 * wire schema (`…Json`) that encodes it as `{"error":{"code":"…","message":"…"}}` with its
 * HTTP status annotated (HttpApiSchema), which is what the endpoints declare.
 *
 * | class               | status | code                     |
 * |---------------------|--------|--------------------------|
 * | InvalidRequest      | 400    | `invalid_request`        |
 * | PromptTooLong       | 400    | `prompt_too_long`        |
 * | Unauthorized        | 401    | `unauthorized`           |
 * | NotFound            | 404    | `not_found` (no route)   |
 * | ConversationNotFound| 404    | `conversation_not_found` |
 * | ModelNotFound       | 404    | `model_not_found`        |
 * | TurnInProgress      | 409    | `turn_in_progress`       |
 * | InternalError       | 500    | `internal`               |
 * | EngineUnavailable   | 503    | `engine_error`           |
 *
 * `model_not_found` is a 404 like the OpenAI API answers it (the named resource does not exist).
 */
import { HttpApiSchema } from "@effect/platform"
import { Schema } from "effect"
import type * as Errors from "../runtime/Errors.js"

/** The JSON body of every error response. */
export const ErrorBody = <const Code extends string>(code: Code) =>
  Schema.Struct({
    error: Schema.Struct({
      code: Schema.Literal(code),
      message: Schema.String
    })
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
    encode: (e) => ({ error: { code, message: e.message } })
  }).annotations(HttpApiSchema.annotations({ status }))

/** Bad JSON body, schema failure, bad path or query parameters. */
export class InvalidRequest extends Schema.TaggedError<InvalidRequest>()(
  "InvalidRequest",
  { message: Schema.String },
  HttpApiSchema.annotations({ status: 400 })
) {}
export const InvalidRequestJson = toJson(InvalidRequest, "invalid_request", 400)

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

export type ApiError =
  | InvalidRequest
  | PromptTooLong
  | Unauthorized
  | NotFound
  | ConversationNotFound
  | ModelNotFound
  | TurnInProgress
  | InternalError
  | EngineUnavailable

const classes: ReadonlyArray<new(...args: Array<any>) => ApiError> = [
  InvalidRequest,
  PromptTooLong,
  Unauthorized,
  NotFound,
  ConversationNotFound,
  ModelNotFound,
  TurnInProgress,
  InternalError,
  EngineUnavailable
]

export const isApiError = (u: unknown): u is ApiError => classes.some((cls) => u instanceof cls)

// ----------------------------------------------------------------------------
// runtime errors → API errors
// ----------------------------------------------------------------------------

export type RuntimeError =
  | Errors.ConversationNotFound
  | Errors.TurnInProgress
  | Errors.ModelNotFound
  | Errors.PromptTooLong
  | Errors.EngineError
  | Errors.GenerationFailed
  | Errors.StorageError

/** The API error a runtime error maps to (distributes over unions). */
export type FromRuntime<E> = E extends Errors.ConversationNotFound ? ConversationNotFound
  : E extends Errors.TurnInProgress ? TurnInProgress
  : E extends Errors.ModelNotFound ? ModelNotFound
  : E extends Errors.PromptTooLong ? PromptTooLong
  : E extends Errors.EngineError ? EngineUnavailable
  : E extends Errors.GenerationFailed | Errors.StorageError ? InternalError
  : never

/** Maps a typed runtime failure to the API error the client sees. */
export const fromRuntime = <E extends RuntimeError>(error: E): FromRuntime<E> => {
  const e = error as RuntimeError
  switch (e._tag) {
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
      return new InternalError({ message: "Storage error" }) as FromRuntime<E>
  }
}
