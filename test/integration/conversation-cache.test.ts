/**
 * The shared conversation cache against the real Redis (REDIS_URL), and with Redis down:
 * every call then answers at once as a miss (the conversation loads from PostgreSQL).
 */
import { randomUUID } from "node:crypto"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Option } from "effect"
import * as ConversationCache from "../../src/runtime/ConversationCache.js"
import { ConversationId, Summary, UserId } from "../../src/runtime/Domain.js"

const redisUrl = process.env["REDIS_URL"] ?? "redis://127.0.0.1:6379"
const prefix = `test:${randomUUID()}:`

const entry: ConversationCache.CachedConversation = {
  pool: "mini",
  user_id: UserId.make("alice"),
  org_id: null,
  system_prompt: "Be brief.",
  summary: new Summary({ through_seq: 2, content: "They said hello.", updated_at_ms: 1 }),
  next_seq: 4,
  last: { seq: 3, role: "assistant" },
  messages: [{ seq: 2, role: "user", content: "Hi again" }, { seq: 3, role: "assistant", content: "Hello!" }]
}

describe("ConversationCache (Redis)", () => {
  it.live("stores, renews and deletes an entry; counts hits and misses", () =>
    Effect.scoped(Effect.gen(function*() {
      const cache = yield* Effect.provide(ConversationCache.ConversationCache, ConversationCache.layerRedis(redisUrl, prefix))
      yield* Effect.sleep("100 millis") // connected
      const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
      expect(yield* cache.get(id)).toEqual(Option.none())
      yield* cache.put(id, entry)
      const got = yield* cache.get(id)
      expect(Option.getOrThrow(got)).toEqual(entry)
      yield* cache.delete(id)
      expect(yield* cache.get(id)).toEqual(Option.none())
      expect([cache.stats.hits, cache.stats.misses]).toEqual([1, 2])
    })))

  it.live("with Redis down every call is a miss at once", () =>
    Effect.scoped(Effect.gen(function*() {
      const cache = yield* Effect.provide(ConversationCache.ConversationCache, ConversationCache.layerRedis("redis://127.0.0.1:1", prefix))
      const id = ConversationId.make("conv_down")
      const startMs = Date.now()
      yield* cache.put(id, entry)
      expect(yield* cache.get(id)).toEqual(Option.none())
      yield* cache.delete(id)
      expect(Date.now() - startMs).toBeLessThan(1000)
    })))
})
