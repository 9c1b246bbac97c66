/** Every typed failure of the runtime, kept together (house style of @effect/cluster). */
import { Schema } from "effect"

export class ConversationNotFound extends Schema.TaggedError<ConversationNotFound>()("ConversationNotFound", {
  conversation_id: Schema.String
}) {}

/** A second turn was sent while one is still streaming in the same conversation. */
export class TurnInProgress extends Schema.TaggedError<TurnInProgress>()("TurnInProgress", {
  conversation_id: Schema.String
}) {}

export class ModelNotFound extends Schema.TaggedError<ModelNotFound>()("ModelNotFound", {
  model: Schema.String
}) {}

/** A user id the caller may not see (only their own): as if it did not exist. */
export class UserNotFound extends Schema.TaggedError<UserNotFound>()("UserNotFound", {
  user_id: Schema.String
}) {}

/** No live share with this id (never made, or revoked), or the caller does not own it. */
export class ShareNotFound extends Schema.TaggedError<ShareNotFound>()("ShareNotFound", {
  share_id: Schema.String
}) {}

/** Input moderation refused a message (`category`: what it found); nothing was stored. */
export class ContentFiltered extends Schema.TaggedError<ContentFiltered>()("ContentFiltered", {
  category: Schema.String
}) {}

/** The prompt (history + new turn) does not fit the model's context window. */
export class PromptTooLong extends Schema.TaggedError<PromptTooLong>()("PromptTooLong", {
  num_prompt_tokens: Schema.Int,
  max_model_len: Schema.Int
}) {}

/** The engine failed or answered with an error reply. */
export class EngineError extends Schema.TaggedError<EngineError>()("EngineError", {
  code: Schema.String,
  message: Schema.String
}) {}

/** A generation stopped abnormally after the user turn was acknowledged. */
export class GenerationFailed extends Schema.TaggedError<GenerationFailed>()("GenerationFailed", {
  message: Schema.String
}) {}

export class StorageError extends Schema.TaggedError<StorageError>()("StorageError", {
  message: Schema.String,
  /** The database could not be reached or was busy (its retries ran out): later may succeed. */
  transient: Schema.optional(Schema.Boolean)
}) {}

/**
 * A turn refused before anything was stored: its GPU pool is past its waiting bound, or the
 * predicted wait for its first token exceeds its tier's TTFT target. Retry after `retry_after_s`.
 */
export class Overloaded extends Schema.TaggedError<Overloaded>()("Overloaded", {
  message: Schema.String,
  retry_after_s: Schema.Int
}) {}

/** The runner is stopping: it takes no new turns. */
export class ShuttingDown extends Schema.TaggedError<ShuttingDown>()("ShuttingDown", {}) {}

/** The event log of turn streams (Redis) could not be read: a resume is refused with 503. */
export class TurnEventsUnavailable extends Schema.TaggedError<TurnEventsUnavailable>()("TurnEventsUnavailable", {
  message: Schema.String
}) {}

/** A resume named a turn whose stream log is unknown or expired. */
export class StreamNotFound extends Schema.TaggedError<StreamNotFound>()("StreamNotFound", {
  turn_id: Schema.String
}) {}

/**
 * A turn sent with an Idempotency-Key that conversation already took for another message: a
 * key names one request (draft-ietf-httpapi-idempotency-key-header: 422 for a reused key).
 */
export class IdempotencyKeyReused extends Schema.TaggedError<IdempotencyKeyReused>()("IdempotencyKeyReused", {
  conversation_id: Schema.String,
  turn_id: Schema.String
}) {}

/** A turn re-sent with an Idempotency-Key that conversation already took: that turn, not a new one. */
export class DuplicateTurn extends Schema.TaggedError<DuplicateTurn>()("DuplicateTurn", {
  conversation_id: Schema.String,
  turn_id: Schema.String
}) {}
