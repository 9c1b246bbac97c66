/**
 * Event-loop cost of long conversations: `node --import tsx bench/serve/long-conversation.ts
 * [--exchanges 70,500] [--turns 20] [--engine-threads 1] [--engine-nice 10] [--slice-ms MS]`. Builds
 * the service (`npm run build`) and runs it compiled, as `npm start` does. For each N:
 * starts the service (CPU engine, a fresh database of the PostgreSQL at DATABASE_URL), gives
 * one conversation N earlier exchanges (written to the database), restarts the service, then
 * sends 1-token turns to it one after another while a prober asks /healthz every 5 ms (and
 * another /readyz, which goes through the API and pings the database, every 50 ms). Reports
 * /healthz latency (p50, p99, max) with no turn running (3 s: the floor
 * this machine's scheduling gives; also a bare Node server's in another process, the floor
 * without the service), during the first (cold: the history is loaded and encoded) and the
 * later turns (and over all turns), /readyz latency idle and during the later turns, and each turn's wall time. Results go to
 * bench/results/long-conversation.json with machine, date, commit and command.
 */
import { execFileSync, spawn } from "node:child_process"
import { writeFileSync } from "node:fs"
import { freshDatabase, sqlPool } from "../../test/support/database.js"
import { REPO_ROOT } from "../../test/support/engineProcess.js"
import { postJson, readSse, startService } from "../../test/support/service.js"
import { listArg, provenance } from "./provenance.js"
import { latencySummary as summary } from "./stats.js"

const args = process.argv.slice(2)
const flag = (name: string, fallback: number) => {
  const i = args.indexOf(`--${name}`)
  return i < 0 ? fallback : Number(args[i + 1])
}
// Conversations of each length are measured in turn: 70 exchanges already fill the default
// model's 4,096-token window, so a longer one sends the same prompts and differs only in history.
const exchangeCounts = listArg("exchanges", ["70", "500"]).map(Number)
const numTurns = flag("turns", 20)
// The CPU engine's threads compete with the service for this machine's cores; one thread
// leaves a core to the service, so that the figures measure the event loop, not the OS scheduler.
const engineThreads = flag("engine-threads", 1)
// The engine's scheduling priority (nice), for the same reason.
const nice = flag("engine-nice", 10)
// The service's EVENT_LOOP_SLICE_MS (unset: its default).
const sliceArg = args.indexOf("--slice-ms") < 0 ? undefined : String(flag("slice-ms", 0))


/** One /healthz round trip to `url` (ms); probers wait PROBE_INTERVAL_MS between them. */
const probeMs = async (url: string): Promise<number> => {
  const t0 = performance.now()
  await fetch(url).then((r) => r.arrayBuffer())
  return performance.now() - t0
}
const PROBE_INTERVAL_MS = 5

