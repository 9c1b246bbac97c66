/**
 * Durable conversation history: conversations and their append-only turns in PostgreSQL
 * (`layer`), or in memory (`layerMemory`, for tests). Rows are decoded with Schema.
 */
import { Migrator, SqlClient } from "@effect/sql"
import * as RunnerStatus from "./RunnerStatus.js"
import type { SqlError } from "@effect/sql/SqlError"
import { Context, Duration, Effect, Layer, Option, Schedule, Schema, Struct } from "effect"
import { ConversationId, type ConversationCursor, ConversationListItem, MemoryFact, noValidation, type Role, Share, type ShareId, Summary, Turn, TurnId, type TurnStatus, UserId } from "./Domain.js"
import { randomUUID } from "node:crypto"
import { StorageError } from "./Errors.js"
import { ensurePartitions, monthOf, partitionTurns, upcomingMonths } from "./internal/turnPartitions.js"

export class ConversationRow extends Schema.Class<ConversationRow>("ConversationRow")({
  id: ConversationId,
  model: Schema.String,
  system_prompt: Schema.NullOr(Schema.String),
  /** The owner: only this user's requests see the conversation. */
  user_id: UserId,
  org_id: Schema.NullOr(Schema.String),
  created_at_ms: Schema.Number,
  /** Days it is kept after its last turn (its creator's tier or org); null: indefinitely. */
  retention_days: Schema.NullOr(Schema.Int)
}) {}

export interface NewTurn {
  readonly conversation_id: ConversationId
  readonly seq: number
  readonly role: Role
  readonly content: string
  readonly status: TurnStatus
  readonly num_prompt_tokens: number | null
  readonly num_completion_tokens: number | null
  readonly moderation_verdict?: string | null | undefined
  /** The conversation's org allows training on it (OrgPolicy), stamped as it is stored. */
  readonly training_eligible?: boolean | undefined
}

export interface ConversationStoreService {
  /** Whether the database answers (readiness). */
  readonly ping: Effect.Effect<void, StorageError>
  /**
   * Stores a new conversation with its first turns (`history`, stored `completed` from seq 0:
   * an OpenAI request's earlier messages), all or nothing; one whose id exists is left as it
   * is (ids are the server's: a retry).
   */
  readonly createConversation: (
    row: Omit<ConversationRow, "created_at_ms" | "retention_days"> & { readonly retention_days?: number | null | undefined },
    history?: ReadonlyArray<{ readonly role: "user" | "assistant"; readonly content: string }>
  ) => Effect.Effect<ConversationRow, StorageError>
  readonly getConversation: (id: ConversationId) => Effect.Effect<Option.Option<ConversationRow>, StorageError>
  /**
   * Appends one turn; `seq` must be the next index (the primary key rejects duplicates). A user
   * turn may carry the client's `Idempotency-Key` (unique per conversation).
   */
  readonly appendTurn: (turn: NewTurn, options?: { readonly idempotencyKey?: string | undefined }) => Effect.Effect<Turn, StorageError>
  /** A user's remembered facts, oldest first. */
  readonly listFacts: (userId: UserId) => Effect.Effect<ReadonlyArray<MemoryFact>, StorageError>
  /**
   * Adds facts (one equal to a kept fact, ignoring case and spaces at the ends, is not added
   * again) and removes fact ids, at once. `embeddings[i]`, if given, is `add[i]`'s unit vector.
   * A memory holds at most MAX_FACTS_PER_USER facts: past that the oldest are dropped.
   */
  readonly updateFacts: (
    userId: UserId,
    update: { readonly add: ReadonlyArray<string>; readonly remove: ReadonlyArray<string> },
    embeddings?: ReadonlyArray<ReadonlyArray<number> | undefined>
  ) => Effect.Effect<void, StorageError>
  /**
   * Up to `k` of a user's facts for `text`, exact top-k over all of them: ranked by the cosine
   * similarity of their embedding with `embedding` (the text's, unit vectors; 0 without one)
   * plus their PostgreSQL full-text match with the text (`ts_rank` normalised to [0, 1),
   * rank / (rank + 1)), then newest first. Empty when the user has none.
   */
  readonly topFacts: (userId: UserId, text: string, k: number, embedding?: ReadonlyArray<number>) => Effect.Effect<ReadonlyArray<string>, StorageError>
  /**
   * Up to `limit` conversations past their retention at `nowMs`: a `retention_days` and a last
   * turn (or, without turns, a creation) more than that many days before.
   */
  readonly listExpired: (nowMs: number, limit: number) => Effect.Effect<ReadonlyArray<ConversationId>, StorageError>
  /** A conversation's running summary, if one was written. */
  readonly getSummary: (id: ConversationId) => Effect.Effect<Option.Option<Summary>, StorageError>
  /**
   * Stores `summary` in place of the one through `basedOn` (null: there was none), so that a
   * summary only ever extends the one it was made from: a summary written again (a workflow
   * step re-run after a crash) or made from an older one is not stored. A conversation that
   * no longer exists gets none. @returns whether it was stored.
   */
  readonly putSummary: (id: ConversationId, summary: Summary, basedOn: number | null) => Effect.Effect<boolean, StorageError>
  /** Creates the turn partitions of the month of `nowMs` and the next two (PostgreSQL; idempotent). */
  readonly preparePartitions: (nowMs: number) => Effect.Effect<void>
  /** Deletes a conversation with its turns, shares and summary, all or nothing. */
  readonly deleteConversation: (id: ConversationId) => Effect.Effect<void, StorageError>
  /**
   * Stores a share of conversation `id`'s first `num_turns` turns; false (nothing stored) when
   * the conversation does not exist, as when it was deleted meanwhile.
   */
  readonly createShare: (share: Share) => Effect.Effect<boolean, StorageError>
  /** A share that was not revoked, with its conversation's owner. */
  readonly getShare: (shareId: ShareId) => Effect.Effect<Option.Option<{ readonly share: Share; readonly user_id: UserId }>, StorageError>
  /** Revokes a share. @returns whether one was live. */
  readonly revokeShare: (shareId: ShareId) => Effect.Effect<boolean, StorageError>
  /**
   * The user turn sent with `key` in conversation `id`, if any: its seq and its content (""
   * where the conversation's org keeps no content).
   */
  readonly findIdempotentTurn: (
    id: ConversationId,
    key: string
  ) => Effect.Effect<Option.Option<{ readonly seq: number; readonly content: string }>, StorageError>
  /** Up to `limit` turns with seq < `before` (or the latest), oldest first. */
  readonly listTurns: (
    id: ConversationId,
    options: { readonly before?: number | undefined; readonly limit: number }
  ) => Effect.Effect<ReadonlyArray<Turn>, StorageError>
  /** Up to `limit` of a user's conversations, newest first, each with its title; from after `before`. */
  readonly listConversations: (
    userId: UserId,
    options: { readonly before?: ConversationCursor | undefined; readonly limit: number }
  ) => Effect.Effect<ReadonlyArray<ConversationListItem>, StorageError>
}

