/**
 * The ExtractFacts workflow against each store, with the deterministic FactExtractor
 * (FactExtractor.layerTest) and a 1 s idle time: an idle conversation's facts join its user's
 * memory once; one that had a turn meanwhile is left to the later workflow; a step that
 * crashes and runs again on a fresh engine adds nothing twice.
 */
import { randomUUID } from "node:crypto"
import { WorkflowEngine } from "@effect/workflow"
import { describe, expect, it } from "@effect/vitest"
import { Context, Effect, Layer, TestServices } from "effect"
import * as Embedder from "../../src/actors/Embedder.js"
import * as FactExtraction from "../../src/actors/FactExtraction.js"
import { ConversationId, UserId } from "../../src/runtime/Domain.js"
import * as FactExtractor from "../../src/runtime/FactExtractor.js"
import * as Storage from "../../src/runtime/Storage.js"
import { type Topology, TopologyService } from "../../src/runtime/Topology.js"
import { PgLive } from "../support/database.js"

const suites = [
  ["PostgreSQL", Storage.layer.pipe(Layer.provide(PgLive))],
  ["memory", Storage.layerMemory]
] as const

const topology = { memory: { extract_after_idle_s: 1 } } as unknown as Topology

/** Each call's own engine (a runner that starts afresh); `crash` makes the Store step die. */
const run = (payload: typeof FactExtraction.ExtractFacts.payloadSchema.Type, calls: { count: number }, crash = false) =>
  Effect.gen(function*() {
    const store = yield* Storage.ConversationStore
    const crashing = Layer.succeed(Storage.ConversationStore, {
      ...store,
      updateFacts: (...args) => crash ? Effect.dieMessage("crash before the facts are stored") : store.updateFacts(...args)
    })
    return yield* Effect.scoped(Effect.gen(function*() {
      const engine = yield* Layer.build(Layer.fresh(WorkflowEngine.layerMemory))
      const deps = yield* Layer.build(Layer.mergeAll(crashing, FactExtractor.layerTest(calls), Embedder.layerNone, Layer.succeed(TopologyService, topology)))
      yield* Layer.build(Layer.fresh(FactExtraction.layer).pipe(Layer.provide(Layer.succeedContext(Context.merge(engine, deps)))))
      // The idle sleep on the real clock (1 s).
      return yield* TestServices.provideLive(Effect.provide(FactExtraction.ExtractFacts.execute(payload), Context.merge(engine, deps)))
    }))
  })

const conversation = (user: UserId, contents: ReadonlyArray<string>) =>
  Effect.gen(function*() {
    const store = yield* Storage.ConversationStore
    const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
    yield* store.createConversation({ id, model: "mini", system_prompt: null, user_id: user, org_id: null })
    for (const [seq, content] of contents.entries()) {
      yield* store.appendTurn({ conversation_id: id, seq, role: seq % 2 === 0 ? "user" : "assistant", content, status: "completed", num_prompt_tokens: null, num_completion_tokens: null })
    }
    return id
  })

for (const [name, layer] of suites) {
  describe(`ExtractFacts (${name})`, () => {
    it.layer(layer, { timeout: 60_000 })((it) => {
      it.effect("mines an idle conversation once; one that had a turn since is left to the later workflow", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const user = UserId.make(`user_${randomUUID()}`)
          yield* store.updateFacts(user, { add: ["I live in Lisbon"], remove: [] })
          const id = yield* conversation(user, ["Hello. I live in Lisbon. My dog is called Rex!", "Nice.", "I prefer trains to planes.", "Noted."])
          const calls = { count: 0 }
          // Started after seq 1: turns 2 and 3 came since, so it was not idle.
          expect(yield* run({ conversation_id: id, user_id: user, through_seq: 2, pool: "mini" }, calls)).toEqual([])
          expect(calls.count).toBe(0)
          const added = yield* run({ conversation_id: id, user_id: user, through_seq: 4, pool: "mini" }, calls)
          expect(added).toEqual(["My dog is called Rex", "I prefer trains to planes"])
          expect((yield* store.listFacts(user)).map((f) => f.content)).toEqual(["I live in Lisbon", "My dog is called Rex", "I prefer trains to planes"])
        }))

      it.effect("a crash before the facts are stored, then the workflow again: each fact once", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const user = UserId.make(`user_${randomUUID()}`)
          const id = yield* conversation(user, ["I am a night owl.", "OK."])
          const calls = { count: 0 }
          const payload = { conversation_id: id, user_id: user, through_seq: 2, pool: "mini" }
          yield* Effect.exit(run(payload, calls, true))
          expect(yield* store.listFacts(user)).toEqual([])
          expect(yield* run(payload, calls)).toEqual(["I am a night owl"])
          // Run once more (its answer lost): the fact is known now, nothing is added.
          expect(yield* run(payload, calls)).toEqual([])
          expect((yield* store.listFacts(user)).map((f) => f.content)).toEqual(["I am a night owl"])
        }))
    })
  })
}
