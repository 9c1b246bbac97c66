/**
 * Each runner's status, for operators: every 2 s a runner writes a row of
 * `chat_runner_status` (roles, region, shards it owns, live entities, open streams, and per
 * GPU its KV blocks and running and waiting sequences), and reads whether a drain was asked
 * for it (`npm run cluster -- drain NAME` sets `drain_requested_at_ms`). A drain is the
 * runner's graceful stop (as on SIGTERM): new sequences go elsewhere, turns in flight finish
 * up to the grace period, then its shards are handed over.
 *
 * `scripts/cluster.ts` reads the rows; one older than 10 s is reported as down.
 */
import { ShardId, Sharding } from "@effect/cluster"
import { SqlClient } from "@effect/sql"
import { Duration, Effect, Layer, Schedule } from "effect"
import { GpuWorkers } from "./GpuWorkers.js"
import { type Runner } from "./Topology.js"
import { TurnStreams } from "./TurnStream.js"

/** Rows older than this are reported as down. */
export const STALE_MS = 10_000
const REPORT_INTERVAL = Duration.seconds(2)

export interface RunnerStatusRow {
  readonly runner: string
  readonly roles: ReadonlyArray<string>
  readonly region: string
  readonly pid: number
  readonly num_shards: number
  readonly num_entities: number
  readonly num_streams: number
  readonly draining: boolean
  readonly gpus: ReadonlyArray<{
    readonly gpu_id: string
    readonly engine_up: boolean
    readonly num_running: number
    readonly num_waiting: number
    readonly num_used_blocks: number
    readonly num_blocks: number
    /** Free blocks that still hold cached KV (prefix cache). */
    readonly num_cached_free_blocks?: number
    /** Prefix-cache lookups and hits since the engine started, in prompt tokens. */
    readonly prefix_cache_queried_tokens?: number
    readonly prefix_cache_hit_tokens?: number
  }>
}

/** Creates the table (idempotent; run by Storage's migrations). */
export const createTable = Effect.flatMap(SqlClient.SqlClient, (sql) =>
  sql`CREATE TABLE IF NOT EXISTS chat_runner_status (
    runner text PRIMARY KEY,
    status jsonb NOT NULL,
    updated_at_ms double precision NOT NULL,
    drain_requested_at_ms double precision
  )`)

/**
 * Reports runner `runner` while the layer lives; `onDrain` runs once when a drain is asked for.
 * `shardGroups`: the groups this runner may own, `shardsPerGroup` shards each.
 */
export const layer = (options: {
  readonly runner: Runner
  readonly shardGroups: ReadonlyArray<string>
  readonly shardsPerGroup: number
  readonly onDrain: Effect.Effect<void>
}) =>
  Layer.scopedDiscard(Effect.gen(function*() {
    const sql = yield* SqlClient.SqlClient
    const sharding = yield* Sharding.Sharding
    const workers = yield* GpuWorkers
    const streams = yield* TurnStreams
    let draining = false
    const report = Effect.gen(function*() {
      let numShards = 0
      for (const group of options.shardGroups) {
        for (let i = 1; i <= options.shardsPerGroup; i++) if (sharding.hasShardId(ShardId.make(group, i))) numShards++
      }
      const gpus = yield* Effect.forEach(workers.all, (w) =>
        Effect.map(w.stats, (s) => ({
          gpu_id: w.gpuId,
          engine_up: w.isEngineUp(),
          num_running: s.numRunning,
          num_waiting: s.numWaiting,
          num_used_blocks: s.numBlocks - s.numFreeBlocks,
          num_blocks: s.numBlocks,
          num_cached_free_blocks: s.numCachedFreeBlocks,
          prefix_cache_queried_tokens: s.numPrefixQueriedTokens,
          prefix_cache_hit_tokens: s.numPrefixHitTokens
        })))
      const row: RunnerStatusRow = {
        runner: options.runner.name,
        roles: options.runner.roles,
        region: options.runner.region,
        pid: process.pid,
        num_shards: numShards,
        num_entities: yield* sharding.activeEntityCount,
        num_streams: streams.size(),
        draining,
        gpus
      }
      const rows = yield* sql<{ drain_requested_at_ms: number | null }>`
        INSERT INTO chat_runner_status (runner, status, updated_at_ms) VALUES (${row.runner}, ${JSON.stringify(row)}::jsonb, ${Date.now()})
        ON CONFLICT (runner) DO UPDATE SET status = EXCLUDED.status, updated_at_ms = EXCLUDED.updated_at_ms
        RETURNING drain_requested_at_ms`
      if (!draining && rows[0]?.drain_requested_at_ms != null) {
        draining = true
        yield* Effect.logWarning(`drain requested for runner ${row.runner}: stopping gracefully`)
        yield* options.onDrain
      }
    })
    // A fresh start clears an earlier drain request.
    yield* sql`UPDATE chat_runner_status SET drain_requested_at_ms = NULL WHERE runner = ${options.runner.name}`.pipe(Effect.ignore)
    yield* report.pipe(
      Effect.catchAllCause((cause) => Effect.logDebug("runner status not written", cause)),
      Effect.repeat(Schedule.spaced(REPORT_INTERVAL)),
      Effect.forkScoped
    )
  }))
