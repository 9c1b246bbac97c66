/**
 * Domain schemas shared by the HTTP layer, the actors and storage: branded ids, turns and
 * the events of one generation.
 */
import { Schema } from "effect"

/**
 * Constructor option for the Schema classes below when built from values that are typed
 * already (our own fields, or rows decoded with a Schema): skips a second validation.
 */
export const noValidation = { disableValidation: true } as const

/** The index of the first element that is not a safe integer (a hole counts), or -1. */
const firstNonInteger = (u: ReadonlyArray<unknown>): number => {
  for (let i = 0; i < u.length; i++) if (!Number.isSafeInteger(u[i])) return i
  return -1
}

/**
 * A sequence of token ids (integers), as actors send prompts and generated tokens to each
 * other. One check over the whole array: `Schema.Array(Schema.Int)` validates element by
 * element with a result object each, ~600 bytes of garbage per token, which for a 4,096-token
 * prompt was the largest allocation of a turn. The encoded form is the array itself.
 */
export const TokenIds: Schema.Schema<ReadonlyArray<number>> = Schema.declare(
  (u: unknown): u is ReadonlyArray<number> => Array.isArray(u) && firstNonInteger(u) < 0,
  {
    identifier: "TokenIds",
    description: "an array of token ids (integers)",
    // Names the first bad element instead of printing a whole prompt.
    message: (issue) => {
      const u = issue.actual
      return Array.isArray(u)
        ? `Expected an array of token ids: element ${firstNonInteger(u)} of ${u.length} is not an integer`
        : `Expected an array of token ids, got ${typeof u}`
    }
  }
)

/** Conversation id: `conv_` + 32 hex chars (random), or any 1–64 char [A-Za-z0-9_-] id. */
export const ConversationId = Schema.String.pipe(
  Schema.pattern(/^[A-Za-z0-9_-]{1,64}$/),
  Schema.brand("ConversationId")
)
export type ConversationId = typeof ConversationId.Type

/** Turn id: `<conversation_id>:<seq>` where seq is the turn's 0-based index in the conversation. */
export const TurnId = Schema.String.pipe(Schema.brand("TurnId"))
export type TurnId = typeof TurnId.Type

/** A user id: a JWT's `sub`, an API key's configured user, or `local` (no authentication). */
export const UserId = Schema.String.pipe(Schema.minLength(1), Schema.maxLength(256), Schema.brand("UserId"))
export type UserId = typeof UserId.Type

/**
 * Who sends a request: the user (owner of the conversations they create), their tier (rate
 * limits, priority, model pool) and optional organisation.
 */
export class Identity extends Schema.Class<Identity>("Identity")({
  user_id: UserId,
  tier: Schema.String,
  org_id: Schema.NullOr(Schema.String),
  /** An operator's key (ADMIN_API_KEYS): may read and change any user's memory. */
  admin: Schema.optional(Schema.Boolean)
}) {}

export const Role = Schema.Literal("system", "user", "assistant")
export type Role = typeof Role.Type

/**
 * completed: generation ended normally; cancelled: client cancel or disconnect; failed:
 * engine error; filtered: output moderation stopped it (its verdict is stored with it).
 */
export const TurnStatus = Schema.Literal("completed", "cancelled", "failed", "filtered")
export type TurnStatus = typeof TurnStatus.Type

/**
 * stop: end-of-sequence or a stop string; length: max_tokens; cancelled; error;
 * content_filter: output moderation; repetition: the generation looped (an n-gram repeated).
 */
export const FinishReason = Schema.Literal("stop", "length", "cancelled", "error", "content_filter", "repetition")
export type FinishReason = typeof FinishReason.Type

/** One row of a conversation's append-only history. */
export class Turn extends Schema.Class<Turn>("Turn")({
  turn_id: TurnId,
  conversation_id: ConversationId,
  seq: Schema.Int,
  role: Role,
  content: Schema.String,
  status: TurnStatus,
  num_prompt_tokens: Schema.NullOr(Schema.Int),
  num_completion_tokens: Schema.NullOr(Schema.Int),
  /** Why moderation stopped this reply (`{"category":…}` as JSON), null when it did not. */
  moderation_verdict: Schema.NullOr(Schema.String),
  created_at_ms: Schema.Number
}) {}

/** Token counts of a turn, in OpenAI's shape (`prompt_tokens_details.cached_tokens`: prompt tokens whose KV came from the prefix cache). */
export class Usage extends Schema.Class<Usage>("Usage")({
  prompt_tokens: Schema.Int,
  completion_tokens: Schema.Int,
  prompt_tokens_details: Schema.Struct({ cached_tokens: Schema.Int })
}) {}