const measure = async (numExchanges: number) => {
  const db = await freshDatabase()
  const service = await startService({ compiled: true, env: { DATABASE_URL: db.url } })
  const pool = sqlPool(db.url)
  try {
    const id = ((await (await postJson(`${service.url}/v1/conversations`, { system_prompt: "You are a helpful assistant." })).json()) as any)
      .conversation_id as string
    const now = Date.now()
    // Turns live in the partition of the month their conversation was created in.
    const [{ created_month }] = await pool.query(`SELECT created_month FROM chat_conversations WHERE id = $1`, [id])
    for (let start = 0; start < 2 * numExchanges; start += 500) {
      const values: Array<string> = []
      for (let seq = start; seq < Math.min(start + 500, 2 * numExchanges); seq++) {
        const role = seq % 2 === 0 ? "user" : "assistant"
        const content = role === "user"
          ? `Question ${seq / 2}: how does a paged KV cache work with continuous batching on a GPU?`
          : `Answer ${(seq - 1) / 2}: blocks of 16 tokens are allocated on demand and freed when the sequence ends, so many sequences share the memory.`
        values.push(`('${id}', ${seq}, '${role}', '${content}', 'completed', NULL, NULL, ${now}, ${created_month})`)
      }
      await pool.query(`INSERT INTO chat_turns (conversation_id, seq, role, content, status, num_prompt_tokens, num_completion_tokens, created_at_ms, conversation_month) VALUES ${values.join(",")}`)
    }
    // Restart so that nothing of the conversation is cached: the first turn loads it cold.
    await service.stop()
    const warm = await startService({ compiled: true, env: { DATABASE_URL: db.url, ENGINE_THREADS: String(engineThreads), EVENT_LOOP_SLICE_MS: sliceArg }, dataDir: service.dataDir })
    if (nice > 0) for (const pid of execFileSync("pgrep", ["-f", "llm-engine"]).toString().trim().split("\n")) execFileSync("renice", ["-n", String(nice), "-p", pid])
    // Start-up goes on after /healthz answers (engine, shards, partitions): wait it out.
    while ((await fetch(`${warm.url}/readyz`)).status !== 200) await new Promise((r) => setTimeout(r, 100))
    await new Promise((r) => setTimeout(r, 2000))
    const probes: Array<Array<number>> = []
    const readyProbes: Array<Array<number>> = []
    const turnMs: Array<number> = []
    let current: Array<number> = []
    let currentReady: Array<number> = []
    let probing = true
    const probeEvery = async (url: string, intervalMs: number, record: (ms: number) => void) => {
      while (probing) {
        record(await probeMs(url))
        await new Promise((r) => setTimeout(r, intervalMs))
      }
    }
    const prober = probeEvery(`${warm.url}/healthz`, PROBE_INTERVAL_MS, (ms) => current.push(ms))
    // /healthz is answered ahead of the API; /readyz goes through it (routing, schemas, fibers)
    // and pings the database: what an ordinary request sees, probed 10× less often.
    const readyProber = probeEvery(`${warm.url}/readyz`, 10 * PROBE_INTERVAL_MS, (ms) => currentReady.push(ms))
    // The floor: the same prober against the idle service (this machine's scheduling noise).
    const idle = current
    const idleReady = currentReady
    await new Promise((r) => setTimeout(r, 3000))
    for (let i = 0; i < numTurns; i++) {
      current = []
      currentReady = []
      const t0 = performance.now()
      const res = await postJson(`${warm.url}/v1/conversations/${id}/turns`, { role: "user", content: `Turn ${i}: and then?`, max_tokens: 1 })
      if (res.status !== 200) throw new Error(`turn ${i}: ${res.status} ${await res.text()}`)
      const events = await readSse(res, () => undefined)
      if (events.at(-1)?.event !== "done") throw new Error(`turn ${i} did not complete: ${JSON.stringify(events.at(-1))}`)
      turnMs.push(performance.now() - t0)
      probes.push(current)
      readyProbes.push(currentReady)
    }
    probing = false
    await Promise.all([prober, readyProber])
    await warm.stop()
    return {
      num_earlier_exchanges: numExchanges,
      healthz_idle: summary(idle),
      healthz_first_turn: summary(probes[0]!),
      healthz_later_turns: summary(probes.slice(1).flat()),
      // The issue's figure: every probe while a turn ran, the cold first one included.
      healthz_all_turns: summary(probes.flat()),
      readyz_idle: summary(idleReady),
      readyz_later_turns: summary(readyProbes.slice(1).flat()),
      turn_ms_first: +turnMs[0]!.toFixed(1),
      turn_ms_later: summary(turnMs.slice(1))
    }
  } finally {
    await pool.close()
  }
}

/**
 * The machine's floor: the same prober against a bare Node HTTP server in a child process
 * (no service, no engine, no database) for 3 s. A server in this process would share the
 * prober's event loop and miss the cost of waking another process.
 */
const bareNodeFloor = async () => {
  const child = spawn(process.execPath, ["-e", `require("node:http").createServer((q, s) => s.end('{"status":"ok"}')).listen(0, "127.0.0.1", function () { console.log(this.address().port) })`], { stdio: ["ignore", "pipe", "inherit"] })
  try {
    const port = await new Promise<string>((resolve, reject) => {
      child.stdout!.once("data", (d: Buffer) => resolve(d.toString().trim()))
      child.once("exit", (code) => reject(new Error(`the bare Node server exited (${code}) before listening`)))
    })
    const url = `http://127.0.0.1:${port}/healthz`
    const xs: Array<number> = []
    for (const end = performance.now() + 3000; performance.now() < end;) {
      xs.push(await probeMs(url))
      await new Promise((r) => setTimeout(r, PROBE_INTERVAL_MS))
    }
    return summary(xs)
  } finally {
    child.kill()
  }
}

const main = async () => {
  execFileSync("npm", ["run", "build", "--silent"], { cwd: REPO_ROOT, stdio: "inherit" })
  const healthzBareNode = await bareNodeFloor()
  const runs = []
  for (const n of exchangeCounts) runs.push(await measure(n))
  const result = {
    benchmark: "long-conversation",
    ...provenance(`node --import tsx bench/serve/long-conversation.ts --exchanges ${exchangeCounts.join(",")} --turns ${numTurns} --engine-threads ${engineThreads} --engine-nice ${nice}${sliceArg === undefined ? "" : ` --slice-ms ${sliceArg}`}`),
    engine_threads: engineThreads,
    engine_nice: nice,
    healthz_bare_node: healthzBareNode,
    event_loop_slice_ms: sliceArg === undefined ? "default" : Number(sliceArg),
    runs
  }
  console.log(JSON.stringify(result, null, 2))
  writeFileSync("bench/results/long-conversation.json", JSON.stringify(result, null, 2) + "\n")
}

void main()