/**
 * The most facts a user's memory holds (each at most 500 characters): adding more drops the
 * oldest, so that the memory, and every response that lists it, stays bounded.
 */
export const MAX_FACTS_PER_USER = 200

/** Characters of a conversation's first user message kept as its title in a listing. */
const TITLE_CHARS = 100

export class ConversationStore extends Context.Tag("chat/ConversationStore")<ConversationStore, ConversationStoreService>() {}

const turnId = (conversationId: string, seq: number) => TurnId.make(`${conversationId}:${seq}`)

/** A chat_turns row: a Turn without its derived id. */
const TurnRow = Schema.Struct(Struct.omit(Turn.fields, "turn_id"))

// Rows are typed already (our own inserts, or decoded with TurnRow): no second validation.
const toTurn = (row: typeof TurnRow.Type) =>
  new Turn({ ...row, turn_id: turnId(row.conversation_id, row.seq) }, noValidation)

/** A new conversation's first turns (its `history`) as rows, stored `completed` from seq 0. */
const historyRows = (
  id: ConversationId,
  history: ReadonlyArray<{ readonly role: "user" | "assistant"; readonly content: string }>,
  createdAtMs: number
) =>
  history.map((m, seq) => ({
    conversation_id: id,
    seq,
    role: m.role,
    content: m.content,
    status: "completed" as const,
    num_prompt_tokens: null,
    num_completion_tokens: null,
    moderation_verdict: null,
    created_at_ms: createdAtMs
  }))

/** The SqlError's own message is generic ("Failed to execute statement"): keep its cause's. */
const storageError = (what: string) => (e: SqlError | { readonly message: string; readonly cause?: unknown }) => {
  const cause = "cause" in e && e.cause instanceof Error ? `: ${e.cause.message}` : ""
  const transient = "_tag" in e && e._tag === "SqlError" && isTransient(e)
  return new StorageError({ message: `${what}: ${e.message}${cause}`, ...(transient ? { transient } : {}) })
}

/**
 * PostgreSQL's SQLSTATE of a failed statement (five digits or capitals), when the server gave
 * one. A lost or refused connection fails with a Node system error (with a `syscall`), or an
 * AggregateError of several, whose `code` (`ECONNRESET`, `ECONNREFUSED`, `EPIPE`) is no
 * SQLSTATE: it has none, and is transient.
 */
