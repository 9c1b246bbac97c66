/**
 * A runner's tenure of a shard (src/actors/internal/shardTenure.ts): unchanged while the
 * runner holds the shard, none while it does not, and a new one once it holds it again.
 */
import { ShardId } from "@effect/cluster"
import type { Sharding } from "@effect/cluster"
import { describe, expect, it } from "@effect/vitest"
import { Effect, TestClock } from "effect"
import * as ShardTenure from "../../src/actors/internal/shardTenure.js"

describe("ShardTenure", () => {
  it.scoped("changes when the shard was seen not held", () =>
    Effect.gen(function*() {
      const held = new Set([1, 2, 3, 4])
      const sharding = {
        hasShardId: (s: ShardId.ShardId) => held.has(s.id),
        // Entity "a" is on shard 1, "b" on shard 2.
        getShardId: (entityId: string) => ShardId.make("default", entityId === "a" ? 1 : 2)
      } as unknown as Sharding.Sharding["Type"]
      const tenure = yield* ShardTenure.make(sharding, "default", 4)
      const a0 = tenure.of("a")
      const b0 = tenure.of("b")
      expect(a0).toBeDefined()
      yield* TestClock.adjust("1 second")
      expect([tenure.of("a"), tenure.of("b")]).toEqual([a0, b0])
      // Shard 1 moves away for a while, then comes back.
      held.delete(1)
      yield* TestClock.adjust("300 millis")
      expect(tenure.of("a")).toBeUndefined()
      held.add(1)
      yield* TestClock.adjust("300 millis")
      expect(tenure.of("a")).toBeDefined()
      expect(tenure.of("a")).not.toBe(a0)
      expect(tenure.of("b")).toBe(b0)
    }))
})
