import { describe, expect, it } from "@effect/vitest"
import fc from "fast-check"
import { KvBlockManager } from "../../src/runtime/KvBlockManager.js"

/** No block id is owned twice or both owned and free; owned + free = total. */
const checkInvariants = (kv: KvBlockManager, seqIds: Iterable<number>) => {
  const seen = new Set<number>()
  let owned = 0
  for (const id of seqIds) {
    for (const b of kv.blockTable(id)) {
      expect(b).toBeGreaterThanOrEqual(0)
      expect(b).toBeLessThan(kv.numBlocks)
      expect(seen.has(b)).toBe(false)
      seen.add(b)
      owned++
    }
  }
  expect(owned + kv.numFreeBlocks).toBe(kv.numBlocks)
}

type Op =
  | { readonly op: "admit"; readonly seq: number; readonly tokens: number }
  | { readonly op: "grow"; readonly seq: number; readonly tokens: number }
  | { readonly op: "finish"; readonly seq: number }
  | { readonly op: "cancel"; readonly seq: number }

const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc.record({ op: fc.constant("admit" as const), seq: fc.nat(15), tokens: fc.integer({ min: 1, max: 200 }) }),
  fc.record({ op: fc.constant("grow" as const), seq: fc.nat(15), tokens: fc.integer({ min: 1, max: 40 }) }),
  fc.record({ op: fc.constant("finish" as const), seq: fc.nat(15) }),
  fc.record({ op: fc.constant("cancel" as const), seq: fc.nat(15) })
)