const sqlState = (e: SqlError): string | undefined => {
  const cause = e.cause as { readonly code?: unknown; readonly syscall?: unknown } | undefined
  const code = cause?.code
  return typeof code === "string" && /^[0-9A-Z]{5}$/.test(code) && cause?.syscall === undefined ? code : undefined
}

/**
 * Whether a failure may pass on retry: lost connections, terminated backends, a server
 * restarting (anything without a SQLSTATE, classes 08, 53, 57, 40), not constraint violations.
 */
const isTransient = (e: SqlError): boolean => {
  const code = sqlState(e)
  return code === undefined || /^(08|53|57|40)/.test(code)
}

/**
 * Retries of a statement on transient failures: exponential from 50 ms, at most ~6 s in all,
 * so that a database blip (backends terminated, a failover) costs a pause, not a lost turn.
 */
const retryTransient = Schedule.exponential(Duration.millis(50), 2).pipe(
  Schedule.either(Schedule.spaced(Duration.seconds(1))),
  Schedule.upTo(Duration.seconds(6))
)

/** Schema migrations of this module, applied in order by `migrate`. */
const migrations = Migrator.fromRecord({
  "1_conversations": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`CREATE TABLE IF NOT EXISTS chat_conversations (
      id text PRIMARY KEY,
      model text NOT NULL,
      system_prompt text,
      created_at_ms double precision NOT NULL
    )`
    yield* sql`CREATE TABLE IF NOT EXISTS chat_turns (
      conversation_id text NOT NULL REFERENCES chat_conversations (id),
      seq integer NOT NULL,
      role text NOT NULL,
      content text NOT NULL,
      status text NOT NULL,
      num_prompt_tokens integer,
      num_completion_tokens integer,
      created_at_ms double precision NOT NULL,
      PRIMARY KEY (conversation_id, seq)
    )`
  }),
  "2_runner_status": RunnerStatus.createTable,
  "3_idempotency_keys": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`ALTER TABLE chat_turns ADD COLUMN IF NOT EXISTS idempotency_key text`
    yield* sql`CREATE UNIQUE INDEX IF NOT EXISTS chat_turns_idempotency_key
      ON chat_turns (conversation_id, idempotency_key) WHERE idempotency_key IS NOT NULL`
  }),
  // Conversations made before identities belong to the local user (authentication off).
  "4_owners": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`ALTER TABLE chat_conversations ADD COLUMN IF NOT EXISTS user_id text NOT NULL DEFAULT 'local'`
    yield* sql`ALTER TABLE chat_conversations ADD COLUMN IF NOT EXISTS org_id text`
    yield* sql`CREATE INDEX IF NOT EXISTS chat_conversations_user ON chat_conversations (user_id, created_at_ms)`
  }),
  "5_moderation": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`ALTER TABLE chat_turns ADD COLUMN IF NOT EXISTS moderation_verdict text`
  }),
  "6_shares": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`CREATE TABLE IF NOT EXISTS chat_shares (
      share_id text PRIMARY KEY,
      conversation_id text NOT NULL REFERENCES chat_conversations (id),
      num_turns integer NOT NULL,
      created_at_ms double precision NOT NULL,
      revoked_at_ms double precision
    )`
  }),
  "7_user_memory": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`CREATE TABLE IF NOT EXISTS chat_user_memory (
      fact_id text PRIMARY KEY,
      user_id text NOT NULL,
      content text NOT NULL,
      created_at_ms double precision NOT NULL
    )`
    yield* sql`CREATE UNIQUE INDEX IF NOT EXISTS chat_user_memory_dedup ON chat_user_memory (user_id, lower(btrim(content)))`
  }),
  "8_summaries": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`CREATE TABLE IF NOT EXISTS chat_summaries (
      conversation_id text PRIMARY KEY REFERENCES chat_conversations (id),
      through_seq integer NOT NULL,
      content text NOT NULL,
      updated_at_ms double precision NOT NULL
    )`
  }),
  "9_retention": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`ALTER TABLE chat_conversations ADD COLUMN IF NOT EXISTS retention_days integer`
    yield* sql`CREATE INDEX IF NOT EXISTS chat_conversations_retention ON chat_conversations (created_at_ms) WHERE retention_days IS NOT NULL`
    yield* sql`ALTER TABLE chat_turns ADD COLUMN IF NOT EXISTS training_eligible boolean NOT NULL DEFAULT false`
  }),
  "10_turn_partitions": partitionTurns,
  "11_fact_embeddings": Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    yield* sql`ALTER TABLE chat_user_memory ADD COLUMN IF NOT EXISTS embedding real[]`
  })
})

/** A vector as a PostgreSQL array literal (finite numbers only). */
const vectorLiteral = (v: ReadonlyArray<number>): string => `{${v.map((x) => (Number.isFinite(x) ? x : 0)).join(",")}}`

