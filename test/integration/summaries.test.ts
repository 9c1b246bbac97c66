/**
 * The SummarizeConversation workflow against each store, with the deterministic Summarizer
 * (Summarizer.layerTest). A "crash" is a step that dies: the workflow is then run again on a
 * fresh engine (a restarted runner that lost its progress), and must store no summary twice
 * nor skip one.
 */
import { randomUUID } from "node:crypto"
import { WorkflowEngine } from "@effect/workflow"
import { describe, expect, it } from "@effect/vitest"
import { Context, Effect, Layer, Option } from "effect"
import * as Summaries from "../../src/actors/Summaries.js"
import { ConversationId, Summary, UserId } from "../../src/runtime/Domain.js"
import * as Storage from "../../src/runtime/Storage.js"
import * as Summarizer from "../../src/runtime/Summarizer.js"
import { type Topology, TopologyService } from "../../src/runtime/Topology.js"
import { PgLive } from "../support/database.js"

const suites = [
  ["PostgreSQL", Storage.layer.pipe(Layer.provide(PgLive))],
  ["memory", Storage.layerMemory]
] as const

const topology = { context: { prompt_budget_tokens: 300, summary_max_tokens: 64 } } as unknown as Topology

/** Each call's own engine (a runner that starts afresh), with the store of the suite and `crash` steps. */
const run = (
  payload: typeof Summaries.SummarizeConversation.payloadSchema.Type,
  calls: { count: number },
  crash: { summarize?: boolean; store?: boolean } = {}
) =>
  Effect.gen(function*() {
    const store = yield* Storage.ConversationStore
    const crashing = Layer.succeed(Storage.ConversationStore, {
      ...store,
      putSummary: (...args) => crash.store ? Effect.dieMessage("crash before the summary is stored") : store.putSummary(...args)
    })
    const summarizer = Layer.unwrapEffect(Effect.map(Summarizer.Summarizer, (s) =>
      Layer.succeed(Summarizer.Summarizer, {
        summarize: (input) => crash.summarize ? Effect.zipRight(s.summarize(input), Effect.dieMessage("crash while summarising")) : s.summarize(input)
      }))).pipe(Layer.provide(Summarizer.layerTest(calls)))
    // Fresh layers: it.layer memoizes layers across a suite, and each run is a restarted runner.
    return yield* Effect.scoped(Effect.gen(function*() {
      const engine = yield* Layer.build(Layer.fresh(WorkflowEngine.layerMemory))
      const deps = yield* Layer.build(Layer.mergeAll(crashing, summarizer, Layer.succeed(TopologyService, topology)))
      yield* Layer.build(Layer.fresh(Summaries.layer).pipe(Layer.provide(Layer.succeedContext(Context.merge(engine, deps)))))
      // The workflow runs with the caller's services over its layer's: the same here.
      return yield* Effect.provide(Summaries.SummarizeConversation.execute(payload), Context.merge(engine, deps))
    }))
  })

const conversationWith = (numTurns: number) =>
  Effect.gen(function*() {
    const store = yield* Storage.ConversationStore
    const id = ConversationId.make(`conv_${randomUUID().replaceAll("-", "")}`)
    yield* store.createConversation({ id, model: "mini", system_prompt: null, user_id: UserId.make("alice"), org_id: null })
    for (let seq = 0; seq < numTurns; seq++) {
      yield* store.appendTurn({
        conversation_id: id,
        seq,
        role: seq % 2 === 0 ? "user" : "assistant",
        content: `turn ${seq} says something`,
        status: seq === 3 ? "failed" : "completed",
        num_prompt_tokens: null,
        num_completion_tokens: null
      })
    }
    return id
  })

for (const [name, layer] of suites) {
  describe(`SummarizeConversation (${name})`, () => {
    it.layer(layer, { timeout: 60_000 })((it) => {
      it.effect("folds turns into the summary, each summary made from the one before", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const id = yield* conversationWith(12)
          const calls = { count: 0 }
          const first = yield* run({ conversation_id: id, through_seq: 6, pool: "mini" }, calls)
          expect(first?.through_seq).toBe(6)
          // Failed turns are never summarised.
          expect(first?.content).toBe(["user: turn 0 says something", "assistant: turn 1 says something", "user: turn 2 says something", "user: turn 4 says something", "assistant: turn 5 says something"].join("\n"))
          const second = yield* run({ conversation_id: id, through_seq: 10, pool: "mini" }, calls)
          expect(second?.content).toBe(`${first?.content}\nuser: turn 6 says something\nassistant: turn 7 says something\nuser: turn 8 says something\nassistant: turn 9 says something`)
          expect(Option.getOrThrow(yield* store.getSummary(id)).through_seq).toBe(10)
          // An older summary's workflow (late, or run again) changes nothing.
          expect(yield* run({ conversation_id: id, through_seq: 8, pool: "mini" }, calls)).toBeNull()
          expect(calls.count).toBe(2)
          expect(Option.getOrThrow(yield* store.getSummary(id)).content).toBe(second?.content)
        }))

      it.effect("a crash in either step, then the workflow again: one summary, stored once", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const id = yield* conversationWith(8)
          const calls = { count: 0 }
          const payload = { conversation_id: id, through_seq: 4, pool: "mini" }
          yield* Effect.exit(run(payload, calls, { summarize: true }))
          expect(yield* store.getSummary(id)).toEqual(Option.none())
          yield* Effect.exit(run(payload, calls, { store: true }))
          expect(yield* store.getSummary(id)).toEqual(Option.none())
          const stored = yield* run(payload, calls)
          expect(stored?.through_seq).toBe(4)
          expect(calls.count).toBe(3)
          // The step after Store lost its answer (the runner died): run again, nothing is stored twice.
          expect(yield* run(payload, calls)).toBeNull()
          expect(calls.count).toBe(3)
          expect(Option.getOrThrow(yield* store.getSummary(id)).content).toBe(stored?.content)
        }))

      it.effect("putSummary stores a summary only in place of the one it was made from", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const id = yield* conversationWith(6)
          const summary = (through_seq: number, content: string) => new Summary({ through_seq, content, updated_at_ms: 1 })
          expect(yield* store.putSummary(id, summary(2, "a"), null)).toBe(true)
          // Two workflows made from "no summary": the second is not stored.
          expect(yield* store.putSummary(id, summary(4, "b"), null)).toBe(false)
          expect(yield* store.putSummary(id, summary(4, "c"), 2)).toBe(true)
          // Made from the summary through 2, which is gone: not stored.
          expect(yield* store.putSummary(id, summary(6, "d"), 2)).toBe(false)
          expect(Option.getOrThrow(yield* store.getSummary(id))).toMatchObject({ through_seq: 4, content: "c" })
        }))

      it.effect("a deleted conversation gets no summary, and delete removes it", () =>
        Effect.gen(function*() {
          const store = yield* Storage.ConversationStore
          const id = yield* conversationWith(6)
          const calls = { count: 0 }
          yield* run({ conversation_id: id, through_seq: 4, pool: "mini" }, calls)
          yield* store.deleteConversation(id)
          expect(yield* store.getSummary(id)).toEqual(Option.none())
          expect(yield* run({ conversation_id: id, through_seq: 6, pool: "mini" }, calls)).toBeNull()
          expect(yield* store.getSummary(id)).toEqual(Option.none())
        }))
    })
  })
}
