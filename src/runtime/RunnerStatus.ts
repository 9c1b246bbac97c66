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
import { Context, Duration, Effect, Layer, Schedule, Schema } from "effect"
import { StorageError } from "./Errors.js"
import { GpuWorkers } from "./GpuWorkers.js"
import { type Runner } from "./Topology.js"
import { TurnStreams } from "./TurnStream.js"

/** Rows older than this are reported as down. */
export const STALE_MS = 10_000
const REPORT_INTERVAL = Duration.seconds(2)

const GpuStatus = Schema.Struct({
  gpu_id: Schema.String,
  engine_up: Schema.Boolean,
  num_running: Schema.Number,
  num_waiting: Schema.Number,
  num_used_blocks: Schema.Number,
  num_blocks: Schema.Number,
  /** Free blocks that still hold cached KV (prefix cache). */
  num_cached_free_blocks: Schema.optional(Schema.Number),
  /** Prefix-cache lookups and hits since the engine started, in prompt tokens. */
  prefix_cache_queried_tokens: Schema.optional(Schema.Number),
  prefix_cache_hit_tokens: Schema.optional(Schema.Number)
})

/** What a runner reports of itself every 2 s. */
export const RunnerStatusRow = Schema.Struct({
  runner: Schema.String,
  roles: Schema.Array(Schema.String),
  region: Schema.String,
  pid: Schema.Number,
  num_shards: Schema.Number,
  num_entities: Schema.Number,
  num_streams: Schema.Number,
  draining: Schema.Boolean,
  gpus: Schema.Array(GpuStatus)
})
export type RunnerStatusRow = typeof RunnerStatusRow.Type

/** A runner as operators see it: `down` when its last report is older than {@link STALE_MS}. */
export const RunnerState = Schema.Struct({
  state: Schema.Literal("up", "draining", "down"),
  updated_at_ms: Schema.Number,
  status: RunnerStatusRow
})
export type RunnerState = typeof RunnerState.Type

/**
 * Reads every runner's last report (`npm run cluster -- status`, the `/ops` dashboard) and
 * asks one to drain (`npm run cluster -- drain NAME`, the dashboard's button).
 */
export class RunnerStatusView extends Context.Tag("chat/RunnerStatusView")<RunnerStatusView, {
  /** Every runner that has reported, by name. */
  readonly list: Effect.Effect<ReadonlyArray<RunnerState>, StorageError>
  /** Asks `runner` to drain; it acts on it within ~2 s. @returns false when no such runner has reported. */
  readonly requestDrain: (runner: string) => Effect.Effect<boolean, StorageError>
}>() {}

const decodeStatus = Schema.decodeUnknown(Schema.parseJson(RunnerStatusRow))

/** The view over `chat_runner_status` in the cluster's PostgreSQL. */
export const layerView: Layer.Layer<RunnerStatusView, never, SqlClient.SqlClient> = Layer.effect(
  RunnerStatusView,
  Effect.map(SqlClient.SqlClient, (sql) =>
    RunnerStatusView.of({
      list: Effect.gen(function*() {
        const rows = yield* sql<{ runner: string; status: unknown; updated_at_ms: number; drain_requested_at_ms: number | null }>`
          SELECT runner, status::text AS status, updated_at_ms, drain_requested_at_ms FROM chat_runner_status ORDER BY runner`
        const now = Date.now()
        return yield* Effect.forEach(rows, (r) =>
          Effect.map(decodeStatus(r.status), (status): RunnerState => ({
            state: now - Number(r.updated_at_ms) > STALE_MS
              ? "down"
              : status.draining || r.drain_requested_at_ms !== null
              ? "draining"
              : "up",
            updated_at_ms: Number(r.updated_at_ms),
            status
          })))
      }).pipe(Effect.mapError((e) => new StorageError({ message: `runner status: ${e.message}` }))),
      requestDrain: (runner) =>
        sql`UPDATE chat_runner_status SET drain_requested_at_ms = ${Date.now()} WHERE runner = ${runner} RETURNING runner`.pipe(
          Effect.map((rows) => rows.length > 0),
          Effect.mapError((e) => new StorageError({ message: `drain request: ${e.message}` }))
        )
    }))
)

/** A fixed view, for tests of the HTTP layer: `drained` records the drain requests. */
export const layerViewMemory = (runners: ReadonlyArray<RunnerState>, drained: Array<string> = []) =>
  Layer.succeed(RunnerStatusView, {
    list: Effect.succeed(runners),
    requestDrain: (runner) =>
      Effect.sync(() => {
        if (!runners.some((r) => r.status.runner === runner)) return false
        drained.push(runner)
        return true
      })
  })

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