/** The dot product of two vectors (the cosine of unit vectors); 0 when either is missing or they differ in length. */
const dot = (a: ReadonlyArray<number> | undefined, b: ReadonlyArray<number> | undefined): number => {
  if (a === undefined || b === undefined || a.length !== b.length) return 0
  let s = 0
  for (let i = 0; i < a.length; i++) s += a[i]! * b[i]!
  return s
}

/** Creates or upgrades this module's tables (idempotent). */
export const migrate = Migrator.make({})({ loader: migrations, table: "chat_migrations" })

const make = Effect.gen(function*() {
  const sql = yield* SqlClient.SqlClient
  const decodeConversation = Schema.decodeUnknown(ConversationRow)
  const decodeTurns = Schema.decodeUnknown(Schema.Array(TurnRow))
  const decodeShare = Schema.decodeUnknown(Share)
  const decodeFacts = Schema.decodeUnknown(Schema.Array(MemoryFact))
  const decodeSummary = Schema.decodeUnknown(Summary)
  // A conversation's month never changes: known months need no query (bounded: cleared when full).
  const months = new Map<string, number>()
  const rememberMonth = (id: string, month: number) => {
    if (months.size >= 100_000) months.clear()
    months.set(id, month)
  }
  /** The partition month of conversation `id`'s turns; StorageError when it does not exist. */
  const monthOfConversation = (id: ConversationId) => {
    const known = months.get(id)
    if (known !== undefined) return Effect.succeed(known)
    return sql<{ created_month: number }>`SELECT created_month FROM chat_conversations WHERE id = ${id}`.pipe(
      Effect.retry({ schedule: retryTransient, while: isTransient }),
      Effect.mapError(storageError("append turn")),
      Effect.flatMap((rows) => {
        const month = rows[0]?.created_month
        if (month === undefined) return Effect.fail(new StorageError({ message: `append turn: no conversation ${id}` }))
        rememberMonth(id, month)
        return Effect.succeed(month)
      })
    )
  }
  yield* ensurePartitions(upcomingMonths(Date.now()))

  return ConversationStore.of({
    ping: sql`SELECT 1`.pipe(Effect.asVoid, Effect.mapError(storageError("ping"))),
    createConversation: (row, history = []) => {
      const full = { ...row, retention_days: row.retention_days ?? null, created_at_ms: Date.now() }
      const month = monthOf(full.created_at_ms)
      const turns = historyRows(row.id, history, full.created_at_ms).map((t) => ({ ...t, conversation_month: month }))
      // Ids are random and made by the server: a row with this id is this call's own, written
      // by an attempt whose answer was lost (a retried statement, or a retried entity call).
      const insert = sql<{ id: string }>`INSERT INTO chat_conversations ${sql.insert({ ...full, created_month: month })} ON CONFLICT (id) DO NOTHING RETURNING id`.pipe(
        Effect.tap((inserted) => Effect.sync(() => inserted.length > 0 && rememberMonth(row.id, month))),
        Effect.flatMap((inserted) =>
          inserted.length === 0 || turns.length === 0 ? Effect.void : Effect.asVoid(sql`INSERT INTO chat_turns ${sql.insert(turns)}`)
        )
      )
      return (turns.length === 0 ? insert : sql.withTransaction(insert)).pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.as(new ConversationRow(full, noValidation)),
        Effect.mapError(storageError("create conversation"))
      )
    },
    getConversation: (id) =>
      sql<{ created_month: number }>`SELECT id, model, system_prompt, user_id, org_id, created_at_ms, retention_days, created_month FROM chat_conversations WHERE id = ${id}`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.tap((rows) => Effect.sync(() => rows[0] !== undefined && rememberMonth(id, rows[0].created_month))),
        Effect.flatMap((rows) => rows.length === 0 ? Effect.succeedNone : Effect.asSome(decodeConversation(rows[0]))),
        Effect.mapError(storageError("get conversation"))
      ),
    appendTurn: (turn, options) => {
      const { training_eligible, ...fields } = turn
      const row = { ...fields, moderation_verdict: turn.moderation_verdict ?? null, created_at_ms: Date.now() }
      const stamped = { ...row, training_eligible: training_eligible ?? false }
      const inserted = options?.idempotencyKey === undefined ? stamped : { ...stamped, idempotency_key: options.idempotencyKey }
      let attempts = 0
      // A retried INSERT may meet its own earlier attempt (committed, but the reply was lost):
      // the same row already there is success; any other row at that seq is a conflict. So
      // may a reply delivered twice (a FinishTurn resent after a shard move).
      const insert = (month: number) => Effect.suspend(() => {
        attempts++
        return sql`INSERT INTO chat_turns ${sql.insert({ ...inserted, conversation_month: month })}`
      }).pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.catchIf(
          (e) => (attempts > 1 || turn.role === "assistant") && sqlState(e) === "23505",
          (e) =>
            sql<{ role: string; content: string; status: string }>`SELECT role, content, status FROM chat_turns
              WHERE conversation_id = ${turn.conversation_id} AND seq = ${turn.seq}`.pipe(
              Effect.flatMap((rows) =>
                rows[0]?.role === turn.role && rows[0]?.content === turn.content && rows[0]?.status === turn.status
                  ? Effect.void
                  : Effect.fail(e)
              )
            )
        )
      )
      return Effect.flatMap(monthOfConversation(turn.conversation_id), (month) =>
        insert(month).pipe(
          Effect.as(toTurn(row)),
          Effect.mapError(storageError("append turn"))
        ))
    },
    listFacts: (userId) =>
      sql`SELECT fact_id, content, created_at_ms FROM chat_user_memory WHERE user_id = ${userId} ORDER BY created_at_ms, fact_id`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.flatMap(decodeFacts),
        Effect.mapError(storageError("list facts"))
      ),
    updateFacts: (userId, { add, remove }, embeddings) =>
      sql.withTransaction(Effect.gen(function*() {
        // One update of a user's facts at a time: a trim to the cap that cannot see another
        // update's inserts (READ COMMITTED) left more facts than the cap until both committed.
        yield* sql`SELECT pg_advisory_xact_lock(hashtext(${`facts:${userId}`}))`
        if (remove.length > 0) yield* sql`DELETE FROM chat_user_memory WHERE user_id = ${userId} AND fact_id IN ${sql.in(remove)}`
        const now = Date.now()
        for (const [i, content] of add.entries()) {
          const fact = { fact_id: `fact_${randomUUID().replaceAll("-", "")}`, user_id: userId, content: content.trim(), created_at_ms: now + i / 1000 }
          const embedding = embeddings?.[i]
          yield* embedding === undefined
            ? sql`INSERT INTO chat_user_memory ${sql.insert(fact)} ON CONFLICT DO NOTHING`
            : sql`INSERT INTO chat_user_memory (fact_id, user_id, content, created_at_ms, embedding)
                VALUES (${fact.fact_id}, ${fact.user_id}, ${fact.content}, ${fact.created_at_ms}, ${vectorLiteral(embedding)}::real[])
                ON CONFLICT DO NOTHING`
        }
        if (add.length > 0) {
          yield* sql`DELETE FROM chat_user_memory WHERE user_id = ${userId} AND fact_id IN (
            SELECT fact_id FROM chat_user_memory WHERE user_id = ${userId}
            ORDER BY created_at_ms DESC, fact_id DESC OFFSET ${MAX_FACTS_PER_USER})`
        }
      })).pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.mapError(storageError("update facts"))
      ),
    topFacts: (userId, text, k, embedding) =>
      sql<{ content: string }>`SELECT content FROM chat_user_memory WHERE user_id = ${userId}
        ORDER BY ts_rank(to_tsvector('simple', content), plainto_tsquery('simple', ${text.slice(0, 2000)}), 32)
          + COALESCE((SELECT sum(a * b) FROM unnest(embedding, ${embedding === undefined ? null : vectorLiteral(embedding)}::real[]) AS v(a, b)), 0) DESC,
          created_at_ms DESC
        LIMIT ${k}`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.map((rows) => rows.map((r) => r.content)),
        Effect.mapError(storageError("top facts"))
      ),
    listExpired: (nowMs, limit) =>
      sql<{ id: string }>`SELECT c.id FROM chat_conversations c
        WHERE c.retention_days IS NOT NULL
          AND c.created_at_ms < ${nowMs} - c.retention_days * 86400000.0
          AND COALESCE((SELECT t.created_at_ms FROM chat_turns t WHERE t.conversation_id = c.id ORDER BY t.seq DESC LIMIT 1), c.created_at_ms)
            < ${nowMs} - c.retention_days * 86400000.0
        LIMIT ${limit}`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.map((rows) => rows.map((r) => ConversationId.make(r.id))),
        Effect.mapError(storageError("list expired"))
      ),
    preparePartitions: (nowMs) => ensurePartitions(upcomingMonths(nowMs)).pipe(Effect.provideService(SqlClient.SqlClient, sql)),
    getSummary: (id) =>
      sql`SELECT through_seq, content, updated_at_ms FROM chat_summaries WHERE conversation_id = ${id}`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.flatMap((rows) => rows.length === 0 ? Effect.succeedNone : Effect.asSome(decodeSummary(rows[0]))),
        Effect.mapError(storageError("get summary"))
      ),
    putSummary: (id, summary, basedOn) => {
      const row = { conversation_id: id, through_seq: summary.through_seq, content: summary.content, updated_at_ms: summary.updated_at_ms }
      return (basedOn === null
        ? sql`INSERT INTO chat_summaries ${sql.insert(row)} ON CONFLICT (conversation_id) DO NOTHING RETURNING through_seq`
        : sql`UPDATE chat_summaries SET through_seq = ${row.through_seq}, content = ${row.content}, updated_at_ms = ${row.updated_at_ms}
            WHERE conversation_id = ${id} AND through_seq = ${basedOn} RETURNING through_seq`
      ).pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        // Not stored now: stored already by an earlier attempt (its answer lost) is success too.
        Effect.flatMap((rows) =>
          rows.length > 0 ? Effect.succeed(true) : sql<{ n: number }>`SELECT count(*)::int AS n FROM chat_summaries
            WHERE conversation_id = ${id} AND through_seq = ${row.through_seq} AND content = ${row.content}`.pipe(Effect.map((r) => (r[0]?.n ?? 0) > 0))
        ),
        // The conversation was deleted meanwhile (foreign key): nothing to summarise.
        Effect.catchIf((e) => sqlState(e) === "23503", () => Effect.succeed(false)),
        Effect.mapError(storageError("put summary"))
      )
    },
    deleteConversation: (id) =>
      sql.withTransaction(Effect.all([
        // Locked first: a summary or turn inserted meanwhile (its foreign key check waits on
        // this lock) then fails instead of making the last DELETE fail.
        sql`SELECT 1 FROM chat_conversations WHERE id = ${id} FOR UPDATE`,
        sql`DELETE FROM chat_summaries WHERE conversation_id = ${id}`,
        sql`DELETE FROM chat_shares WHERE conversation_id = ${id}`,
        sql`DELETE FROM chat_turns WHERE conversation_id = ${id}`,
        sql`DELETE FROM chat_conversations WHERE id = ${id}`
      ], { discard: true })).pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.mapError(storageError("delete conversation"))
      ),
    createShare: (share) =>
      // The share id is new: a row with it is this INSERT's own, committed by a try whose
      // answer was lost.
      sql`INSERT INTO chat_shares ${sql.insert({ ...share })} ON CONFLICT (share_id) DO NOTHING`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.as(true),
        // The conversation was deleted meanwhile (foreign key).
        Effect.catchIf((e) => sqlState(e) === "23503", () => Effect.succeed(false)),
        Effect.mapError(storageError("create share"))
      ),
    getShare: (shareId) =>
      sql<{ share_id: string; conversation_id: string; num_turns: number; created_at_ms: number; user_id: string }>`
        SELECT s.share_id, s.conversation_id, s.num_turns, s.created_at_ms, c.user_id
        FROM chat_shares s JOIN chat_conversations c ON c.id = s.conversation_id
        WHERE s.share_id = ${shareId} AND s.revoked_at_ms IS NULL`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.flatMap((rows) =>
          rows.length === 0 ? Effect.succeedNone : Effect.map(decodeShare(rows[0]), (share) => Option.some({ share, user_id: UserId.make(rows[0]!.user_id) }))
        ),
        Effect.mapError(storageError("get share"))
      ),
    revokeShare: (shareId) =>
      sql<{ share_id: string }>`UPDATE chat_shares SET revoked_at_ms = ${Date.now()}
        WHERE share_id = ${shareId} AND revoked_at_ms IS NULL RETURNING share_id`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.map((rows) => rows.length > 0),
        Effect.mapError(storageError("revoke share"))
      ),
    findIdempotentTurn: (id, key) =>
      sql<{ seq: number; content: string }>`SELECT seq, content FROM chat_turns WHERE conversation_id = ${id} AND idempotency_key = ${key}`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.map((rows) => Option.fromNullable(rows[0])),
        Effect.mapError(storageError("find idempotent turn"))
      ),
    listTurns: (id, { before, limit }) =>
      (before === undefined
        ? sql`SELECT * FROM chat_turns WHERE conversation_id = ${id} ORDER BY seq DESC LIMIT ${limit}`
        : sql`SELECT * FROM chat_turns WHERE conversation_id = ${id} AND seq < ${before} ORDER BY seq DESC LIMIT ${limit}`
      ).pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.flatMap(decodeTurns),
        Effect.map((rows) => rows.map(toTurn).reverse()),
        Effect.mapError(storageError("list turns"))
      ),
    // The title is the first user turn, looked up in the conversation's own turn partition.
    listConversations: (userId, { before, limit }) =>
      sql<{ conversation_id: string; model: string; created_at_ms: number; title: string | null }>`
        SELECT c.id AS conversation_id, c.model, c.created_at_ms,
          (SELECT left(t.content, ${TITLE_CHARS}) FROM chat_turns t
            WHERE t.conversation_id = c.id AND t.conversation_month = c.created_month AND t.role = 'user'
            ORDER BY t.seq LIMIT 1) AS title
        FROM chat_conversations c
        WHERE c.user_id = ${userId}
          ${before === undefined ? sql`` : sql`AND (c.created_at_ms, c.id) < (${before.created_at_ms}, ${before.id})`}
        ORDER BY c.created_at_ms DESC, c.id DESC
        LIMIT ${limit}`.pipe(
        Effect.retry({ schedule: retryTransient, while: isTransient }),
        Effect.map((rows) =>
          rows.map((r) =>
            new ConversationListItem({
              conversation_id: ConversationId.make(r.conversation_id),
              model: r.model,
              created_at_ms: Number(r.created_at_ms),
              title: r.title ?? ""
            }, noValidation)
          )
        ),
        Effect.mapError(storageError("list conversations"))
      )
  })
})

