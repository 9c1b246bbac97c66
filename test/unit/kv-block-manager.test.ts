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
})
