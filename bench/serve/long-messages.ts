/**
 * Event-loop cost of maximum-size messages: `node --import tsx bench/serve/long-messages.ts
 * [--messages 12] [--chars 65536]`. Builds the service (`npm run build`) and runs it compiled,
 * as `npm start` does (sim engine, a fresh database of the PostgreSQL at DATABASE_URL). Sends
 * `--messages` turns at once, each to its own conversation, of `--chars` random CJK characters
 * (one pre-token: the slowest text to tokenize, ~10 µs a character), while a prober asks
 * /healthz every 100 ms. Each such turn is refused 400 `prompt_too_long` once tokenized. Reports
 * /healthz latency (p50, p99, max) idle and while the turns ran, each turn's status and wall
 * time, and `tokenizer_long_pieces_on_event_loop_total` from /metrics (long text the tokenizer
 * encoded on the event loop rather than on its worker). Results go to
 * bench/results/long-messages.json with machine, date, commit and command.
 */
import { execFileSync } from "node:child_process"
import { writeFileSync } from "node:fs"
import { freshDatabase } from "../../test/support/database.js"
import { REPO_ROOT } from "../../test/support/engineProcess.js"
import { postJson, startService } from "../../test/support/service.js"
import { numberArg, provenance } from "./provenance.js"
import { latencySummary as summary } from "./stats.js"

const numMessages = numberArg("messages", 12)
const numChars = numberArg("chars", 65_536)
const PROBE_INTERVAL_MS = 100


/** `n` CJK characters from a seeded generator (xorshift32): the same text on every run. */
const cjkText = (n: number, seed: number): string => {
  let x = seed || 1
  const codes = new Array<number>(n)
  for (let i = 0; i < n; i++) {
    x ^= x << 13
    x ^= x >>> 17
    x ^= x << 5
    codes[i] = 0x4e00 + ((x >>> 0) % 0x5200)
  }
  let text = ""
  for (let i = 0; i < n; i += 8192) text += String.fromCharCode(...codes.slice(i, i + 8192))
  return text
}

const main = async () => {
  execFileSync("npm", ["run", "build", "--silent"], { cwd: REPO_ROOT, stdio: "inherit" })
  const db = await freshDatabase()
  const service = await startService({ compiled: true, env: { DATABASE_URL: db.url } })
  try {
    while ((await fetch(`${service.url}/readyz`)).status !== 200) await new Promise((r) => setTimeout(r, 100))
    const ids = await Promise.all(Array.from({ length: numMessages }, async () =>
      ((await (await postJson(`${service.url}/v1/conversations`, {})).json()) as { conversation_id: string }).conversation_id))
    const bodies = ids.map((_, i) => cjkText(numChars, i + 1))
    let probes: Array<number> = []
    let probing = true
    const prober = (async () => {
      while (probing) {
        const t0 = performance.now()
        await fetch(`${service.url}/healthz`).then((r) => r.arrayBuffer())
        probes.push(performance.now() - t0)
        await new Promise((r) => setTimeout(r, PROBE_INTERVAL_MS))
      }
    })()
    await new Promise((r) => setTimeout(r, 3000))
    const idle = probes
    probes = []
    const turns = await Promise.all(ids.map(async (id, i) => {
      const t0 = performance.now()
      const res = await postJson(`${service.url}/v1/conversations/${id}/turns`, { role: "user", content: bodies[i], max_tokens: 1 })
      const body = await res.text()
      const code = res.status === 200 ? "ok" : (JSON.parse(body) as { error: { code: string } }).error.code
      return { status: res.status, code, ms: +(performance.now() - t0).toFixed(1) }
    }))
    probing = false
    await prober
    const metrics = await (await fetch(`${service.url}/metrics`)).text()
    const onLoop = metrics.split("\n").filter((l) => l.startsWith("tokenizer_long_pieces_on_event_loop_total{"))
      .reduce((n, l) => n + Number(l.slice(l.lastIndexOf(" ") + 1)), 0)
    const result = {
      benchmark: "long-messages",
      ...provenance(`node --import tsx bench/serve/long-messages.ts --messages ${numMessages} --chars ${numChars}`),
      num_messages: numMessages,
      num_chars: numChars,
      healthz_idle: summary(idle),
      healthz_during_turns: summary(probes),
      turns: turns.sort((a, b) => a.ms - b.ms),
      tokenizer_long_pieces_on_event_loop: onLoop
    }
    console.log(JSON.stringify(result, null, 2))
    writeFileSync("bench/results/long-messages.json", JSON.stringify(result, null, 2) + "\n")
  } finally {
    await service.stop()
  }
}

void main()
