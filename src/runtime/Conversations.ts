/**
 * The facade the HTTP layer talks to. The real layer (src/actors/ConversationsLive.ts) routes
 * each call to the Conversation entity of the cluster; tests may provide an in-memory layer.
 */
import { Context, type Effect } from "effect"
import type { ConversationCursor, ConversationId, ConversationList, CreateConversation, HistoryPage, Identity, MemoryUpdate, Share, SharedConversation, ShareId, TurnId, UserMemory, UserTurnInput } from "./Domain.js"
import type {
  ContentFiltered,
  ConversationNotFound,
  DuplicateTurn,
  EngineError,
  IdempotencyKeyReused,
  ModelNotFound,
  Overloaded,
  PromptTooLong,
  ShuttingDown,
  StorageError,
  TurnInProgress
} from "./Errors.js"
import type { LoggedEvent } from "./TurnEventLog.js"
import type { TurnStream } from "./TurnStream.js"
import type { Option, Stream } from "effect"
import type { ShareNotFound, StreamNotFound, TurnEventsUnavailable, UserNotFound } from "./Errors.js"

export type SendTurnError =
  | ContentFiltered
  | ConversationNotFound
  | DuplicateTurn
  | IdempotencyKeyReused
  | TurnInProgress
  | PromptTooLong
  | StorageError
  | EngineError
  | Overloaded
  | ShuttingDown

/**
 * Every call but `drain` and `notReady` acts for `owner` (the request's identity): a
 * conversation of another user is ConversationNotFound, exactly as one that does not exist.
 */
export interface ConversationsService {
  /**
   * Creates a conversation (durably) and returns its id. EngineError `unavailable`: the cluster
   * could not reach the conversation's entity (its shard moving for longer than ~5 s); so for
   * `cancel` and `resume`.
   */
  readonly create: (
    owner: Identity,
    input: CreateConversation
  ) => Effect.Effect<
    { readonly id: ConversationId; readonly model: string; readonly region: string },
    ModelNotFound | ContentFiltered | PromptTooLong | StorageError | EngineError
  >
  /**
   * Appends the user turn durably, then starts generation. The effect succeeds only once the
   * user turn is stored (the acknowledgement point); its failures map to 404/409/400/503.
   * The TurnStream carries the text, then exactly one `done` (or `error`) event; consume it
   * with `toSse` or `toStream`. A consumer that goes away cancels the generation like
   * `cancel`; one that never attaches does so after 15 s.
   */
  readonly sendTurn: (
    owner: Identity,
    id: ConversationId,
    input: UserTurnInput,
    options?: {
      /**
       * The client's Idempotency-Key: a turn re-sent with a key this conversation took fails
       * with DuplicateTurn naming that turn (resume it), and stores nothing; a different
       * message sent with it fails with IdempotencyKeyReused.
       */
      readonly idempotencyKey?: string | undefined
    }
  ) => Effect.Effect<TurnStream, SendTurnError>
  /**
   * A chat completion (the OpenAI API's): a new conversation of `owner` on pool `model`,
   * holding `system_prompt` and `history`, takes `turn` as its next user turn. The exchange is
   * stored like any conversation's (its id is returned: the client may go on natively).
   */
  readonly complete: (
    owner: Identity,
    request: {
      readonly model: string
      readonly system_prompt: string | null
      readonly history: ReadonlyArray<{ readonly role: "user" | "assistant"; readonly content: string }>
      readonly turn: UserTurnInput
    }
  ) => Effect.Effect<{ readonly conversationId: ConversationId; readonly stream: TurnStream }, SendTurnError | ModelNotFound>
  /** Stops the running generation, if any; its KV blocks are freed within one scheduler step. */
  readonly cancel: (owner: Identity, id: ConversationId) => Effect.Effect<void, ConversationNotFound | StorageError | EngineError>
  /**
   * History page: the `limit` most recent turns with seq < `before` (all when absent), in
   * chronological order; `next_cursor` is the seq to pass as `before` for the older page.
   */
  readonly history: (
    owner: Identity,
    id: ConversationId,
    options: { readonly before?: number | undefined; readonly limit: number }
  ) => Effect.Effect<HistoryPage, ConversationNotFound | StorageError>
  /** The caller's conversations, newest first, `limit` per page, older than the `before` cursor. */
  readonly list: (
    owner: Identity,
    options: { readonly before?: ConversationCursor | undefined; readonly limit: number }
  ) => Effect.Effect<ConversationList, StorageError>
  /**
   * Graceful stop: new turns fail with ShuttingDown from now on; turns in flight may finish
   * within `graceMs`; the rest are stopped (stored `cancelled` with their text so far, their
   * streams ending with `event: error` code `shutting_down`). Succeeds once every turn is
   * stored (or after a bounded wait for that).
   */
  readonly drain: (graceMs: number) => Effect.Effect<void>
  /**
   * Resumes a turn's stream: the events after `after` (the turn and index of the client's
   * Last-Event-ID), or without it the in-flight turn's from its start, then the live ones.
   * None when there is nothing to send (no turn in flight, or the client saw the end).
   * Fails with StreamNotFound when `after` names a turn whose log is unknown or expired.
   */
  readonly resume: (
    owner: Identity,
    id: ConversationId,
    after: { readonly turnId: TurnId; readonly index: number } | undefined
  ) => Effect.Effect<
    Option.Option<{ readonly turnId: TurnId; readonly events: Stream.Stream<LoggedEvent, TurnEventsUnavailable> }>,
    ConversationNotFound | StorageError | StreamNotFound | TurnEventsUnavailable | EngineError
  >
  /**
   * Deletes conversation `id` with everything of it (turns, shares, cached state); a running
   * turn is stopped first. Afterwards it does not exist (404) on every route.
   */
  readonly remove: (owner: Identity, id: ConversationId) => Effect.Effect<void, ConversationNotFound | StorageError | EngineError>
  /** Shares conversation `id` as it is now (its stored turns): a read-only link's id. */
  readonly share: (owner: Identity, id: ConversationId) => Effect.Effect<Share, ConversationNotFound | StorageError>
  /** A shared conversation, for anyone with its id; ShareNotFound once revoked. */
  readonly shared: (shareId: ShareId) => Effect.Effect<SharedConversation, ShareNotFound | StorageError>
  /** Revokes the owner's share. */
  readonly revokeShare: (owner: Identity, shareId: ShareId) => Effect.Effect<void, ShareNotFound | StorageError>
  /** A user's remembered facts; `user` is `me` or the caller's own id (anyone else: UserNotFound). */
  readonly memory: (owner: Identity, user: string) => Effect.Effect<UserMemory, UserNotFound | StorageError>
  /** Adds and removes a user's facts; returns them all. Same rule as `memory`. */
  readonly updateMemory: (owner: Identity, user: string, update: MemoryUpdate) => Effect.Effect<UserMemory, UserNotFound | StorageError>
  /** The model (pool) names `owner`'s tier lets a conversation or completion name. */
  readonly models: (owner: Identity) => ReadonlyArray<string>
  /** Readiness: `undefined` when turns can be served, else what is not ready. */
  readonly notReady: Effect.Effect<string | undefined>
}

export class Conversations extends Context.Tag("chat/Conversations")<Conversations, ConversationsService>() {}
