import { describe, expect, it } from "@effect/vitest"
import fc from "fast-check"
import { KvBlockManager } from "../../src/runtime/KvBlockManager.js"
import { type SequenceRequest, SchedulerCore, type StepPlan } from "../../src/runtime/SchedulerCore.js"

const EOS = 99
const greedy = { temperature: 0, top_p: 1, top_k: 0, seed: 0 }
const request = (seqId: number, promptLength: number, maxTokens: number, priority = 0): SequenceRequest => ({
  seqId,
  promptTokenIds: Array.from({ length: promptLength }, (_, i) => (seqId * 7 + i) % 50),
  maxTokens,
  sampling: greedy,
  priority,
  eosTokenIds: new Set([EOS])
})

/** A fake engine that mirrors what the real one tracks: per-sequence tables and computed counts. */
class FakeEngine {
  readonly seqs = new Map<number, { table: Array<number>; computed: number }>()
  constructor(readonly numBlocks: number, readonly nextToken: (seqId: number) => number) {}
  step(plan: StepPlan): Map<number, number> {
    for (const id of plan.release) this.seqs.delete(id)
    const sampled = new Map<number, number>()
    for (const item of plan.items) {
      let s = this.seqs.get(item.seq_id)
      if (s === undefined) {
        expect(item.block_table).toBeDefined()
        expect(item.sampling).toBeDefined()
        s = { table: [...item.block_table!], computed: item.start_pos }
        this.seqs.set(item.seq_id, s)
      } else {
        expect(item.block_table).toBeUndefined()
        s.table.push(...(item.new_blocks ?? []))
      }
      expect(item.start_pos).toBe(s.computed)
      expect(s.table.length * 16).toBeGreaterThanOrEqual(item.start_pos + item.tokens.length)
      for (const b of s.table) expect(b).toBeLessThan(this.numBlocks)
      s.computed += item.tokens.length
      if (item.sample) sampled.set(item.seq_id, this.nextToken(item.seq_id))
    }
    // No two live sequences may hold the same block.
    const owners = new Map<number, number>()
    for (const [id, s] of this.seqs) {
      for (const b of s.table) {
        expect(owners.get(b), `block ${b} owned by ${owners.get(b)} and ${id}`).toBeUndefined()
        owners.set(b, id)
      }
    }
    return sampled
  }
  release(ids: ReadonlyArray<number>) {
    for (const id of ids) this.seqs.delete(id)
  }
}

