/**
 * chat_turns is partitioned by month (PostgreSQL declarative range partitioning): by the
 * month its conversation was created (`conversation_month`, months since year 0, UTC), so
 * that all turns of a conversation share a partition and the primary key (conversation_id,
 * seq, conversation_month) still makes (conversation_id, seq) unique. A DEFAULT partition
 * takes rows of a month whose partition is missing; the current month's and the next two
 * are created at start-up and by the hourly retention job.
 */
import { SqlClient } from "@effect/sql"
import { Effect } from "effect"

/** The month index of a time: year * 12 + month (0-based), UTC. */
export const monthOf = (ms: number): number => {
  const d = new Date(ms)
  return d.getUTCFullYear() * 12 + d.getUTCMonth()
}

const partitionName = (month: number) => `chat_turns_m${Math.floor(month / 12)}${String((month % 12) + 1).padStart(2, "0")}`

/**
 * Creates the partitions of `months` that are missing. One whose rows went to the DEFAULT
 * partition meanwhile cannot be created (they stay there, still found by every query).
 */
export const ensurePartitions = (months: ReadonlyArray<number>) =>
  Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    for (const month of months) {
      yield* sql.unsafe(`CREATE TABLE IF NOT EXISTS ${partitionName(month)} PARTITION OF chat_turns FOR VALUES FROM (${month}) TO (${month + 1})`).pipe(
        Effect.catchAll((e) => Effect.logWarning(`turn partition ${partitionName(month)} not created`, e))
      )
    }
  })

/** The current month and the next two. */
export const upcomingMonths = (nowMs: number): Array<number> => {
  const now = monthOf(nowMs)
  return [now, now + 1, now + 2]
}

/** Migration: the unpartitioned chat_turns becomes the partitioned one, rows kept. */
export const partitionTurns = Effect.gen(function*() {
  const sql = yield* SqlClient.SqlClient
  yield* sql`ALTER TABLE chat_conversations ADD COLUMN IF NOT EXISTS created_month integer`
  yield* sql`UPDATE chat_conversations
    SET created_month = (extract(year FROM to_timestamp(created_at_ms / 1000.0) AT TIME ZONE 'UTC') * 12
      + extract(month FROM to_timestamp(created_at_ms / 1000.0) AT TIME ZONE 'UTC') - 1)::int
    WHERE created_month IS NULL`
  yield* sql`ALTER TABLE chat_turns RENAME TO chat_turns_unpartitioned`
  yield* sql`ALTER TABLE chat_turns_unpartitioned RENAME CONSTRAINT chat_turns_pkey TO chat_turns_unpartitioned_pkey`
  yield* sql`ALTER INDEX IF EXISTS chat_turns_idempotency_key RENAME TO chat_turns_unpartitioned_idempotency_key`
  yield* sql`CREATE TABLE chat_turns (
    conversation_id text NOT NULL REFERENCES chat_conversations (id),
    seq integer NOT NULL,
    role text NOT NULL,
    content text NOT NULL,
    status text NOT NULL,
    num_prompt_tokens integer,
    num_completion_tokens integer,
    created_at_ms double precision NOT NULL,
    idempotency_key text,
    moderation_verdict text,
    training_eligible boolean NOT NULL DEFAULT false,
    conversation_month integer NOT NULL,
    PRIMARY KEY (conversation_id, seq, conversation_month)
  ) PARTITION BY RANGE (conversation_month)`
  yield* sql`CREATE TABLE chat_turns_default PARTITION OF chat_turns DEFAULT`
  const months = yield* sql<{ m: number }>`SELECT DISTINCT created_month AS m FROM chat_conversations`
  yield* ensurePartitions([...new Set([...months.map((r) => r.m), ...upcomingMonths(Date.now())])])
  yield* sql`INSERT INTO chat_turns (conversation_id, seq, role, content, status, num_prompt_tokens, num_completion_tokens,
      created_at_ms, idempotency_key, moderation_verdict, training_eligible, conversation_month)
    SELECT t.conversation_id, t.seq, t.role, t.content, t.status, t.num_prompt_tokens, t.num_completion_tokens,
      t.created_at_ms, t.idempotency_key, t.moderation_verdict, t.training_eligible, c.created_month
    FROM chat_turns_unpartitioned t JOIN chat_conversations c ON c.id = t.conversation_id`
  yield* sql`DROP TABLE chat_turns_unpartitioned`
  yield* sql`CREATE UNIQUE INDEX chat_turns_idempotency_key
    ON chat_turns (conversation_id, idempotency_key, conversation_month) WHERE idempotency_key IS NOT NULL`
})
