/**
 * How long this runner has held each shard of a group: a number (the tenure) that changes
 * every time the shard is seen not held. State a runner cached while it held an entity's shard
 * is that runner's own (only the shard's owner writes an entity's turns) as long as the tenure
 * is unchanged, so it needs no check against the store.
 *
 * Polled every POLL_MS: a shard that leaves and comes back between two polls would go unseen,
 * but a move takes longer than that (a release, the other runner's acquisition within its
 * 1 s assignment refresh, and the way back); and should it happen, the next append's seq is
 * refused by the store's primary key and the state is reloaded (hotConversations.ts).
 */
import { type Sharding, ShardId } from "@effect/cluster"
import { EntityId } from "@effect/cluster/EntityId"
import { Duration, Effect, Schedule } from "effect"

const POLL_MS = 250

export interface ShardTenure {
  /** The tenure of the entity's shard while this runner holds it; undefined when it does not. */
  readonly of: (entityId: string) => number | undefined
}

/** Starts the poll (in the caller's scope) over the `shardsPerGroup` shards of `group`. */
export const make = (sharding: Sharding.Sharding["Type"], group: string, shardsPerGroup: number) =>
  Effect.gen(function*() {
    const tenures = new Array<number>(shardsPerGroup + 1).fill(0)
    let next = 1
    const poll = Effect.sync(() => {
      for (let id = 1; id <= shardsPerGroup; id++) {
        if (!sharding.hasShardId(ShardId.make(group, id))) tenures[id] = next++
      }
    })
    yield* poll
    yield* Effect.forkScoped(Effect.repeat(poll, Schedule.spaced(Duration.millis(POLL_MS))))
    return {
      of: (entityId) => {
        const shard = sharding.getShardId(EntityId.make(entityId), group)
        return sharding.hasShardId(shard) ? tenures[shard.id] : undefined
      }
    } satisfies ShardTenure
  })
