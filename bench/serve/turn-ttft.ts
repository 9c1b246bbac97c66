/**
 * `npm run bench -- --turn-ttft` (or `node --import tsx bench/serve/turn-ttft.ts [--turns 10]
 * [--conversations 3]`): the CPU engine with the generated tiny model (bench/serve/cpu.config.ts),
 * one conversation at a time, each turn a new ~150-token message and a 32-token greedy reply:
 * TTFT of each turn with prefix caching on and off, in one run. Without the cache a turn
 * prefills the whole history (TTFT grows with it); with it, about the new text. Writes
 * bench/results/turn-ttft.json with machine, date, commit and command.
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, writeFileSync } from "node:fs"
import http from "node:http"
import os from "node:os"
import path from "node:path"
import { performance } from "node:perf_hooks"
import { createPrivateDatabase } from "./database.js"
import { REPO_ROOT, startService } from "./processes.js"
import { round } from "./stats.js"
import { contentOf } from "./workload.js"
import { numberArg, provenance } from "./provenance.js"

const numTurns = numberArg("turns", 10)
const numConversations = numberArg("conversations", 3)

const post = (port: number, pathname: string, body: unknown, onFirstToken?: () => void) =>
  new Promise<string>((resolve, reject) => {
    const req = http.request({ host: "127.0.0.1", port, path: pathname, method: "POST", headers: { "content-type": "application/json" } }, (res) => {
      let text = ""
      res.setEncoding("utf8")
      res.on("data", (chunk: string) => {
        if (onFirstToken !== undefined && chunk.includes("event: token")) {
          onFirstToken()
          onFirstToken = undefined
        }
        text += chunk
      })
      res.on("end", () => resolve(text))
    })
    req.on("error", reject)
    req.end(JSON.stringify(body))
  })

const runMode = async (caching: boolean) => {
  const db = await createPrivateDatabase(process.env["DATABASE_URL"] ?? "postgres://postgres@127.0.0.1:5432/test")
  const service = await startService({
    env: { DATABASE_URL: db.url, CLUSTER_CONFIG: "bench/serve/cpu.config.ts", BENCH_PREFIX_CACHING: caching ? "1" : "0" },
    dataDir: mkdtempSync(path.join(os.tmpdir(), "bench-turn-ttft-"))
  })
  const ttftMs: Array<Array<number>> = Array.from({ length: numTurns }, () => [])
  const cachedTokens: Array<Array<number>> = Array.from({ length: numTurns }, () => [])
  const promptTokens: Array<Array<number>> = Array.from({ length: numTurns }, () => [])
  try {
    for (let c = 0; c < numConversations; c++) {
      const id = (JSON.parse(await post(service.port, "/v1/conversations", {})) as { conversation_id: string }).conversation_id
      for (let t = 0; t < numTurns; t++) {
        const content = (t === 0 ? ` conversation ${c} ${caching}:` : "") + contentOf(150)
        const start = performance.now()
        let first = 0
        const text = await post(service.port, `/v1/conversations/${id}/turns`, { role: "user", content, max_tokens: 32 }, () => (first = performance.now()))
        const done = JSON.parse(text.slice(text.lastIndexOf("data: ") + 6).trim()) as { usage: { prompt_tokens: number; prompt_tokens_details: { cached_tokens: number } } }
        ttftMs[t]!.push(first - start)
        cachedTokens[t]!.push(done.usage.prompt_tokens_details.cached_tokens)
        promptTokens[t]!.push(done.usage.prompt_tokens)
      }
    }
  } finally {
    await service.stop()
    await db.drop()
  }
  const median = (xs: Array<number>) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!
  const turns = ttftMs.map((xs, t) => ({
    turn: t + 1,
    ttft_ms_median: round(median(xs), 1),
    prompt_tokens_median: median(promptTokens[t]!),
    cached_tokens_median: median(cachedTokens[t]!)
  }))
  return { prefix_caching: caching, turns, last_over_first_ttft: round(turns.at(-1)!.ttft_ms_median / turns[0]!.ttft_ms_median, 2) }
}

const main = async () => {
  execFileSync("npm", ["run", "build", "--silent"], { cwd: REPO_ROOT, stdio: "inherit" })
  const on = await runMode(true)
  const off = await runMode(false)
  const result = {
    benchmark: "turn-ttft",
    ...provenance(`node --import tsx bench/serve/turn-ttft.ts --turns ${numTurns} --conversations ${numConversations}`),
    caching_on: on,
    caching_off: off
  }
  console.log(JSON.stringify(result, null, 2))
  writeFileSync(path.join(REPO_ROOT, "bench/results/turn-ttft.json"), JSON.stringify(result, null, 2) + "\n")
  process.exit(0)
}

void main()
