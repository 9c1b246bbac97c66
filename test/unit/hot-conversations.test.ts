/**
 * The runner's hot conversation state: least recently used entries go first once the char
 * budget is exceeded; a re-measured (grown) entry counts its new size, and so does one that
 * grew by a counted message; the newest entry stays even when it alone exceeds the budget.
 */
import { describe, expect, it } from "@effect/vitest"
import { type ConversationState, HotConversations } from "../../src/actors/internal/hotConversations.js"
import { emptyPromptCache } from "../../src/actors/internal/promptAssembly.js"
import { UserId } from "../../src/runtime/Domain.js"

const state = (chars: number): ConversationState => ({
  pool: "default",
  userId: UserId.make("local"),
  systemPrompt: null,
  history: [{ role: "user", content: "x".repeat(chars) }],
  seqs: [0],
  orgId: null,
  summary: undefined,
  cache: emptyPromptCache(),
  nextSeq: 1
})

describe("HotConversations", () => {
  it("evicts the least recently used entries over the budget", () => {
    // Each entry: 256 (fixed) + 16 (per message) + 1000 chars = 1272.
    const hot = new HotConversations(3 * 1272)
    hot.set("a", state(1000))
    hot.set("b", state(1000))
    hot.set("c", state(1000))
    expect(hot.get("a")).toBeDefined() // a is now the most recently used
    hot.set("d", state(1000))
    expect(hot.get("b")).toBeUndefined()
    expect([hot.get("a"), hot.get("c"), hot.get("d")].every((s) => s !== undefined)).toBe(true)
    expect(hot.size).toBe(3)
  })

  it("re-measures an entry that grew, and keeps the newest even if it alone is over budget", () => {
    const hot = new HotConversations(3000)
    const a = state(1000)
    hot.set("a", a)
    hot.set("b", state(1000))
    a.history.push({ role: "assistant", content: "y".repeat(1000) })
    hot.set("a", a) // 2544 now: b (older) must go
    expect(hot.get("b")).toBeUndefined()
    expect(hot.get("a")).toBe(a)
    hot.set("big", state(10_000))
    expect(hot.size).toBe(1)
    expect(hot.get("big")).toBeDefined()
  })

  it("counts a message appended with grew as set would after measuring the whole history", () => {
    const hot = new HotConversations(3000)
    const a = state(1000)
    hot.set("a", a)
    hot.set("b", state(1000))
    const reply = { role: "assistant" as const, content: "y".repeat(1000) }
    a.history.push(reply)
    hot.grew("a", a, reply) // 2544 now, as in the re-measure case: b (older) must go
    expect(hot.get("b")).toBeUndefined()
    expect(hot.get("a")).toBe(a)
    hot.set("c", state(100)) // 372 more: 2916, within budget
    expect(hot.size).toBe(2)
    hot.grew("c", hot.get("c")!) // no message: only marks c as recently used
    hot.set("d", state(100)) // 3288 > 3000: a, now the least recently used, goes
    expect(hot.get("a")).toBeUndefined()
    expect(hot.size).toBe(2)
  })

  it("forgets a deleted entry and its size", () => {
    const hot = new HotConversations(2 * 1272)
    hot.set("a", state(1000))
    hot.delete("a")
    hot.set("b", state(1000))
    hot.set("c", state(1000))
    expect(hot.size).toBe(2)
    expect(hot.get("a")).toBeUndefined()
  })
})