describe("KvBlockManager", () => {
  it("hands out lowest ids first and frees them", () => {
    const kv = new KvBlockManager(8, 16)
    expect(kv.allocate(1, 17)).toEqual([0, 1])
    expect(kv.allocate(1, 32)).toEqual([])
    expect(kv.allocate(1, 33)).toEqual([2])
    expect(kv.numFreeBlocks).toBe(5)
    expect(kv.canAllocate(2, 16 * 6)).toBe(false)
    expect(kv.allocate(2, 16 * 6)).toBeUndefined()
    expect(kv.numFreeBlocks).toBe(5) // a failed allocate changes nothing
    expect(kv.free(1)).toBe(3)
    expect(kv.free(1)).toBe(0)
    expect(kv.numFreeBlocks).toBe(8)
  })

  it("property: random admit/grow/finish/cancel keeps ownership exclusive and returns every block", () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 64 }), fc.array(opArb, { maxLength: 200 }), (numBlocks, ops) => {
        const kv = new KvBlockManager(numBlocks, 16)
        const lengths = new Map<number, number>()
        for (const o of ops) {
          switch (o.op) {
            case "admit":
            case "grow": {
              const target = (o.op === "grow" ? (lengths.get(o.seq) ?? 0) : 0) + o.tokens
              const can = kv.canAllocate(o.seq, target)
              const freeBefore = kv.numFreeBlocks
              const added = kv.allocate(o.seq, target)
              expect(added !== undefined).toBe(can)
              if (added === undefined) expect(kv.numFreeBlocks).toBe(freeBefore)
              else {
                lengths.set(o.seq, Math.max(target, lengths.get(o.seq) ?? 0))
                expect(kv.blockTable(o.seq).length).toBeGreaterThanOrEqual(kv.blocksFor(target))
              }
              break
            }
            case "finish":
            case "cancel":
              kv.free(o.seq)
              lengths.delete(o.seq)
              break
          }
          checkInvariants(kv, Array.from({ length: 16 }, (_, i) => i))
        }
        for (let i = 0; i < 16; i++) kv.free(i)
        expect(kv.numFreeBlocks).toBe(numBlocks)
        expect(kv.numSeqs).toBe(0)
      }),
      { numRuns: 300 }
    )
  })

  it("a prompt takes the longest cached chain of full blocks, at most its length - 1 tokens, and shares those blocks", () => {
    const kv = new KvBlockManager(8, 4, { salt: "m" })
    const a = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    expect(kv.allocate(1, a.length)).toEqual([0, 1, 2])
    kv.cacheComputedBlocks(1, a, a.length) // blocks 0 and 1 are full
    kv.free(1)
    expect(kv.numFreeBlocks).toBe(8)
    expect(kv.numCachedFreeBlocks).toBe(2)
    // The same first 8 tokens: both blocks hit; a different second block: one.
    const b = [1, 2, 3, 4, 5, 6, 7, 8, 42]
    expect(kv.findCachedPrefix(kv.hashChain(b), b.length)).toEqual([0, 1])
    expect(kv.findCachedPrefix(kv.hashChain([1, 2, 3, 4, 9, 9, 9, 9, 9]), 9)).toEqual([0])
    // Exactly 8 tokens: only 7 may come from the cache, so one block.
    expect(kv.findCachedPrefix(kv.hashChain(b.slice(0, 8)), 8)).toEqual([0])
    // Another salt (model) shares nothing.
    const other = new KvBlockManager(8, 4, { salt: "other" })
    expect(other.findCachedPrefix(kv.hashChain(b), b.length)).toEqual([])
    const prefix = kv.findCachedPrefix(kv.hashChain(b), b.length)
    expect(kv.allocate(2, b.length, prefix)).toEqual([0, 1, 2]) // block 2 was never full: not cached
    expect(kv.allocate(3, b.length, prefix)).toEqual([0, 1, 3])
    expect(kv.refCount(0)).toBe(2)
    kv.free(2)
    kv.free(3)
    expect(kv.refCount(0)).toBe(0)
    // Caching off: nothing is found.
    const off = new KvBlockManager(8, 4, { enableCaching: false })
    off.allocate(1, a.length)
    off.cacheComputedBlocks(1, a, a.length)
    off.free(1)
    expect(off.findCachedPrefix(off.hashChain(a), a.length)).toEqual([])
  })

  it("evicts a cached block only when an allocation needs it, least recently freed first", () => {
    const kv = new KvBlockManager(4, 2)
    kv.allocate(1, 4)
    kv.cacheComputedBlocks(1, [1, 2, 3, 4], 4)
    kv.free(1) // frees 1 then 0: block 1 is the least recently freed
    kv.allocate(2, 4) // blocks 2, 3: never cached, used first
    expect(kv.blockTable(2)).toEqual([2, 3])
    expect(kv.numCachedFreeBlocks).toBe(2)
    kv.allocate(3, 2)
    expect(kv.blockTable(3)).toEqual([1])
    expect(kv.hashOf(1)).toBeUndefined()
    // [1, 2] is still cached in block 0; [3, 4] was evicted with block 1.
    expect(kv.findCachedPrefix(kv.hashChain([1, 2, 3, 4, 5]), 5)).toEqual([0])
  })

  type CacheOp =
    | { readonly op: "admit"; readonly seq: number; readonly base: number; readonly shared: number; readonly extra: ReadonlyArray<number> }
    | { readonly op: "grow"; readonly seq: number; readonly extra: ReadonlyArray<number> }
    | { readonly op: "free"; readonly seq: number }
  const token = fc.integer({ min: 0, max: 2 })
  const cacheOpArb: fc.Arbitrary<CacheOp> = fc.oneof(
    fc.record({
      op: fc.constant("admit" as const),
      seq: fc.nat(7),
      base: fc.nat(2),
      shared: fc.nat(24),
      extra: fc.array(token, { minLength: 1, maxLength: 10 })
    }),
    fc.record({ op: fc.constant("grow" as const), seq: fc.nat(7), extra: fc.array(token, { minLength: 1, maxLength: 6 }) }),
    fc.record({ op: fc.constant("free" as const), seq: fc.nat(7) })
  )

  it("property (prefix caching): random admit (sharing prompts) / grow / free keeps counts equal to holders, returns every block, never reuses a block with other content", () => {
    // Three base prompts from a 3-token alphabet: new prompts often share their first blocks.
    const bases = [Array.from({ length: 24 }, (_, i) => i % 3), Array.from({ length: 24 }, (_, i) => (i * 7) % 3), Array.from({ length: 24 }, () => 1)]
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 16 }), fc.array(cacheOpArb, { maxLength: 120 }), (numBlocks, ops) => {
        const blockSize = 4
        const kv = new KvBlockManager(numBlocks, blockSize, { salt: "model" })
        const tokensOf = new Map<number, Array<number>>()
        /** What each block's KV holds: the tokens it was computed for (the model of the engine's memory). */
        const content = new Map<number, string>()
        const seen: Array<Array<number>> = []
        const compute = (seq: number, from: number) => {
          const tokens = tokensOf.get(seq)!
          const table = kv.blockTable(seq)
          for (let i = Math.floor(from / blockSize); i < table.length; i++) {
            const written = JSON.stringify(tokens.slice(i * blockSize, (i + 1) * blockSize))
            // Shared blocks are never written: a block held by others keeps its content.
            if (kv.refCount(table[i]!) > 1) expect(content.get(table[i]!)).toBe(written)
            content.set(table[i]!, written)
          }
          kv.cacheComputedBlocks(seq, tokens, tokens.length)
        }
        for (const o of ops) {
          if (o.op === "admit") {
            if (tokensOf.has(o.seq)) continue
            const tokens = [...bases[o.base]!.slice(0, o.shared), ...o.extra]
            const prefix = kv.findCachedPrefix(kv.hashChain(tokens), tokens.length)
            expect(prefix.length * blockSize).toBeLessThanOrEqual(tokens.length - 1)
            // A hit's blocks hold exactly the prompt's tokens.
            prefix.forEach((b, i) => expect(content.get(b)).toBe(JSON.stringify(tokens.slice(i * blockSize, (i + 1) * blockSize))))
            const can = kv.canAllocate(o.seq, tokens.length, prefix)
            const added = kv.allocate(o.seq, tokens.length, prefix)
            expect(added !== undefined).toBe(can)
            if (added === undefined) continue
            tokensOf.set(o.seq, tokens)
            seen.push([...tokens])
            compute(o.seq, prefix.length * blockSize)
          } else if (o.op === "grow") {
            const tokens = tokensOf.get(o.seq)
            if (tokens === undefined) continue
            const from = tokens.length
            if (kv.allocate(o.seq, from + o.extra.length) === undefined) continue
            tokens.push(...o.extra)
            compute(o.seq, from)
          } else {
            kv.free(o.seq)
            tokensOf.delete(o.seq)
          }
          // Counts equal holders; free + distinct held = total.
          const holders = new Map<number, number>()
          for (const seq of tokensOf.keys()) for (const b of kv.blockTable(seq)) holders.set(b, (holders.get(b) ?? 0) + 1)
          for (let b = 0; b < numBlocks; b++) expect(kv.refCount(b)).toBe(holders.get(b) ?? 0)
          expect(kv.numFreeBlocks + holders.size).toBe(numBlocks)
          // Every prompt seen so far finds only blocks that hold its tokens (none evicted and reused).
          for (const tokens of seen) {
            kv.findCachedPrefix(kv.hashChain(tokens), tokens.length).forEach((b, i) =>
              expect(content.get(b)).toBe(JSON.stringify(tokens.slice(i * blockSize, (i + 1) * blockSize))))
          }
        }
        for (const seq of [...tokensOf.keys()]) kv.free(seq)
        expect(kv.numFreeBlocks).toBe(numBlocks)
        expect(kv.numSeqs).toBe(0)
      }),
      { numRuns: 1000 }
    )
  })
})
