import { randomUUID } from "node:crypto"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Layer, Option } from "effect"
import { ConversationId, Share, ShareId, UserId } from "../../src/runtime/Domain.js"
import * as Storage from "../../src/runtime/Storage.js"
import { PgLive } from "../support/database.js"

const suites = [
  ["PostgreSQL", Storage.layer.pipe(Layer.provide(PgLive))],
  ["memory", Storage.layerMemory]
] as const

for (const [name, layer] of suites) {
  describe(`ConversationStore (${name})`, () => {
    it.layer(layer, { timeout: 60_000 })((it) => {
      it.effect("a user's memory keeps its newest MAX_FACTS_PER_USER facts", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const user = UserId.make(`u_${randomUUID()}`)
          const batches = Math.ceil(Storage.MAX_FACTS_PER_USER / 32) + 1
          for (let b = 0; b < batches; b++) {
            yield* store.updateFacts(user, { add: Array.from({ length: 32 }, (_, i) => `fact ${b}-${i}`), remove: [] })
          }
          const facts = yield* store.listFacts(user)
          expect(facts.length).toBe(Storage.MAX_FACTS_PER_USER)
          // The last batch is all there; the first is gone.
          expect(facts.map((f) => f.content)).toEqual(expect.arrayContaining(Array.from({ length: 32 }, (_, i) => `fact ${batches - 1}-${i}`)))
          expect(facts.some((f) => f.content.startsWith("fact 0-"))).toBe(false)
        }))

      it.effect("concurrent updates near the cap never leave more than MAX_FACTS_PER_USER facts", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const user = UserId.make(`u_${randomUUID()}`)
          const fill = Storage.MAX_FACTS_PER_USER - 10
          for (let b = 0; b < fill; b += 32) {
            yield* store.updateFacts(user, { add: Array.from({ length: Math.min(32, fill - b) }, (_, i) => `fill ${b + i}`), remove: [] })
          }
          const counts = yield* Effect.forEach(
            Array.from({ length: 40 }, (_, i) => i),
            (i) => Effect.zipRight(store.updateFacts(user, { add: [`concurrent ${i}`], remove: [] }), Effect.map(store.listFacts(user), (f) => f.length)),
            { concurrency: "unbounded" }
          )
          expect(Math.max(...counts)).toBeLessThanOrEqual(Storage.MAX_FACTS_PER_USER)
          expect((yield* store.listFacts(user)).length).toBe(Storage.MAX_FACTS_PER_USER)
        }))

      it.effect("a share of a deleted conversation stores nothing and says so", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
          yield* store.createConversation({ id, model: "mini", system_prompt: null, user_id: UserId.make("alice"), org_id: null })
          const share = (n: number) => new Share({ share_id: ShareId.make(`share_${randomUUID().replaceAll("-", "")}`), conversation_id: id, num_turns: n, created_at_ms: Date.now() })
          const kept = share(0)
          expect(yield* store.createShare(kept)).toBe(true)
          expect(Option.isSome(yield* store.getShare(kept.share_id))).toBe(true)
          yield* store.deleteConversation(id)
          const late = share(0)
          expect(yield* store.createShare(late)).toBe(false)
          expect(yield* store.getShare(late.share_id)).toEqual(Option.none())
        }))

      it.effect("creates conversations and pages an append-only history", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
          yield* store.createConversation({ id, model: "mini", system_prompt: "Be brief.", user_id: UserId.make("alice"), org_id: "acme" })
          const row = yield* store.getConversation(id)
          expect(Option.getOrThrow(row).system_prompt).toBe("Be brief.")
          expect([Option.getOrThrow(row).user_id, Option.getOrThrow(row).org_id]).toEqual(["alice", "acme"])
          expect(yield* store.getConversation(ConversationId.make("conv_missing"))).toEqual(Option.none())
          for (let seq = 0; seq < 5; seq++) {
            yield* store.appendTurn({
              conversation_id: id,
              seq,
              role: seq % 2 === 0 ? "user" : "assistant",
              content: `turn ${seq}`,
              status: "completed",
              num_prompt_tokens: seq % 2 === 0 ? null : 10 + seq,
              num_completion_tokens: seq % 2 === 0 ? null : seq
            })
          }
          // A second append at an existing seq is refused: history is append-only.
          const dup = yield* Effect.flip(
            store.appendTurn({ conversation_id: id, seq: 2, role: "user", content: "x", status: "completed", num_prompt_tokens: null, num_completion_tokens: null })
          )
          expect(dup._tag).toBe("StorageError")
          // A reply delivered twice (the same assistant row) is stored once; a different one is refused.
          const reply = { conversation_id: id, seq: 3, role: "assistant" as const, content: "turn 3", status: "completed" as const, num_prompt_tokens: 13, num_completion_tokens: 3 }
          yield* store.appendTurn(reply)
          expect((yield* Effect.flip(store.appendTurn({ ...reply, content: "other" })))._tag).toBe("StorageError")
          expect((yield* Effect.flip(store.appendTurn({ ...reply, status: "failed" })))._tag).toBe("StorageError")
          const latest = yield* store.listTurns(id, { limit: 2 })
          expect(latest.map((t) => t.seq)).toEqual([3, 4])
          expect(latest[0]!.turn_id).toBe(`${id}:3`)
          expect(latest[0]!.num_prompt_tokens).toBe(13)
          const older = yield* store.listTurns(id, { before: 3, limit: 2 })
          expect(older.map((t) => t.content)).toEqual(["turn 1", "turn 2"])
          const oldest = yield* store.listTurns(id, { before: 1, limit: 50 })
          expect(oldest.map((t) => t.seq)).toEqual([0])
          // Creating an existing id (the server's own retry) leaves the conversation as it was.
          yield* store.createConversation({ id, model: "other", system_prompt: "changed", user_id: UserId.make("mallory"), org_id: null })
          const again = yield* store.getConversation(id)
          expect(Option.getOrThrow(again).model).toBe("mini")
          expect(Option.getOrThrow(again).user_id).toBe("alice")
          expect((yield* store.listTurns(id, { limit: 50 })).length).toBe(5)
        }))

      it.effect("lists a user's conversations newest first, titled by their first user message, in pages by cursor", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const user = UserId.make(`lister_${randomUUID()}`)
          const ids: Array<ConversationId> = []
          for (let i = 0; i < 5; i++) {
            const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
            ids.push(id)
            yield* store.createConversation({ id, model: "mini", system_prompt: null, user_id: user, org_id: null })
            if (i > 0) {
              yield* store.appendTurn({ conversation_id: id, seq: 0, role: "user", content: `question ${i} ${"x".repeat(200)}`, status: "completed", num_prompt_tokens: null, num_completion_tokens: null })
            }
            // Two conversations may share a creation millisecond: the id breaks the tie.
            if (i % 2 === 1) yield* Effect.promise(() => new Promise((r) => setTimeout(r, 2)))
          }
          yield* store.createConversation({ id: ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`), model: "mini", system_prompt: null, user_id: UserId.make("someone-else"), org_id: null })
          const seen: Array<string> = []
          let before: { created_at_ms: number; id: ConversationId } | undefined
          for (let page = 0; page < 4; page++) {
            const rows = yield* store.listConversations(user, { before, limit: 2 })
            if (rows.length === 0) break
            for (const r of rows) seen.push(r.conversation_id)
            const last = rows.at(-1)!
            before = { created_at_ms: last.created_at_ms, id: last.conversation_id }
          }
          expect(new Set(seen).size).toBe(5)
          expect([...seen].sort()).toEqual([...ids].sort())
          const all = yield* store.listConversations(user, { limit: 10 })
          expect(all.map((r) => r.conversation_id)).toEqual(seen)
          for (let i = 1; i < all.length; i++) expect(all[i - 1]!.created_at_ms).toBeGreaterThanOrEqual(all[i]!.created_at_ms)
          const byId = new Map(all.map((r) => [r.conversation_id as string, r]))
          expect(byId.get(ids[0]!)!.title).toBe("")
          expect(byId.get(ids[3]!)!.title).toBe(`question 3 ${"x".repeat(89)}`)
          // Conversations created in the same millisecond page by id, none twice or lost.
          const tied = UserId.make(`tied_${randomUUID()}`)
          const tiedIds = Array.from({ length: 5 }, (_, i) => ConversationId.make(`conv_tie${i}_${randomUUID().replaceAll("-", "")}`))
          const realNow = Date.now
          Date.now = () => 1_700_000_000_000
          try {
            for (const id of tiedIds) yield* store.createConversation({ id, model: "mini", system_prompt: null, user_id: tied, org_id: null })
          } finally {
            Date.now = realNow
          }
          const pages: Array<string> = []
          let after: { created_at_ms: number; id: ConversationId } | undefined
          for (let page = 0; page < 5; page++) {
            const rows = yield* store.listConversations(tied, { before: after, limit: 2 })
            if (rows.length === 0) break
            pages.push(...rows.map((r) => r.conversation_id))
            after = { created_at_ms: rows.at(-1)!.created_at_ms, id: rows.at(-1)!.conversation_id }
          }
          expect(pages).toEqual([...tiedIds].sort().reverse())
        }))

      it.effect("ranks a user's facts by embedding similarity plus text match, exact top-k", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const user = UserId.make(`user_${randomUUID()}`)
          const unit = (i: number) => [0, 1, 2, 3].map((j) => (j === i ? 1 : 0))
          yield* store.updateFacts(user, { add: ["Lives in Lisbon", "Has a cat named Tom", "Works nights", "No vector"], remove: [] }, [unit(0), unit(1), unit(2), undefined])
          // Without a query vector, the text decides.
          expect((yield* store.topFacts(user, "Where in Lisbon?", 1))).toEqual(["Lives in Lisbon"])
          // A query vector close to the cat fact's brings it first, though no word matches.
          expect((yield* store.topFacts(user, "pets at home", 2, [0.1, 0.99, 0, 0]))[0]).toBe("Has a cat named Tom")
          // Both count: the text match adds to a weaker similarity.
          expect((yield* store.topFacts(user, "night shifts: Works nights", 1, [0, 0.55, 0.5, 0]))).toEqual(["Works nights"])
          expect((yield* store.topFacts(user, "anything", 10, unit(3))).length).toBe(4)
        }))
    })
  })
}
