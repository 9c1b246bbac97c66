/**
 * The runner storage with its shard lock calls made urgent. Sharding refreshes its shard locks
 * every `min(shardLockRefreshInterval, shardLockExpiration / 3)` and gives up every shard the
 * runner holds (interrupting their entities) when a refresh misses that deadline. Under load a
 * refresh's fiber hops queued behind thousands of stream tasks (each for EventLoopScheduler's
 * `maxWaitMs` or, under sustained overload, longer), so `acquire` and `refresh` run at
 * `URGENT_PRIORITY`: their hops skip the queue.
 * A refresh slower than half its deadline is logged: the lease is close to lapsing.
 *
 * Fibers forked inside these calls inherit the priority for life; the SQL runner storage forks
 * only short ones (its lock connection's rebuild).
 *
 * `soleRunner` (the one-runner deployment): a refresh that fails or does not answer in time
 * (the database unreachable) keeps the shards the runner holds instead of failing. Otherwise
 * Sharding takes the lock storage for unhealthy after one missed deadline (1.5 s of a database
 * outage), gives up every shard, interrupting their entities, and takes them back only once
 * every one of those entities has closed. In a drill (a user turn's INSERT cut off mid-way,
 * then the database gone for 9 s: test/e2e/drills.test.ts) that never happened, and every
 * entity call of the service hung for good after the database was back. There is no other
 * runner to hand the shards to; a refresh that answers still decides (a lock lost to another
 * process started on the same database is given up).
 */
import { RunnerStorage, ShardingConfig, type ShardId } from "@effect/cluster"
import { type Cause, Duration, Effect, Layer } from "effect"
import { URGENT_PRIORITY } from "../EventLoopScheduler.js"

/** Wraps the RunnerStorage it is provided with. */
export const layerUrgentShardLocks = (options: { readonly soleRunner: boolean }) =>
  Layer.effect(
    RunnerStorage.RunnerStorage,
    Effect.gen(function*() {
      const storage = yield* RunnerStorage.RunnerStorage
      const config = yield* ShardingConfig.ShardingConfig
      // Sharding's deadline (@effect/cluster's internal `effectiveInterval`, not exported).
      const deadlineMs = Math.min(Duration.toMillis(config.shardLockRefreshInterval), Duration.toMillis(config.shardLockExpiration) / 3)
      /** The sole runner's refreshes are failing: logged once per outage. */
      let unreachable = false
      const keepShards = (shardIds: Iterable<ShardId.ShardId>) => (cause: Cause.Cause<unknown>) =>
        Effect.as(
          unreachable ? Effect.void : Effect.sync(() => void (unreachable = true)).pipe(
            Effect.zipRight(Effect.logWarning("shard lock storage unreachable: the sole runner keeps its shards until it answers", cause))
          ),
          Array.from(shardIds)
        )
      return RunnerStorage.RunnerStorage.of({
        ...storage,
        acquire: (address, shardIds) => Effect.withSchedulingPriority(storage.acquire(address, shardIds), URGENT_PRIORITY),
        refresh: (address, shardIds) => {
          const refreshed = storage.refresh(address, shardIds).pipe(
            Effect.withSchedulingPriority(URGENT_PRIORITY),
            Effect.timed,
            Effect.flatMap(([took, acquired]) =>
              Duration.toMillis(took) > deadlineMs / 2
                ? Effect.as(Effect.logWarning(`shard lock refresh took ${Math.round(Duration.toMillis(took))} ms (deadline ${Math.round(deadlineMs)} ms)`), acquired)
                : Effect.succeed(acquired)
            )
          )
          if (!options.soleRunner) return refreshed
          return refreshed.pipe(
            Effect.timeoutFail({ duration: Duration.millis(deadlineMs / 2), onTimeout: () => new Error(`no answer within ${Math.round(deadlineMs / 2)} ms`) }),
            Effect.tap(() => Effect.sync(() => void (unreachable = false))),
            Effect.catchAllCause(keepShards(shardIds))
          )
        }
      })
    })
  )
