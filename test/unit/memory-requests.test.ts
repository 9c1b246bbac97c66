import { describe, expect, it } from "vitest"
import { explicitFact } from "../../src/actors/internal/memoryRequests.js"

describe("explicitFact", () => {
  it("takes the fact of a message that asks to remember it", () => {
    expect(explicitFact("Remember that I prefer metric units.")).toBe("I prefer metric units")
    expect(explicitFact("please remember: my name is Ada")).toBe("my name is Ada")
    expect(explicitFact("  remember, I am vegetarian!")).toBe("I am vegetarian")
    expect(explicitFact("Remember my cat is called Tom")).toBe("my cat is called Tom")
  })

  it("ignores questions, other messages and oversized requests", () => {
    expect(explicitFact("Do you remember what I said?")).toBeUndefined()
    expect(explicitFact("remember what I said?")).toBeUndefined()
    expect(explicitFact("I remember that day")).toBeUndefined()
    expect(explicitFact("remember")).toBeUndefined()
    expect(explicitFact(`remember that ${"x".repeat(600)}`)).toBeUndefined()
  })
})

describe("parseFacts", () => {
  it("takes a model's '- ' lines, new ones only, within bounds", async () => {
    const { parseFacts } = await import("../../src/runtime/FactExtractor.js")
    const reply = "<think>the user said things</think>\nHere are the facts:\n- Lives in Lisbon\n- prefers trains\n* Has a dog\n- NONE\n- ok\n- " + "x".repeat(300)
    expect(parseFacts(reply, ["Prefers trains"])).toEqual(["Lives in Lisbon", "Has a dog"])
    expect(parseFacts("NONE", [])).toEqual([])
    expect(parseFacts(Array.from({ length: 9 }, (_, i) => `- fact number ${i}`).join("\n"), []).length).toBe(5)
  })
})

describe("facts that show nothing", () => {
  // Format characters, Hangul fillers, the blank Braille pattern and lone marks render as nothing.
  const blanks = ["\u200b\u200b\u200b", "\u3164\u3164\u3164", "\u2800\u2800\u2800", "\u00ad\u00ad\u00ad", "\uffa0\uffa0\uffa0", "\u115f\u1160\u0301"]

  it("are not taken from a request to remember", () => {
    for (const blank of blanks) expect(explicitFact(`remember that ${blank}`)).toBeUndefined()
    expect(explicitFact("remember that I like \u3164 tea")).toBe("I like \u3164 tea")
    expect(explicitFact("Remember that!")).toBeUndefined()
    expect(explicitFact("remember that ")).toBeUndefined()
  })

  it("are refused by the memory route's schema", async () => {
    const { Schema } = await import("effect")
    const { MemoryUpdate } = await import("../../src/runtime/Domain.js")
    const decode = Schema.decodeUnknownEither(MemoryUpdate)
    for (const blank of [...blanks, "\u0301", "\u{E0041}", "\uFFFC", "\u{1D159}"]) expect(decode({ add: [blank] })._tag).toBe("Left")
    expect(decode({ add: ["likes 🍵"] })._tag).toBe("Right")
  })

  it("are not taken from a model's reply", async () => {
    const { parseFacts } = await import("../../src/runtime/FactExtractor.js")
    expect(parseFacts(blanks.map((b) => `- ${b}`).join("\n"), [])).toEqual([])
  })
})
