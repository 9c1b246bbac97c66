/**
 * A long conversation with running summaries: `node --import tsx bench/serve/summaries.ts
 * [--turns 200] [--budget 1024] [--max-tokens 48]`. Starts the service (CPU engine, tiny
 * model, a fresh database of the PostgreSQL at DATABASE_URL, bench/serve/summaries.config.ts)
 * and sends one conversation `--turns` user turns one after another, each read to its end.
 * Records each turn's prompt tokens and TTFT (request sent to first token event), and the
 * summary the history shows at the end. Targets (issue 13): every prompt within the budget;
 * TTFT of the last turns within 1.5x of turn 5's (single turns, and the medians of turns 3-7
 * and of the last five). `--budget 0` is the baseline without
 * summaries. Results go to bench/results/summaries[-baseline].json with machine, date, commit
 * and command.
 */
import { writeFileSync } from "node:fs"
import { freshDatabase } from "../../test/support/database.js"
import { postJson, readSse, startService } from "../../test/support/service.js"
import { numberArg, provenance } from "./provenance.js"

const numTurns = numberArg("turns", 200)
const budget = numberArg("budget", 1024)
const maxTokens = numberArg("max-tokens", 48)

const median = (xs: ReadonlyArray<number>) => {
  const sorted = [...xs].sort((a, b) => a - b)
  return sorted[Math.floor(sorted.length / 2)] ?? Number.NaN
}

const db = await freshDatabase()
const service = await startService({
  env: { DATABASE_URL: db.url, CLUSTER_CONFIG: "bench/serve/summaries.config.ts", BENCH_PROMPT_BUDGET: String(budget) }
})
const turns: Array<{ turn: number; prompt_tokens: number; ttft_ms: number; total_ms: number; summary_through_seq: number | null }> = []
try {
  const id = ((await (await postJson(`${service.url}/v1/conversations`, { system_prompt: "You are a helpful travel assistant." })).json()) as any)
    .conversation_id as string
  for (let i = 1; i <= numTurns; i++) {
    const t0 = performance.now()
    let ttftMs = Number.NaN
    const events = await readSse(
      await postJson(`${service.url}/v1/conversations/${id}/turns`, {
        role: "user",
        content: `Turn ${i}: I am planning leg ${i} of my trip, from city ${i} to city ${i + 1}. Which train should I take, and what should I see there?`,
        max_tokens: maxTokens
      }),
      (e) => {
        if (e.event === "token" && Number.isNaN(ttftMs)) ttftMs = performance.now() - t0
      }
    )
    const done = events.at(-1)!
    if (done.event !== "done") throw new Error(`turn ${i} ended with ${JSON.stringify(done)}`)
    const history = i % 10 === 0 || i === numTurns ? ((await (await fetch(`${service.url}/v1/conversations/${id}?limit=1`)).json()) as any) : undefined
    turns.push({
      turn: i,
      prompt_tokens: done.data.usage.prompt_tokens,
      ttft_ms: +ttftMs.toFixed(1),
      total_ms: +(performance.now() - t0).toFixed(1),
      summary_through_seq: history?.summary?.through_seq ?? null
    })
    if (i % 20 === 0) console.error(`turn ${i}: prompt ${done.data.usage.prompt_tokens} tokens, TTFT ${ttftMs.toFixed(1)} ms`)
  }
} finally {
  await service.stop()
}
const window = (from: number, to: number) => turns.filter((t) => t.turn >= from && t.turn <= to)
const early = window(1, 10)
const late = window(numTurns - 9, numTurns)
// One turn's TTFT swings ±50 % on this machine (a summary's prefill may share its step):
// the medians of the five turns around turn 5 and of the last five compare the typical turn.
const aroundTurn5 = window(3, 7)
const lastFive = window(numTurns - 4, numTurns)
const result = {
  ...provenance(`node --import tsx bench/serve/summaries.ts --turns ${numTurns} --budget ${budget} --max-tokens ${maxTokens}`),
  prompt_budget_tokens: budget === 0 ? null : budget,
  max_prompt_tokens: Math.max(...turns.map((t) => t.prompt_tokens)),
  turn_5_ttft_ms: turns[4]?.ttft_ms,
  last_turn_ttft_ms: turns.at(-1)?.ttft_ms,
  ttft_median_turns_1_10_ms: median(early.map((t) => t.ttft_ms)),
  ttft_median_last_10_ms: median(late.map((t) => t.ttft_ms)),
  ratio_last_to_turn_5: +(turns.at(-1)!.ttft_ms / turns[4]!.ttft_ms).toFixed(2),
  ratio_median_last_10_to_first_10: +(median(late.map((t) => t.ttft_ms)) / median(early.map((t) => t.ttft_ms))).toFixed(2),
  ttft_median_turns_3_7_ms: median(aroundTurn5.map((t) => t.ttft_ms)),
  ttft_median_last_5_ms: median(lastFive.map((t) => t.ttft_ms)),
  ratio_median_last_5_to_turns_3_7: +(median(lastFive.map((t) => t.ttft_ms)) / median(aroundTurn5.map((t) => t.ttft_ms))).toFixed(2),
  final_summary_through_seq: turns.at(-1)?.summary_through_seq,
  turns
}
const { turns: _, ...headline } = result
console.log(JSON.stringify(headline, null, 2))
writeFileSync(`bench/results/summaries${budget === 0 ? "-baseline" : ""}.json`, JSON.stringify(result, null, 2) + "\n")