/** Usage as plain JSON, as every wire form (SSE, data plane, turn log) carries it. */
export interface UsageJson {
  readonly prompt_tokens: number
  readonly completion_tokens: number
  readonly prompt_tokens_details: { readonly cached_tokens: number }
}

export const usageJson = (u: UsageJson): UsageJson => ({
  prompt_tokens: u.prompt_tokens,
  completion_tokens: u.completion_tokens,
  prompt_tokens_details: { cached_tokens: u.prompt_tokens_details.cached_tokens }
})

/** A decoded piece of text; `index` counts token events of this generation from 0. */
export class TokenEvent extends Schema.TaggedClass<TokenEvent>()("Token", {
  index: Schema.Int,
  text: Schema.String
}) {}

/** The terminal event: every generation ends with exactly one (a stream cut short must never pass for a finished one). */
export class DoneEvent extends Schema.TaggedClass<DoneEvent>()("Done", {
  turn_id: TurnId,
  finish_reason: FinishReason,
  usage: Usage
}) {}

export const TurnEvent = Schema.Union(TokenEvent, DoneEvent)
export type TurnEvent = typeof TurnEvent.Type

/** A UTF-16 surrogate without its pair (JSON's `"\ud800"`): not a character, not encodable as UTF-8. */
const LONE_SURROGATE = /[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?<![\uD800-\uDBFF])[\uDC00-\uDFFF]/

/** Text that PostgreSQL can store: no U+0000, no lone surrogate. */
export const StorableText = Schema.String.pipe(
  Schema.filter((s) => !s.includes("\u0000") || "must not contain U+0000 (NUL)"),
  Schema.filter((s) => !LONE_SURROGATE.test(s) || "must not contain a lone UTF-16 surrogate")
)

/**
 * A character that shows: a letter, number, punctuation or symbol that is not one of
 * Unicode's default-ignorable code points (format characters such as U+200B, the Hangul
 * fillers U+115F, U+1160, U+3164 and U+FFA0, variation selectors, tags) nor a symbol that
 * renders blank (the Braille pattern U+2800, the null notehead U+1D159, the object
 * replacement U+FFFC). Marks alone (U+0301) do not count: they show only on a base.
 */
const VISIBLE_CHARACTER = /(?![\p{Default_Ignorable_Code_Point}\u2800\uFFFC\u{1D159}])[\p{L}\p{N}\p{P}\p{S}]/u

/** Whether `text` holds a character that shows (see VISIBLE_CHARACTER): a fact must. */
export const hasVisibleCharacter = (text: string): boolean => VISIBLE_CHARACTER.test(text)

/** Input of POST /v1/conversations. */
export class CreateConversation extends Schema.Class<CreateConversation>("CreateConversation")({
  model: Schema.optional(Schema.String.pipe(Schema.minLength(1), Schema.maxLength(128))),
  system_prompt: Schema.optional(StorableText.pipe(Schema.maxLength(32_768)))
}) {}

/** Input of POST /v1/conversations/{id}/turns. */
export class UserTurnInput extends Schema.Class<UserTurnInput>("UserTurnInput")({
  role: Schema.Literal("user"),
  content: StorableText.pipe(Schema.minLength(1), Schema.maxLength(65_536)),
  max_tokens: Schema.optional(Schema.Int.pipe(Schema.between(1, 4096))),
  temperature: Schema.optional(Schema.Number.pipe(Schema.between(0, 2))),
  /** Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (Holtzman et al., 2019). */
  top_p: Schema.optional(Schema.Number.pipe(Schema.greaterThan(0), Schema.lessThanOrEqualTo(1))),
  /**
   * Up to 4 strings; generation stops before the first one and it is not returned (OpenAI's
   * `stop`). Storable text: half a surrogate pair would cut a character in two.
   */
  stop: Schema.optional(Schema.Array(StorableText.pipe(Schema.minLength(1), Schema.maxLength(64))).pipe(Schema.maxItems(4))),
  /** Sampling seed: the same seed, prompt and parameters give the same text. */
  seed: Schema.optional(Schema.Int.pipe(Schema.between(0, 2 ** 31 - 1)))
}) {}

/** A remembered fact about a user (per-user long-term memory). */
export class MemoryFact extends Schema.Class<MemoryFact>("MemoryFact")({
  fact_id: Schema.String,
  content: Schema.String,
  created_at_ms: Schema.Number
}) {}

/** `GET`/`PATCH /v1/users/{id}/memory`. */
export class UserMemory extends Schema.Class<UserMemory>("UserMemory")({
  user_id: Schema.String,
  facts: Schema.Array(MemoryFact)
}) {}

