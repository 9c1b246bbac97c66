/**
 * `npm run bench -- --event-loop` (or `node --experimental-websocket --import tsx
 * bench/serve/event-loop.ts [--streams 2048] [--warmup 10] [--duration 30]`): the one-process
 * server (bench/serve/sim.config.ts, compiled) under N closed-loop streams of the ShareGPT-like
 * workload, every stream admitted (the tier's TTFT target lifted), with its event-loop delay read from inside the server process: the bench connects
 * to the server's inspector (`--inspect`) and enables a `perf_hooks.monitorEventLoopDelay`
 * histogram (10 ms resolution) there, reset after the warm-up. It reports the delay's p50,
 * p99 and max over the window, each second's max, and how many seconds had a stall over 50 ms.
 * Writes bench/results/event-loop.json with machine, date, commit and command.
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { makeAgent } from "./client.js"
import { createPrivateDatabase } from "./database.js"
import { connectInspector, inspectorUrlOf } from "./inspector.js"
import { runPoint } from "./loadgen.js"
import { REPO_ROOT, startService } from "./processes.js"
import { Progress } from "./progress.js"
import { round } from "./stats.js"
import { SHAREGPT_LIKE } from "./workload.js"
import { numberArg, provenance } from "./provenance.js"

const numStreams = numberArg("streams", 2048)
const warmupMs = numberArg("warmup", 10) * 1000
const durationMs = numberArg("duration", 30) * 1000
const STALL_MS = 50

const main = async () => {
  execFileSync("npm", ["run", "build", "--silent"], { cwd: REPO_ROOT, stdio: "inherit" })
  const db = await createPrivateDatabase(process.env["DATABASE_URL"] ?? "postgres://postgres@127.0.0.1:5432/test")
  const service = await startService({
    // Every stream is admitted (no TTFT-target refusals): the point is 2,048 live streams.
    env: { DATABASE_URL: db.url, SHUTDOWN_GRACE_MS: "2000", BENCH_TTFT_P99_MS: "3600000" },
    dataDir: mkdtempSync(path.join(os.tmpdir(), "bench-event-loop-")),
    nodeArgs: ["--inspect=127.0.0.1:0"]
  })
  try {
    const url = inspectorUrlOf(service.output())
    const inspector = url === undefined ? undefined : await connectInspector(url)
    if (inspector === undefined) throw new Error("no inspector (run with node --experimental-websocket)")
    /** Evaluates `expression` in the server's global scope (with the console's `require`). */
    const evaluate = async (expression: string): Promise<unknown> => {
      const r = await inspector.call("Runtime.evaluate", { expression, includeCommandLineAPI: true, returnByValue: true })
      return (r["result"] as { value?: unknown } | undefined)?.value
    }
    await evaluate(`globalThis.__benchLoop = require("node:perf_hooks").monitorEventLoopDelay({ resolution: 10 }); globalThis.__benchLoop.enable(); 0`)
    const read = `(() => { const h = globalThis.__benchLoop; const v = { p50: h.percentile(50) / 1e6, p99: h.percentile(99) / 1e6, max: h.max / 1e6, count: h.count }; return v })()`
    const perSecondMaxMs: Array<number> = []
    let window: { p50: number; p99: number; max: number } | undefined
    // A second histogram for each second's max, read and reset once a second.
    await evaluate(`globalThis.__benchSecond = require("node:perf_hooks").monitorEventLoopDelay({ resolution: 10 }); globalThis.__benchSecond.enable(); 0`)
    let sampling = false
    const sampler = setInterval(() => {
      if (!sampling) return
      void evaluate(`(() => { const m = globalThis.__benchSecond.max / 1e6; globalThis.__benchSecond.reset(); return m })()`).then((m) => {
        if (typeof m === "number" && m > 0) perSecondMaxMs.push(round(m, 1))
      })
    }, 1000)
    setTimeout(() => {
      void evaluate(`globalThis.__benchLoop.reset(); globalThis.__benchSecond.reset(); 0`)
      sampling = true
    }, warmupMs)
    const point = await runPoint({ host: service.host, port: service.port, agent: makeAgent() }, { kind: "closed", concurrency: numStreams }, {
      label: `${numStreams} streams`,
      warmupMs,
      durationMs,
      workload: SHAREGPT_LIKE,
      maxInFlight: numStreams,
      progress: new Progress(),
      cpuPids: () => service.pids()
    })
    sampling = false
    clearInterval(sampler)
    window = (await evaluate(read)) as { p50: number; p99: number; max: number }
    inspector.close()
    const result = {
      benchmark: "event-loop",
      ...provenance(`node --experimental-websocket --import tsx bench/serve/event-loop.ts --streams ${numStreams} --warmup ${warmupMs / 1000} --duration ${durationMs / 1000}`),
      num_streams: numStreams,
      event_loop_delay_ms: { p50: round(window.p50, 1), p99: round(window.p99, 1), max: round(window.max, 1) },
      seconds_with_stall_over_50_ms: perSecondMaxMs.filter((m) => m > STALL_MS).length,
      seconds_sampled: perSecondMaxMs.length,
      per_second_max_ms: perSecondMaxMs,
      output_tok_per_s: round(point.outputTokPerS, 1),
      ttft_ms: { p50: round(point.ttftMs.p50, 1), p99: round(point.ttftMs.p99, 1) },
      completed: point.requests.completedInWindow,
      errors: point.errors.total,
      error_samples: point.errors.samples.slice(0, 5),
      cpu_cores: point.cpuCores
    }
    console.log(JSON.stringify(result, null, 2))
    writeFileSync(path.join(REPO_ROOT, "bench/results/event-loop.json"), JSON.stringify(result, null, 2) + "\n")
  } finally {
    await service.stop()
    await db.drop()
  }
  process.exit(0)
}

void main()
