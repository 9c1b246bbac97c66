import { randomUUID } from "node:crypto"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Layer, Option } from "effect"
import { ConversationId, UserId } from "../../src/runtime/Domain.js"
import * as Storage from "../../src/runtime/Storage.js"
import { PgLive } from "../support/database.js"

const suites = [
  ["PostgreSQL", Storage.layer.pipe(Layer.provide(PgLive))],
  ["memory", Storage.layerMemory]
] as const

for (const [name, layer] of suites) {
  describe(`ConversationStore (${name})`, () => {
    it.layer(layer, { timeout: 60_000 })((it) => {
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
