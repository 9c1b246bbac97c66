/**
 * The runner's hot conversation state: what a Conversation entity loaded from the store
 * (system prompt, history, next seq), kept after the entity instance is reaped so that the
 * next message to that conversation (its FinishTurn, the user's next turn) needs no query.
 * The entity instances themselves are dropped 1 s after their last message: each holds
 * ~20 KB of cluster machinery (measured with bench/serve/heap-diff.ts), this state holds the
 * text. The in-process tier of the hot history (docs/architecture.md).
 *
 * Least recently used entries go first once the total exceeds `maxChars` (UTF-16 code units
 * of system prompt + history, plus a fixed cost per entry).
 *
 * Staleness: a conversation's entity lives on one runner at a time, and the state is only
 * written by it. Were a shard to move to another runner and back, this runner's entry could
 * miss turns written meanwhile; its next append then reuses a seq that the store's primary key
 * rejects, and the entity drops the entry (`delete`) so that the next message reloads it.
 */
import type { Summary, UserId } from "../../runtime/Domain.js"
import type { ChatMessage } from "../../runtime/Tokenizer.js"
import type { PromptCache } from "./promptAssembly.js"

export interface ConversationState {
  readonly pool: string
  /** The owner: their remembered facts go into the prompt. */
  readonly userId: UserId
  /** The owner's org (its data rules: training eligibility). */
  readonly orgId: string | null
  readonly systemPrompt: string | null
  readonly history: Array<ChatMessage>
  /** The stored seq of each `history` message (failed and filtered turns are not in it). */
  readonly seqs: Array<number>
  /** What prompt assembly keeps between turns (history messages' token ids). */
  readonly cache: PromptCache
  /** The running summary of the turns before the prompt's window (src/actors/Summaries.ts). */
  summary: Summary | undefined
  /** The `through_seq` of a summary workflow this runner started and awaits. */
  summaryPending?: number | undefined
  /** After a summary workflow failed, none starts again before this time (ms since epoch). */
  summaryRetryAfterMs?: number | undefined
  nextSeq: number
  /**
   * With several runners: the runner's tenure of the conversation's shard when the state was
   * checked against the store (shardTenure.ts), and the store's last turn then (or since, as
   * written here). While the tenure holds, the state is the runner's own and needs no check.
   */
  tenure?: number | undefined
  lastStored?: { readonly seq: number; readonly role: string } | undefined
  /** The GPU that ran its last turn (its KV is cached there): conversation-affine routing. */
  lastGpuId?: string | undefined
}

/** Per-entry overhead counted against the budget, in chars (~bytes of a small object). */
const ENTRY_COST_CHARS = 256
/** Per-message overhead, in chars. */
const MESSAGE_COST_CHARS = 16

const sizeOf = (state: ConversationState): number => {
  let chars = ENTRY_COST_CHARS + (state.systemPrompt?.length ?? 0) + (state.summary?.content.length ?? 0)
  for (const m of state.history) chars += m.content.length + MESSAGE_COST_CHARS
  // ~2 bytes per char: 4-byte ids count as 2 chars each.
  for (const ids of state.cache.historyIds) if (ids !== undefined) chars += 2 * ids.length
  return chars
}

export class HotConversations {
  // A Map iterates in insertion order: re-inserting on use keeps the oldest first.
  private readonly entries = new Map<string, { state: ConversationState; chars: number }>()
  private totalChars = 0

  constructor(readonly maxChars: number) {}

  get size(): number {
    return this.entries.size
  }

  get(id: string): ConversationState | undefined {
    const entry = this.entries.get(id)
    if (entry === undefined) return undefined
    this.entries.delete(id)
    this.entries.set(id, entry)
    return entry.state
  }

  /** Stores (or re-measures, after the state grew) a conversation's state. */
  set(id: string, state: ConversationState): void {
    this.delete(id)
    const chars = sizeOf(state)
    this.entries.set(id, { state, chars })
    this.totalChars += chars
    this.evictBut(id)
  }

  /**
   * Marks a conversation's state as used, after `message` (if any) was appended to its
   * history: counts that message alone instead of measuring the whole history again.
   */
  grew(id: string, state: ConversationState, message?: ChatMessage): void {
    const entry = this.entries.get(id)
    if (entry === undefined || entry.state !== state) return this.set(id, state)
    this.entries.delete(id)
    this.entries.set(id, entry)
    if (message === undefined) return
    const chars = message.content.length + MESSAGE_COST_CHARS + 4 // its seq
    entry.chars += chars
    this.totalChars += chars
    this.evictBut(id)
  }

  /** Drops the least recently used entries until within budget, never `keep`. */
  private evictBut(keep: string): void {
    for (const [oldest, entry] of this.entries) {
      if (this.totalChars <= this.maxChars || oldest === keep) break
      this.entries.delete(oldest)
      this.totalChars -= entry.chars
    }
  }

  delete(id: string): void {
    const entry = this.entries.get(id)
    if (entry === undefined) return
    this.entries.delete(id)
    this.totalChars -= entry.chars
  }
}
