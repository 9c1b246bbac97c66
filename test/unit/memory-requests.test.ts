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
