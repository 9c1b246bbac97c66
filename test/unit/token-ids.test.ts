import { describe, expect, it } from "@effect/vitest"
import { Either, Schema } from "effect"
import { StartPayload } from "../../src/actors/DecodeSlot.js"
import { TokenIds } from "../../src/runtime/Domain.js"

describe("TokenIds", () => {
  const decode = Schema.decodeUnknownEither(TokenIds)

  it("accepts arrays of integers, and encodes to the same array", () => {
    expect(decode([])).toEqual(Either.right([]))
    const ids = Array.from({ length: 4096 }, (_, i) => i * 37 % 151_936)
    expect(decode(ids)).toEqual(Either.right(ids))
    expect(Schema.encodeSync(TokenIds)(ids)).toBe(ids)
  })

  it("rejects anything else: a fraction, a string, NaN, a hole, not an array", () => {
    for (const bad of [[1, 2.5], [1, "2"], [Number.NaN], [1, , 3], { length: 0 }, "1,2", null, [2 ** 60]]) {
      expect(Either.isLeft(decode(bad))).toBe(true)
    }
  })

  it("a rejection names the first bad element, not the whole array", () => {
    const ids: Array<unknown> = Array.from({ length: 4096 }, (_, i) => i)
    ids[1000] = 1.5
    const error = Either.getLeft(decode(ids)).pipe((o) => (o._tag === "Some" ? o.value.message : ""))
    expect(error).toContain("element 1000 of 4096")
    expect(error.length).toBeLessThan(200)
  })

  it("is what a DecodeSlot's Start validates its prompt with", () => {
    const start = {
      pool: "default", conversation_id: "c1", turn_id: "c1:1", stream_id: "s1", max_tokens: 4,
      sampling: { temperature: 0, top_p: 1, top_k: 0, seed: 1 }, priority: 0, stop: []
    }
    const decodeStart = Schema.decodeUnknownEither(StartPayload)
    expect(Either.isRight(decodeStart({ ...start, prompt_token_ids: [1, 2, 3] }))).toBe(true)
    expect(Either.isLeft(decodeStart({ ...start, prompt_token_ids: [1, 2.5] }))).toBe(true)
  })
})
