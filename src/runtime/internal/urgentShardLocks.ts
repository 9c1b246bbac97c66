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
 */
import { RunnerStorage, ShardingConfig } from "@effect/cluster"
import { Duration, Effect, Layer } from "effect"
import { URGENT_PRIORITY } from "../EventLoopScheduler.js"

/** Wraps the RunnerStorage it is provided with. */
export const layerUrgentShardLocks = Layer.effect(
  RunnerStorage.RunnerStorage,
  Effect.gen(function*() {
    const storage = yield* RunnerStorage.RunnerStorage
    const config = yield* ShardingConfig.ShardingConfig
    // Sharding's deadline (@effect/cluster's internal `effectiveInterval`, not exported).
    const deadlineMs = Math.min(Duration.toMillis(config.shardLockRefreshInterval), Duration.toMillis(config.shardLockExpiration) / 3)
    return RunnerStorage.RunnerStorage.of({
      ...storage,
      acquire: (address, shardIds) => Effect.withSchedulingPriority(storage.acquire(address, shardIds), URGENT_PRIORITY),
      refresh: (address, shardIds) =>
        storage.refresh(address, shardIds).pipe(
          Effect.withSchedulingPriority(URGENT_PRIORITY),
          Effect.timed,
          Effect.flatMap(([took, acquired]) =>
            Duration.toMillis(took) > deadlineMs / 2
              ? Effect.as(Effect.logWarning(`shard lock refresh took ${Math.round(Duration.toMillis(took))} ms (deadline ${Math.round(deadlineMs)} ms)`), acquired)
              : Effect.succeed(acquired)
          )
        )
    })
  })
)
