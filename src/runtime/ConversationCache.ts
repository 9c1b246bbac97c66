/**
 * The shared tier of the hot conversation state: `conv:{id}` in Redis holds what a prompt
 * needs of a conversation (system prompt, owner, running summary, the turns after it, and
 * the seq and role of its last stored turn), for 24 h after its last read or write. Every
 * gateway runner reads it when a conversation's entity starts there (a shard move, a restart)
 * instead of loading the history from PostgreSQL.
 *
 * Never a wrong prompt: writes are not ordered with the store's, so a reader checks an entry
 * against the store's last turn (one indexed row) before it uses it, and loads from the store
 * when they differ. Redis down or slow: every call answers "miss" (or does nothing) within
 * COMMAND_TIMEOUT_MS, and the conversation is served from PostgreSQL.
 *
 * The embedded single-process default has no shared tier (`layerNone`): the runner's own
 * in-process cache (src/actors/internal/hotConversations.ts) is all it needs.
 */
import { Context, Duration, Effect, Layer, Option, Schema } from "effect"
import { Redis } from "ioredis"
import { ConversationId, Summary, UserId } from "./Domain.js"
import { failFastRedisOptions } from "./internal/redisOptions.js"

/** One `conv:{id}` entry. */
export const CachedConversation = Schema.Struct({
  pool: Schema.String,
  user_id: UserId,
  org_id: Schema.NullOr(Schema.String),
  system_prompt: Schema.NullOr(Schema.String),
  summary: Schema.optional(Summary),
  /** The next turn's seq (a last user turn's reply keeps its own reserved). */
  next_seq: Schema.Int,
  /** The last stored turn: what the entry is checked against. */
  last: Schema.NullOr(Schema.Struct({ seq: Schema.Int, role: Schema.Literal("user", "assistant", "system") })),
  /** The turns after the summary (all of them without one), oldest first, failed and filtered ones left out. */
  messages: Schema.Array(Schema.Struct({ seq: Schema.Int, role: Schema.Literal("user", "assistant"), content: Schema.String }))
})
export type CachedConversation = typeof CachedConversation.Type

/**
 * Hits and misses of `get` since start (a miss includes Redis unavailable), and where the
 * Conversation entities of this runner found a conversation's state when they started
 * (`recordLoad`): the runner's own memory, the shared entry, or the store.
 */
export interface CacheStats {
  hits: number
  misses: number
  /**
   * process: the runner's memory, no store read (it held the shard since); checked: the
   * runner's memory after one read of the store's last turn; shared: the Redis entry after
   * that read; store: loaded from the store.
   */
  loads: { process: number; checked: number; shared: number; store: number }
}

/** Where a Conversation entity found its state when it started. */
export type LoadSource = keyof CacheStats["loads"]

export class ConversationCache extends Context.Tag("chat/ConversationCache")<ConversationCache, {
  readonly get: (id: ConversationId) => Effect.Effect<Option.Option<CachedConversation>>
  readonly put: (id: ConversationId, entry: CachedConversation) => Effect.Effect<void>
  readonly delete: (id: ConversationId) => Effect.Effect<void>
  readonly stats: CacheStats
  /** Counts a Conversation entity's start by where its state came from. */
  readonly recordLoad: (source: LoadSource) => void
  /** Whether there is a shared tier at all (false: `layerNone`). */
  readonly enabled: boolean
}>() {}

/** An entry lives this long after its last read or write. */
export const ENTRY_TTL_S = 24 * 3600
/** A Redis command that takes longer counts as a miss. */
const COMMAND_TIMEOUT_MS = 250

const decodeEntry = Schema.decodeUnknownOption(Schema.parseJson(CachedConversation))
const encodeEntry = Schema.encodeSync(Schema.parseJson(CachedConversation))

/** Redis at `url`; keys start with `prefix` (tests use one of their own). */
export const layerRedis = (url: string, prefix: string) =>
  Layer.scoped(
    ConversationCache,
    Effect.gen(function*() {
      const redis = new Redis(url, failFastRedisOptions(COMMAND_TIMEOUT_MS))
      let down = false
      redis.on("error", () => {
        if (!down) console.warn(`ConversationCache: Redis at ${url} unreachable; conversations load from PostgreSQL meanwhile`)
        down = true
      })
      redis.on("ready", () => (down = false))
      yield* Effect.addFinalizer(() => Effect.promise(() => redis.quit().catch(() => undefined)))
      const key = (id: ConversationId) => `${prefix}conv:${id}`
      const stats: CacheStats = { hits: 0, misses: 0, loads: { process: 0, checked: 0, shared: 0, store: 0 } }
      const attempt = <A>(run: () => Promise<A>) =>
        Effect.tryPromise(run).pipe(Effect.timeout(Duration.millis(2 * COMMAND_TIMEOUT_MS)), Effect.option)
      return ConversationCache.of({
        enabled: true,
        stats,
        recordLoad: (source) => void stats.loads[source]++,
        // GETEX: the read renews the entry's TTL (promoted on read).
        get: (id) =>
          Effect.map(
            redis.status === "ready" ? attempt(() => redis.getex(key(id), "EX", ENTRY_TTL_S)) : Effect.succeedNone,
            (raw) => {
              const entry = Option.flatMap(Option.flatMap(raw, Option.fromNullable), decodeEntry)
              if (Option.isSome(entry)) stats.hits++
              else stats.misses++
              return entry
            }
          ),
        put: (id, entry) =>
          redis.status === "ready" ? Effect.asVoid(attempt(() => redis.set(key(id), encodeEntry(entry), "EX", ENTRY_TTL_S))) : Effect.void,
        delete: (id) => redis.status === "ready" ? Effect.asVoid(attempt(() => redis.del(key(id)))) : Effect.void
      })
    })
  )

/** No shared tier: every `get` misses, nothing is written. */
export const layerNone = Layer.sync(ConversationCache, () => {
  const stats: CacheStats = { hits: 0, misses: 0, loads: { process: 0, checked: 0, shared: 0, store: 0 } }
  return ConversationCache.of({
    enabled: false,
    stats,
    recordLoad: (source) => void stats.loads[source]++,
    get: () => Effect.succeedNone,
    put: () => Effect.void,
    delete: () => Effect.void
  })
})