/**
 * Start-up reconciliation after a crash: every user turn without its reply (the process died
 * while generating it) gets its assistant turn as `failed`, at the seq that was reserved for
 * it, so that the history has no hole and no later turn takes that number. Only for a runner
 * that owns every conversation (the single-process deployment): elsewhere a reply may still
 * be streaming on another runner. @returns how many replies were filled in.
 */
export const reconcile: Effect.Effect<number, StorageError, SqlClient.SqlClient> = Effect.gen(function*() {
  const sql = yield* SqlClient.SqlClient
  const rows = yield* sql`INSERT INTO chat_turns
      (conversation_id, seq, role, content, status, num_prompt_tokens, num_completion_tokens, created_at_ms, conversation_month)
    SELECT u.conversation_id, u.seq + 1, 'assistant', '', 'failed', NULL, 0, ${Date.now()}, u.conversation_month
    FROM chat_turns u
    WHERE u.role = 'user' AND NOT EXISTS (
      SELECT 1 FROM chat_turns r WHERE r.conversation_id = u.conversation_id AND r.seq = u.seq + 1
    )
    RETURNING conversation_id`
  return rows.length
}).pipe(Effect.mapError(storageError("reconcile")))

/** PostgreSQL-backed store; runs the migrations when built. */
export const layer: Layer.Layer<ConversationStore, StorageError, SqlClient.SqlClient> = Layer.effect(
  ConversationStore,
  migrate.pipe(Effect.mapError(storageError("migrate")), Effect.zipRight(make))
)

