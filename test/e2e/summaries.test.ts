/**
 * Running summaries end to end, over HTTP with the real engine (the tiny model writes them,
 * meaninglessly): test/e2e/summary.config.ts gives a 300-token prompt budget, which a few
 * exchanges outgrow. Prompts stay within it, the summary shows in the history, and a runner
 * killed right after a summary fell due resumes it, losing no turn.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest"
import { freshDatabase } from "../support/database.js"
import { assertEngineBuilt } from "../support/engineProcess.js"
import { postJson, readSse, type Service, startService } from "../support/service.js"

const BUDGET_TOKENS = 300
const env = (url: string) => ({ DATABASE_URL: url, CLUSTER_CONFIG: "test/e2e/summary.config.ts" })

/** One turn; returns its prompt tokens (the `done` event's usage). */
const turn = async (service: Service, id: string, content: string): Promise<number> => {
  const events = await readSse(await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content, max_tokens: 40 }), () => undefined)
  const done = events.at(-1)!
  expect(done.event).toBe("done")
  return done.data.usage.prompt_tokens as number
}

const historyOf = async (service: Service, id: string): Promise<any> => (await fetch(`${service.url}/v1/conversations/${id}?limit=200`)).json()

/** Polls the history until its summary runs through at least `throughSeq`; fails after `timeoutMs`. */
const waitForSummary = async (service: Service, id: string, throughSeq: number, timeoutMs = 60_000): Promise<any> => {
  const deadline = Date.now() + timeoutMs
  for (;;) {
    const history = await historyOf(service, id)
    if ((history.summary?.through_seq ?? 0) >= throughSeq) return history
    if (Date.now() > deadline) throw new Error(`no summary through ${throughSeq}: ${JSON.stringify(history.summary)}\n${service.output().slice(-3000)}`)
    await new Promise((r) => setTimeout(r, 250))
  }
}

const message = (i: number) => `Message ${i}: the train to Lyon leaves at ${i} o'clock and I would like a window seat please.`

describe("running summaries (real engine, PostgreSQL)", () => {
  let service: Service
  let databaseUrl: string

  beforeAll(async () => {
    assertEngineBuilt()
    databaseUrl = (await freshDatabase()).url
    service = await startService({ env: env(databaseUrl) })
  }, 120_000)

  afterAll(async () => {
    await service?.stop()
  })

  it("keeps every prompt within the budget and folds old turns into a summary", async () => {
    const { conversation_id: id } = (await (await postJson(`${service.url}/v1/conversations`, { system_prompt: "You are terse." })).json()) as any
    const promptTokens: Array<number> = []
    for (let i = 0; i < 16; i++) promptTokens.push(await turn(service, id, message(i)))
    // Without summaries the prompt grows ~60 tokens a turn: past 900 by turn 16.
    expect(Math.max(...promptTokens)).toBeLessThanOrEqual(BUDGET_TOKENS)
    const history = await waitForSummary(service, id, 10)
    expect(history.summary.content.length).toBeGreaterThan(0)
    expect(history.summary.through_seq % 2).toBe(0) // a user turn opens the window after it
    // The history itself keeps every turn.
    expect(history.turns.map((t: any) => t.seq)).toEqual([...Array(32).keys()])
    expect(await turn(service, id, message(16))).toBeLessThanOrEqual(BUDGET_TOKENS)
  }, 180_000)

  it("an idle conversation is mined for facts with the real engine: the user's memory stays well-formed", async () => {
    const { conversation_id: id } = (await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any
    await turn(service, id, "I live in Lisbon and I prefer trains to planes.")
    // Mined 1 s after the turn, as a background sequence of the engine; whatever the tiny
    // model writes, only well-formed facts are kept.
    await new Promise((r) => setTimeout(r, 4000))
    const memory = (await (await fetch(`${service.url}/v1/users/me/memory`)).json()) as any
    for (const fact of memory.facts) expect(fact.content.length).toBeLessThanOrEqual(200)
    expect(service.output()).not.toMatch(/fact mining could not be started|ExtractFacts.*(failed|defect)/)
  }, 60_000)

  it("a runner killed as a summary fell due resumes it after a restart, and loses no turn", async () => {
    const { conversation_id: id } = (await (await postJson(`${service.url}/v1/conversations`, {})).json()) as any
    for (let i = 0; i < 6; i++) await turn(service, id, message(i))
    // The sixth exchange's reply made a summary due: kill the runner at once.
    service.process.kill("SIGKILL")
    await new Promise((r) => service.process.once("exit", r))
    service = await startService({ env: env(databaseUrl), dataDir: service.dataDir })
    // Loss audit: every acknowledged turn is there.
    expect((await historyOf(service, id)).turns.map((t: any) => [t.seq, t.status])).toEqual(
      [...Array(12).keys()].map((seq) => [seq, "completed"])
    )
    // The workflow resumes from the cluster's message storage (or, had it not been stored
    // yet, the next turn starts it again): a summary comes either way.
    let summarized = await historyOf(service, id)
    for (let i = 6; summarized.summary === undefined && i < 9; i++) {
      await new Promise((r) => setTimeout(r, 3000))
      summarized = await historyOf(service, id)
      if (summarized.summary === undefined) expect(await turn(service, id, message(i))).toBeLessThanOrEqual(BUDGET_TOKENS)
    }
    const after = await waitForSummary(service, id, 2)
    expect(after.summary.through_seq).toBeLessThanOrEqual(after.turns.length)
    expect(await turn(service, id, "Still there?")).toBeLessThanOrEqual(BUDGET_TOKENS)
  }, 240_000)
})