describe("SchedulerCore", () => {
  it("predicts queueing delay: none on an idle engine, the running bounds once seats are full, lower priorities not counted", () => {
    const kv = new KvBlockManager(256, 16)
    const core = new SchedulerCore(kv, { maxNumBatchedTokens: 64, maxNumSeqs: 2, maxModelLen: 1024 })
    // Idle: even a prompt of many prefill steps is not delayed by anything.
    expect(core.predictedQueueingSteps(0, 1000)).toBe(0)
    core.add(request(1, 4, 10))
    core.add(request(2, 4, 30))
    const plan = core.schedule()!
    core.applyStepResult(plan, new Map([[1, 5], [2, 5]]))
    // Both seats taken: the newcomer waits for the sooner of the two to end (9 more tokens).
    expect(core.predictedQueueingSteps(0, 4)).toBe(9)
    // A waiting sequence ahead takes that seat: the newcomer waits for the second (29 more).
    core.add(request(3, 4, 10, 0))
    expect(core.predictedQueueingSteps(0, 4)).toBe(29)
    // A newcomer of better priority than the waiting one is not queued behind it.
    core.add(request(4, 4, 10, 5))
    expect(core.predictedQueueingSteps(1, 4)).toBe(29)
    expect(core.predictedQueueingSteps(-1, 4)).toBe(9)
  })

  it("returns each sequence's first token before the running sequences' tokens (TTFT)", () => {
    const kv = new KvBlockManager(64, 16)
    const core = new SchedulerCore(kv, { maxNumBatchedTokens: 64, maxNumSeqs: 8, maxModelLen: 1024 })
    const engine = new FakeEngine(64, () => 1)
    core.add(request(1, 4, 10))
    core.add(request(2, 4, 10))
    let plan = core.schedule()!
    expect(core.applyStepResult(plan, engine.step(plan)).map((o) => o.seqId)).toEqual([1, 2])
    core.add(request(3, 4, 10))
    plan = core.schedule()!
    // Running 1 and 2 are planned before the admitted 3; 3's first token is returned first.
    expect(plan.items.map((i) => i.seq_id)).toEqual([1, 2, 3])
    expect(core.applyStepResult(plan, engine.step(plan)).map((o) => o.seqId)).toEqual([3, 1, 2])
  })

  it("chunks a long prefill under the token budget and batches decodes with it", () => {
    const kv = new KvBlockManager(64, 16)
    const core = new SchedulerCore(kv, { maxNumBatchedTokens: 32, maxNumSeqs: 8, maxModelLen: 1024 })
    core.add(request(1, 10, 5))
    core.add(request(2, 70, 5))
    const p1 = core.schedule()!
    expect(p1.items.map((i) => [i.seq_id, i.tokens.length, i.sample])).toEqual([[1, 10, true], [2, 22, false]])
    core.applyStepResult(p1, new Map([[1, 7]]))
    const p2 = core.schedule()!
    // seq 1 decodes one token; seq 2 continues its prefill with the rest of the budget.
    expect(p2.items.map((i) => [i.seq_id, i.tokens.length, i.start_pos])).toEqual([[1, 1, 10], [2, 31, 22]])
    expect(p2.items[0]!.tokens).toEqual([7])
    expect(p2.items[1]!.block_table).toBeUndefined()
    expect(p2.items[1]!.new_blocks).toEqual([3, 4]) // 53 tokens need 4 blocks; it had 1 and 2
  })

  it("finishes on EOS and on max tokens, freeing blocks at once", () => {
    const kv = new KvBlockManager(16, 16)
    const core = new SchedulerCore(kv, { maxNumBatchedTokens: 64, maxNumSeqs: 8, maxModelLen: 1024 })
    core.add(request(1, 5, 100))
    core.add(request(2, 5, 2))
    let plan = core.schedule()!
    let out = core.applyStepResult(plan, new Map([[1, 3], [2, 4]]))
    expect(out.map((o) => o.finishReason)).toEqual([undefined, undefined])
    plan = core.schedule()!
    out = core.applyStepResult(plan, new Map([[1, EOS], [2, 4]]))
    expect(out).toEqual([
      { seqId: 1, tokenId: EOS, finishReason: "stop", numCachedTokens: 0 },
      { seqId: 2, tokenId: 4, finishReason: "length", numCachedTokens: 0 }
    ])
    expect(kv.numFreeBlocks).toBe(16)
    expect(core.takePendingRelease()).toEqual([1, 2])
    expect(core.hasWork).toBe(false)
  })

  it("preempts the lowest-priority sequence by recompute when blocks run out", () => {
    const kv = new KvBlockManager(4, 16)
    const core = new SchedulerCore(kv, { maxNumBatchedTokens: 256, maxNumSeqs: 8, maxModelLen: 1024 })
    core.add(request(1, 32, 100, 0)) // 2 blocks
    core.add(request(2, 32, 100, 1)) // 2 blocks, lower priority
    let plan = core.schedule()!
    expect(plan.items.length).toBe(2)
    core.applyStepResult(plan, new Map([[1, 5], [2, 6]]))
    // seq 1 needs a third block for position 32: seq 2 must give way.
    plan = core.schedule()!
    expect(plan.preempted).toEqual([2])
    expect(plan.release).toEqual([2]) // the engine drops it before this batch runs
    expect(plan.items.map((i) => i.seq_id)).toEqual([1])
    core.applyStepResult(plan, new Map([[1, 8]]))
    core.cancel(1)
    plan = core.schedule()!
    // seq 2 comes back with its prompt + the token it had produced, as a fresh sequence; its
    // first full block was still cached, so it computes from position 16.
    expect(plan.release).toEqual([1])
    expect(plan.items[0]!.seq_id).toBe(2)
    expect(plan.items[0]!.start_pos).toBe(16)
    expect(plan.items[0]!.tokens.length).toBe(17)
    expect(plan.items[0]!.block_table).toBeDefined()
  })

  it("prefix caching: a prompt that extends a finished turn's prompt and output prefills only the rest; off, all of it", () => {
    for (const enableCaching of [true, false]) {
      const kv = new KvBlockManager(16, 16, { enableCaching })
      const core = new SchedulerCore(kv, { maxNumBatchedTokens: 256, maxNumSeqs: 8, maxModelLen: 1024 })
      const first = request(1, 40, 3)
      core.add(first)
      const output: Array<number> = []
      for (const t of [11, 12, 13]) {
        const out = core.applyStepResult(core.schedule()!, new Map([[1, t]]))
        output.push(...out.map((o) => o.tokenId))
      }
      expect(output).toEqual([11, 12, 13])
      expect(kv.numFreeBlocks).toBe(16)
      // The next turn: the previous prompt, its reply, then new text.
      const next = { ...request(2, 0, 5), promptTokenIds: [...first.promptTokenIds, ...output, ...Array.from({ length: 10 }, (_, i) => 30 + i)] }
      core.add(next)
      const plan = core.schedule()!
      // 42 tokens had their KV computed (the last sampled one had not): 2 full blocks are cached.
      expect(plan.items[0]!.start_pos).toBe(enableCaching ? 32 : 0)
      expect(plan.items[0]!.tokens.length).toBe(enableCaching ? 21 : 53)
      expect(plan.items[0]!.block_table!.length).toBe(4)
      const out = core.applyStepResult(plan, new Map([[2, 7]]))
      expect(out[0]!.numCachedTokens).toBe(enableCaching ? 32 : 0)
      expect(kv.numHitTokens).toBe(enableCaching ? 32 : 0)
    }
  })

  it("leaves paused sequences out of steps until resumed", () => {
    const kv = new KvBlockManager(16, 16)
    const core = new SchedulerCore(kv, { maxNumBatchedTokens: 64, maxNumSeqs: 8, maxModelLen: 1024 })
    core.add(request(1, 4, 10))
    core.add(request(2, 4, 10))
    core.applyStepResult(core.schedule()!, new Map([[1, 1], [2, 2]]))
    core.setPaused(1, true)
    expect(core.schedule()!.items.map((i) => i.seq_id)).toEqual([2])
  })

  it("a step in flight for a cancelled sequence is dropped and its blocks are free", () => {
    const kv = new KvBlockManager(16, 16)
    const core = new SchedulerCore(kv, { maxNumBatchedTokens: 64, maxNumSeqs: 8, maxModelLen: 1024 })
    core.add(request(1, 20, 10))
    const plan = core.schedule()!
    core.cancel(1)
    expect(kv.numFreeBlocks).toBe(16)
    expect(core.applyStepResult(plan, new Map([[1, 3]]))).toEqual([])
    // The engine did see the step, so it holds state for seq 1: it must be released.
    expect(core.takePendingRelease()).toEqual([1])
  })

  it("property: random admit/step/cancel/pause never double-owns a block and frees everything", () => {
    type Op =
      | { op: "add"; prompt: number; max: number; prio: number }
      | { op: "step"; eosEvery: number }
      | { op: "cancel"; pick: number }
      | { op: "pause"; pick: number; paused: boolean }
    const opArb: fc.Arbitrary<Op> = fc.oneof(
      fc.record({ op: fc.constant("add" as const), prompt: fc.integer({ min: 1, max: 120 }), max: fc.integer({ min: 1, max: 40 }), prio: fc.nat(2) }),
      fc.record({ op: fc.constant("step" as const), eosEvery: fc.integer({ min: 2, max: 30 }) }),
      fc.record({ op: fc.constant("step" as const), eosEvery: fc.constant(1000) }),
      fc.record({ op: fc.constant("cancel" as const), pick: fc.nat(50) }),
      fc.record({ op: fc.constant("pause" as const), pick: fc.nat(50), paused: fc.boolean() })
    )
    fc.assert(
      fc.property(fc.integer({ min: 9, max: 40 }), fc.integer({ min: 8, max: 128 }), fc.array(opArb, { maxLength: 150 }), (numBlocks, budget, ops) => {
        const kv = new KvBlockManager(numBlocks, 16)
        const core = new SchedulerCore(kv, { maxNumBatchedTokens: budget, maxNumSeqs: 6, maxModelLen: 8 * 16 })
        let counter = 0
        let eosEvery = 1000
        const engine = new FakeEngine(numBlocks, () => (++counter % eosEvery === 0 ? EOS : counter % 50))
        const live: Array<number> = []
        let nextId = 1
        let inFlight: StepPlan | undefined
        for (const o of ops) {
          switch (o.op) {
            case "add":
              if (core.add(request(nextId, o.prompt, o.max, o.prio))) live.push(nextId)
              nextId++
              break
            case "step": {
              eosEvery = o.eosEvery
              // Two phases so cancels can land while a step is in flight.
              if (inFlight !== undefined) {
                const sampled = engine.step(inFlight)
                const outs = core.applyStepResult(inFlight, sampled)
                for (const out of outs) if (out.finishReason) live.splice(live.indexOf(out.seqId), 1)
                inFlight = undefined
              } else {
                inFlight = core.schedule()
                if (inFlight === undefined) engine.release(core.takePendingRelease())
              }
              break
            }
            case "cancel":
              if (live.length > 0) core.cancel(live.splice(o.pick % live.length, 1)[0]!)
              break
            case "pause":
              if (live.length > 0) core.setPaused(live[o.pick % live.length]!, o.paused)
              break
          }
        }
        if (inFlight !== undefined) core.applyStepResult(inFlight, engine.step(inFlight))
        for (const id of [...live]) core.cancel(id)
        expect(kv.numFreeBlocks).toBe(numBlocks)
        expect(kv.numSeqs).toBe(0)
        engine.release(core.takePendingRelease())
        expect(engine.seqs.size).toBe(0)
        expect(core.hasWork).toBe(false)
      }),
      { numRuns: 300 }
    )
  })
})