/** In-memory store with the same semantics (duplicate ids and turn seqs are rejected). */
export const layerMemory: Layer.Layer<ConversationStore> = Layer.sync(ConversationStore, () => {
  const conversations = new Map<string, ConversationRow>()
  const turns = new Map<string, Array<Turn>>()
  const keys = new Map<string, { readonly seq: number; readonly content: string }>()
  const shares = new Map<string, Share>()
  const facts = new Map<string, Array<MemoryFact>>()
  const factEmbeddings = new Map<string, ReadonlyArray<number>>()
  const summaries = new Map<string, Summary>()
  return ConversationStore.of({
    ping: Effect.void,
    createConversation: (row, history = []) =>
      Effect.suspend(() => {
        const existing = conversations.get(row.id)
        if (existing !== undefined) return Effect.succeed(existing) // as ON CONFLICT DO NOTHING
        const full = new ConversationRow({ ...row, retention_days: row.retention_days ?? null, created_at_ms: Date.now() })
        conversations.set(row.id, full)
        turns.set(row.id, historyRows(row.id, history, full.created_at_ms).map(toTurn))
        return Effect.succeed(full)
      }),
    getConversation: (id) => Effect.sync(() => Option.fromNullable(conversations.get(id))),
    appendTurn: (turn, options) =>
      Effect.suspend(() => {
        const list = turns.get(turn.conversation_id)
        if (list === undefined) return Effect.fail(new StorageError({ message: `no conversation ${turn.conversation_id}` }))
        const existing = list.find((t) => t.seq === turn.seq)
        if (existing !== undefined) {
          // As in PostgreSQL: a reply delivered twice is success, anything else a conflict.
          const same = turn.role === "assistant" && existing.role === turn.role && existing.content === turn.content && existing.status === turn.status
          return same ? Effect.succeed(existing) : Effect.fail(new StorageError({ message: `turn ${turn.seq} exists` }))
        }
        const key = options?.idempotencyKey
        if (key !== undefined) {
          const byKey = `${turn.conversation_id}\u0000${key}`
          if (keys.has(byKey)) return Effect.fail(new StorageError({ message: `idempotency key ${key} was used` }))
          keys.set(byKey, { seq: turn.seq, content: turn.content })
        }
        const { training_eligible: _, ...fields } = turn
        const stored = toTurn({ ...fields, moderation_verdict: turn.moderation_verdict ?? null, created_at_ms: Date.now() })
        list.push(stored)
        return Effect.succeed(stored)
      }),
    listFacts: (userId) => Effect.sync(() => [...(facts.get(userId) ?? [])]),
    updateFacts: (userId, { add, remove }, embeddings) =>
      Effect.sync(() => {
        const list = (facts.get(userId) ?? []).filter((f) => !remove.includes(f.fact_id))
        for (const [i, content] of add.entries()) {
          if (list.some((f) => f.content.trim().toLowerCase() === content.trim().toLowerCase())) continue
          const fact = new MemoryFact({ fact_id: `fact_${randomUUID().replaceAll("-", "")}`, content: content.trim(), created_at_ms: Date.now() })
          list.push(fact)
          const embedding = embeddings?.[i]
          if (embedding !== undefined) factEmbeddings.set(fact.fact_id, embedding)
        }
        for (const dropped of list.splice(0, Math.max(0, list.length - MAX_FACTS_PER_USER))) factEmbeddings.delete(dropped.fact_id)
        facts.set(userId, list)
      }),
    // Without PostgreSQL's text search: the share of the fact's words in the text, in [0, 1), plus the cosine.
    topFacts: (userId, text, k, embedding) =>
      Effect.sync(() => {
        const words = new Set(text.toLowerCase().split(/\W+/).filter((w) => w.length > 0))
        const score = (f: MemoryFact) => {
          const own = f.content.toLowerCase().split(/\W+/).filter((w) => w.length > 0)
          const shared = own.filter((w) => words.has(w)).length
          return shared / (own.length + 1) + dot(factEmbeddings.get(f.fact_id), embedding)
        }
        return [...(facts.get(userId) ?? [])].sort((a, b) => score(b) - score(a) || b.created_at_ms - a.created_at_ms).slice(0, k).map((f) => f.content)
      }),
    listExpired: (nowMs, limit) =>
      Effect.sync(() => {
        const expired: Array<ConversationId> = []
        for (const row of conversations.values()) {
          if (row.retention_days === null || expired.length >= limit) continue
          const lastMs = turns.get(row.id)?.at(-1)?.created_at_ms ?? row.created_at_ms
          if (lastMs < nowMs - row.retention_days * 86_400_000) expired.push(row.id)
        }
        return expired
      }),
    preparePartitions: () => Effect.void,
    getSummary: (id) => Effect.sync(() => Option.fromNullable(summaries.get(id))),
    putSummary: (id, summary, basedOn) =>
      Effect.sync(() => {
        const current = summaries.get(id)
        if (current?.through_seq === summary.through_seq && current.content === summary.content) return true
        if (!conversations.has(id) || (current?.through_seq ?? null) !== basedOn) return false
        summaries.set(id, summary)
        return true
      }),
    deleteConversation: (id) =>
      Effect.sync(() => {
        summaries.delete(id)
        conversations.delete(id)
        turns.delete(id)
        for (const [shareId, share] of shares) if (share.conversation_id === id) shares.delete(shareId)
      }),
    createShare: (share) =>
      Effect.sync(() => {
        if (!conversations.has(share.conversation_id)) return false
        shares.set(share.share_id, share)
        return true
      }),
    getShare: (shareId) =>
      Effect.sync(() => {
        const share = shares.get(shareId)
        const owner = share === undefined ? undefined : conversations.get(share.conversation_id)?.user_id
        return share === undefined || owner === undefined ? Option.none() : Option.some({ share, user_id: owner })
      }),
    revokeShare: (shareId) => Effect.sync(() => shares.delete(shareId)),
    findIdempotentTurn: (id, key) => Effect.sync(() => Option.fromNullable(keys.get(`${id}\u0000${key}`))),
    listTurns: (id, { before, limit }) =>
      Effect.sync(() => {
        const list = (turns.get(id) ?? []).filter((t) => before === undefined || t.seq < before)
        return list.slice(Math.max(0, list.length - limit))
      }),
    listConversations: (userId, { before, limit }) =>
      Effect.sync(() =>
        [...conversations.values()]
          .filter((c) =>
            c.user_id === userId &&
            (before === undefined || c.created_at_ms < before.created_at_ms || (c.created_at_ms === before.created_at_ms && c.id < before.id))
          )
          .sort((a, b) => b.created_at_ms - a.created_at_ms || (a.id < b.id ? 1 : a.id > b.id ? -1 : 0))
          .slice(0, limit)
          .map((c) =>
            new ConversationListItem({
              conversation_id: c.id,
              model: c.model,
              created_at_ms: c.created_at_ms,
              title: (turns.get(c.id) ?? []).find((t) => t.role === "user")?.content.slice(0, TITLE_CHARS) ?? ""
            }, noValidation)
          )
      )
  })
})