/** `PATCH /v1/users/{id}/memory`: facts to add (deduplicated, case-insensitively) and fact ids to remove. */
export class MemoryUpdate extends Schema.Class<MemoryUpdate>("MemoryUpdate")({
  // A fact is stored trimmed: one of white space only would be stored empty, one of format
  // characters (U+200B) or fillers (U+3164) shows as nothing. So it must hold a visible character.
  add: Schema.optionalWith(
    Schema.Array(
      StorableText.pipe(Schema.maxLength(500), Schema.filter((s) => hasVisibleCharacter(s) || "a fact must hold a visible character"))
    ).pipe(Schema.maxItems(32)),
    { default: () => [] }
  ),
  remove: Schema.optionalWith(Schema.Array(Schema.String.pipe(Schema.pattern(/^fact_[0-9a-f]{32}$/))).pipe(Schema.maxItems(256)), { default: () => [] })
}) {}

/** A share id: `share_` + 32 hex chars (random: the id is the capability to read). */
export const ShareId = Schema.String.pipe(Schema.pattern(/^share_[0-9a-f]{32}$/), Schema.brand("ShareId"))
export type ShareId = typeof ShareId.Type

/** A read-only link to a conversation as it was when shared. */
export class Share extends Schema.Class<Share>("Share")({
  share_id: ShareId,
  conversation_id: ConversationId,
  /** The turns with seq below this are shared. */
  num_turns: Schema.Int,
  created_at_ms: Schema.Number
}) {}

/** What `GET /v1/shared/{share_id}` shows: the conversation's turns up to the share. */
export class SharedConversation extends Schema.Class<SharedConversation>("SharedConversation")({
  share_id: ShareId,
  model: Schema.String,
  system_prompt: Schema.NullOr(Schema.String),
  turns: Schema.Array(Turn)
}) {}

/**
 * A conversation's running summary: its turns with seq < `through_seq`, folded into `content`
 * (each summary made from the previous one and the turns after it). Prompts hold it in place
 * of those turns.
 */
export class Summary extends Schema.Class<Summary>("Summary")({
  through_seq: Schema.Int,
  content: Schema.String,
  updated_at_ms: Schema.Number
}) {}

export class HistoryPage extends Schema.Class<HistoryPage>("HistoryPage")({
  turns: Schema.Array(Turn),
  next_cursor: Schema.NullOr(Schema.String),
  /** The running summary (absent until the conversation outgrew its prompt budget). */
  summary: Schema.optional(Summary),
  /** The owner's org has zero retention: the turns' text was never stored (their content is empty). */
  zero_retention: Schema.optional(Schema.Boolean)
}) {}

/** One of a user's conversations in `GET /v1/conversations`. */
export class ConversationListItem extends Schema.Class<ConversationListItem>("ConversationListItem")({
  conversation_id: ConversationId,
  model: Schema.String,
  /** The first 100 characters of its first user message ("" before one, or with zero retention). */
  title: Schema.String,
  created_at_ms: Schema.Number
}) {}

/** A page of a user's conversations, newest first; `next_cursor` is the `before` of the older page. */
export class ConversationList extends Schema.Class<ConversationList>("ConversationList")({
  data: Schema.Array(ConversationListItem),
  next_cursor: Schema.NullOr(Schema.String)
}) {}

/** Where a page of conversations starts: below this creation time, then below this id. */
export interface ConversationCursor {
  readonly created_at_ms: number
  readonly id: ConversationId
}

/** A list cursor as a client sends it back: `<created_at_ms>:<conversation_id>`. */
export const formatConversationCursor = (item: { readonly created_at_ms: number; readonly conversation_id: string }): string =>
  `${Math.trunc(item.created_at_ms)}:${item.conversation_id}`

/** The `before` query parameter of `GET /v1/conversations` (a previous page's `next_cursor`). */
export const ConversationCursorFromString: Schema.Schema<ConversationCursor, string> = Schema.transform(
  Schema.String.pipe(Schema.pattern(/^[0-9]{1,15}:[A-Za-z0-9_-]{1,64}$/, { message: () => "Expected a cursor from next_cursor" })),
  Schema.Struct({ created_at_ms: Schema.Number, id: ConversationId }),
  {
    strict: true,
    decode: (s) => {
      const i = s.indexOf(":")
      return { created_at_ms: Number(s.slice(0, i)), id: s.slice(i + 1) }
    },
    encode: (c) => `${c.created_at_ms}:${c.id}`
  }
)
