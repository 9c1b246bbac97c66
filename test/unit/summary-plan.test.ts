/**
 * When a conversation's summary is due and how far it reaches (Summaries.planSummary), and
 * where the prompt's window starts after it (windowStartOf).
 */
import { describe, expect, it } from "vitest"
import { emptyPromptCache } from "../../src/actors/internal/promptAssembly.js"
import { planSummary, SUMMARY_KEEP, windowStartOf } from "../../src/actors/Summaries.js"
import { Summary } from "../../src/runtime/Domain.js"
import type { ChatMessage } from "../../src/runtime/Tokenizer.js"

/** `n` exchanges of ~30 tokens a message (90 characters), seqs from 0 with a gap at `gapAt` (a failed reply). */
const conversation = (n: number, gapAt = -1) => {
  const history: Array<ChatMessage> = []
  const seqs: Array<number> = []
  let seq = 0
  for (let i = 0; i < n; i++) {
    history.push({ role: "user", content: "u".repeat(90) })
    seqs.push(seq++)
    if (i === gapAt) seq += 2 // the failed reply and the user turn it answered are not in the history
    history.push({ role: "assistant", content: "a".repeat(90) })
    seqs.push(seq++)
  }
  return { history, seqs, cache: emptyPromptCache(), summary: undefined as Summary | undefined }
}

describe("planSummary", () => {
  it("is not due while the turns take less than 3/4 of the budget", () => {
    expect(planSummary(conversation(3), 300)).toBeUndefined() // 180 tokens
    expect(planSummary(conversation(4), 300)).toBeDefined() // 240
    expect(planSummary(conversation(3), 100_000)).toBeUndefined()
  })

  it("folds the oldest exchanges, keeping about 40 % of the budget, at an exchange boundary", () => {
    const state = conversation(10) // 600 tokens
    const through = planSummary(state, 300)!
    expect(through % 2).toBe(0) // a user turn opens the kept window
    const kept = state.history.slice(state.seqs.indexOf(through)).length * 30
    expect(kept).toBeLessThanOrEqual(300 * SUMMARY_KEEP)
    expect(kept).toBeGreaterThan(300 * SUMMARY_KEEP - 60)
  })

  it("counts only the turns after the summary, and the window starts after it", () => {
    const state = conversation(10)
    state.summary = new Summary({ through_seq: 14, content: "s", updated_at_ms: 0 })
    expect(windowStartOf(state)).toBe(14)
    expect(planSummary(state, 300)).toBeUndefined() // 6 messages, 180 tokens
    state.summary = new Summary({ through_seq: 4, content: "s", updated_at_ms: 0 })
    expect(planSummary(state, 300)).toBeGreaterThan(4)
  })

  it("maps seqs to history positions across a failed turn's gap", () => {
    const state = conversation(10, 2)
    state.summary = new Summary({ through_seq: 10, content: "s", updated_at_ms: 0 })
    // seqs: 0..5, then 8.. (6 and 7 were a failed exchange): seq 10 is the history's 8th.
    expect(state.seqs[windowStartOf(state)]).toBe(10)
    const through = planSummary(state, 200)!
    expect(state.seqs).toContain(through)
  })

  it("uses the prompt's own encoding of a message when it has one", () => {
    const state = conversation(2) // 120 tokens by characters: not due
    state.cache.historyIds[0] = new Uint32Array(400)
    expect(planSummary(state, 300)).toBe(2)
  })
})
