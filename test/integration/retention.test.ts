/**
 * Retention against each store, with an injected clock (TestClock): a conversation is deleted
 * once its retention has passed since its last turn, with its turns, shares and summary; one
 * without retention never is. Training eligibility is stamped on the stored turn.
 */
import { randomUUID } from "node:crypto"
import { SqlClient } from "@effect/sql"
import { describe, expect, it } from "@effect/vitest"
import { PgClient } from "@effect/sql-pg"
import { Effect, Layer, Option, Redacted, TestClock } from "effect"
import * as Retention from "../../src/actors/Retention.js"
import { ConversationId, Share, ShareId, Summary, UserId } from "../../src/runtime/Domain.js"
import * as Storage from "../../src/runtime/Storage.js"
import { freshDatabase } from "../support/database.js"

const DAY_MS = 86_400_000

// A database of its own: a sweep deletes every expired conversation it finds, other tests' too.
const OwnPgLive = Layer.unwrapEffect(Effect.map(
  Effect.promise(() => freshDatabase()),
  ({ url }) => PgClient.layer({ url: Redacted.make(url), maxConnections: 2 })
))

const suites = [
  ["PostgreSQL", Storage.layer.pipe(Layer.provideMerge(OwnPgLive))],
  ["memory", Storage.layerMemory]
] as const

const conversation = (retentionDays: number | null) =>
  Effect.gen(function*() {
    const store = yield* Storage.ConversationStore
    const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
    yield* store.createConversation({ id, model: "mini", system_prompt: null, user_id: UserId.make("alice"), org_id: "acme", retention_days: retentionDays })
    yield* store.appendTurn({ conversation_id: id, seq: 0, role: "user", content: "hi", status: "completed", num_prompt_tokens: null, num_completion_tokens: null, training_eligible: true })
    yield* store.appendTurn({ conversation_id: id, seq: 1, role: "assistant", content: "hello", status: "completed", num_prompt_tokens: 3, num_completion_tokens: 1 })
    return id
  })

for (const [name, layer] of suites) {
  describe(`retention (${name})`, () => {
    it.layer(layer, { timeout: 60_000 })((it) => {
      it.effect("deletes a conversation once its retention passed since its last turn, everything of it", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const startMs = Date.now()
          const month = yield* conversation(30)
          const twoMonths = yield* conversation(60)
          const forever = yield* conversation(null)
          yield* store.createShare(new Share({ share_id: ShareId.make(`share_${randomUUID().replaceAll("-", "")}`), conversation_id: month, num_turns: 2, created_at_ms: startMs }))
          yield* store.putSummary(month, new Summary({ through_seq: 2, content: "s", updated_at_ms: startMs }), null)
          const remove = (id: ConversationId) => Effect.as(store.deleteConversation(id), true)
          const mine = new Set([month, twoMonths, forever])
          const exists = (id: ConversationId) => Effect.map(store.getConversation(id), Option.isSome)

          yield* TestClock.setTime(startMs + 29 * DAY_MS)
          yield* Retention.sweep(remove)
          expect([yield* exists(month), yield* exists(twoMonths), yield* exists(forever)]).toEqual([true, true, true])

          yield* TestClock.setTime(startMs + 31 * DAY_MS)
          expect((yield* store.listExpired(startMs + 31 * DAY_MS, 1000)).filter((id) => mine.has(id))).toEqual([month])
          yield* Retention.sweep(remove)
          expect([yield* exists(month), yield* exists(twoMonths), yield* exists(forever)]).toEqual([false, true, true])
          expect(yield* store.listTurns(month, { limit: 10 })).toEqual([])
          expect(yield* store.getSummary(month)).toEqual(Option.none())

          yield* TestClock.setTime(startMs + 3650 * DAY_MS)
          yield* Retention.sweep(remove)
          expect([yield* exists(twoMonths), yield* exists(forever)]).toEqual([false, true])
          expect((yield* store.listTurns(forever, { limit: 10 })).length).toBe(2)
        }))

    })
  })
}

describe("turn rows (PostgreSQL)", () => {
  it.layer(Storage.layer.pipe(Layer.provideMerge(OwnPgLive)), { timeout: 60_000 })((it) => {
    it.effect("is stamped on each stored turn", () =>
      Effect.gen(function*() {
        const id = yield* conversation(null)
        const sql = yield* SqlClient.SqlClient
        const rows = yield* sql<{ seq: number; training_eligible: boolean }>`SELECT seq, training_eligible FROM chat_turns WHERE conversation_id = ${id} ORDER BY seq`
        expect(rows.map((r) => [r.seq, r.training_eligible])).toEqual([[0, true], [1, false]])
      }))

    it.effect("turns live in the partition of their conversation's month; a turn of no conversation is refused", () =>
      Effect.gen(function*() {
        const id = yield* conversation(null)
        const sql = yield* SqlClient.SqlClient
        const now = new Date()
        const partition = `chat_turns_m${now.getUTCFullYear()}${String(now.getUTCMonth() + 1).padStart(2, "0")}`
        const rows = yield* sql<{ p: string }>`SELECT tableoid::regclass::text AS p FROM chat_turns WHERE conversation_id = ${id}`
        expect(rows.map((r) => r.p)).toEqual([partition, partition])
        const kinds = yield* sql<{ relkind: string }>`SELECT relkind FROM pg_class WHERE relname = 'chat_turns'`
        expect(kinds[0]?.relkind).toBe("p")
        const store = yield* Storage.ConversationStore
        const missing = yield* Effect.flip(store.appendTurn({
          conversation_id: ConversationId.make("conv_missing_partition"), seq: 0, role: "user", content: "x", status: "completed", num_prompt_tokens: null, num_completion_tokens: null
        }))
        expect(missing._tag).toBe("StorageError")
      }))
  })
})
