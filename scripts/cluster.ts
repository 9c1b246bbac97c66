/**
 * Operators' command for a multi-runner cluster (reads and writes the PostgreSQL of
 * DATABASE_URL, where every runner reports itself every 2 s; see src/runtime/RunnerStatus.ts):
 *
 *   npm run cluster -- status         runners (up/down, roles, region), shards, live entities,
 *                                     open streams, and per GPU: KV blocks used, running and
 *                                     waiting sequences
 *   npm run cluster -- drain NAME     asks runner NAME to stop gracefully: it admits no new
 *                                     sequences, lets turns in flight finish (SHUTDOWN_GRACE_MS),
 *                                     then hands its shards over and exits
 */
import { PgClient } from "@effect/sql-pg"
import { Effect, Layer, Redacted } from "effect"
import { layerView, RunnerStatusView } from "../src/runtime/RunnerStatus.js"

const [command, name] = process.argv.slice(2)
const url = process.env["DATABASE_URL"]
if (url === undefined || (command !== "status" && command !== "drain") || (command === "drain" && name === undefined)) {
  console.error("usage: DATABASE_URL=… npm run cluster -- status | drain NAME")
  process.exit(2)
}

const status = Effect.gen(function*() {
  const runners = yield* (yield* RunnerStatusView).list
  if (runners.length === 0) return console.log("no runner has reported (is DATABASE_URL the cluster's database?)")
  console.log("runner     state     roles         region   shards  entities  streams")
  for (const { state, status: s } of runners) {
    console.log(
      `${s.runner.padEnd(10)} ${state.padEnd(9)} ${s.roles.join(",").padEnd(13)} ${s.region.padEnd(8)} ${String(s.num_shards).padStart(6)}  ${String(s.num_entities).padStart(8)}  ${String(s.num_streams).padStart(7)}`
    )
    for (const g of s.gpus) {
      console.log(
        `  ${g.gpu_id}: engine ${g.engine_up ? "up" : "DOWN"}, KV ${g.num_used_blocks}/${g.num_blocks} blocks, ${g.num_running} running, ${g.num_waiting} waiting` +
          (g.prefix_cache_queried_tokens === undefined ? "" : `, prefix cache ${g.prefix_cache_hit_tokens}/${g.prefix_cache_queried_tokens} prompt tokens hit, ${g.num_cached_free_blocks} cached free blocks`)
      )
    }
  }
})

const drain = Effect.gen(function*() {
  if (!(yield* (yield* RunnerStatusView).requestDrain(name!))) {
    console.error(`no runner named ${name} has reported`)
    process.exitCode = 1
    return
  }
  console.log(`drain requested for ${name}: it stops within ~2 s, after its turns in flight (SHUTDOWN_GRACE_MS)`)
})

Effect.runPromise((command === "status" ? status : drain).pipe(
  Effect.provide(layerView.pipe(Layer.provide(PgClient.layer({ url: Redacted.make(url), maxConnections: 1 }))))
)).catch((e) => {
  console.error(String(e))
  process.exit(1)
})
