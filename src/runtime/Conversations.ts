/**
 * The facade the HTTP layer talks to. The real layer (src/actors/ConversationsLive.ts) routes
 * each call to the Conversation entity of the cluster; tests may provide an in-memory layer.
 */
import { Context, type Effect, type Stream } from "effect"
import type {
  ConversationId,
  CreateConversation,
  HistoryPage,
  TurnEvent,
  UserTurnInput
} from "./Domain.js"
import type {
  ConversationNotFound,
  EngineError,
  GenerationFailed,
  ModelNotFound,
  PromptTooLong,
  StorageError,
  TurnInProgress
} from "./Errors.js"

export type SendTurnError = ConversationNotFound | TurnInProgress | PromptTooLong | StorageError | EngineError
export type StreamError = GenerationFailed | EngineError

export interface ConversationsService {
  /** Creates a conversation (durably) and returns its id. */
  readonly create: (input: CreateConversation) => Effect.Effect<ConversationId, ModelNotFound | StorageError>
  /**
   * Appends the user turn durably, then starts generation. The outer effect succeeds only once
   * the user turn is stored (the acknowledgement point); its failures map to 404/409/400.
   * The inner stream yields token events and ends with exactly one DoneEvent. Interrupting
   * the stream (client gone) cancels the generation like `cancel`.
   */
  readonly sendTurn: (
    id: ConversationId,
    input: UserTurnInput
  ) => Effect.Effect<Stream.Stream<TurnEvent, StreamError>, SendTurnError>
  /** Stops the running generation, if any; its KV blocks are freed within one scheduler step. */
  readonly cancel: (id: ConversationId) => Effect.Effect<void, ConversationNotFound | StorageError>
  /**
   * History page: the `limit` most recent turns with seq < `before` (all when absent), in
   * chronological order; `next_cursor` is the seq to pass as `before` for the older page.
   */
  readonly history: (
    id: ConversationId,
    options: { readonly before?: number | undefined; readonly limit: number }
  ) => Effect.Effect<HistoryPage, ConversationNotFound | StorageError>
}

export class Conversations extends Context.Tag("chat/Conversations")<Conversations, ConversationsService>() {}
