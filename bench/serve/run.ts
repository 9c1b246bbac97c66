/**
 * `npm run bench [-- options]`: the serving benchmark (bench/README.md).
 *
 * One invocation measures the baseline (bench/baseline/server.ts, compiled to dist/) and then the real service
 * (src/main.ts compiled to dist/, with bench/serve/sim.config.ts: a simulated H100 serving a
 * Llama-3.1-8B-shaped model) at the same load points, measures memory per idle SSE stream on
 * both, runs the scheduler-overhead bench if bench/scheduler/overhead.ts exists, prints a
 * table (ours, baseline, ours vs baseline) and writes bench/results/<name>.json and .svg.
 *
 * Options:
 *   --full                 the full sweep (default: the short run, < 2 min)
 *   --name NAME            results file name (default serve-short / serve-full)
 *   --concurrency 1,64     closed-loop points (streams)
 *   --rates 20,40          open-loop Poisson points (turns per second); "none" for none
 *   --warmup S --duration S  per point (seconds), overriding the mode's schedule
 *   --memory-streams N     idle streams for the memory measurement (0 = skip)
 *   --only service|baseline
 *   --device sim|cpu       the service's engine device (default sim)
 *   --embedded             the service uses embedded PGlite instead of PostgreSQL
 *   --database-url URL     PostgreSQL server (default $DATABASE_URL or postgres://postgres@127.0.0.1:5432/test);
 *                          the run creates its own database there (chat_bench_<pid>_<time>) and drops it
 *   --no-overhead          skip bench/scheduler/overhead.ts
 *   --cluster              the local cluster against the one-process server at 512 streams
 *                          (bench/serve/cluster.ts; its own options: --streams, --warmup, --duration,
 *                          --rounds)
 *   --event-loop           the one-process server's own event-loop delay at 2,048 streams
 *                          (bench/serve/event-loop.ts; the same options)
 *   --prefix-routing       prefix caching and conversation-affine routing on 4 simulated GPUs,
 *                          multi-turn load (bench/serve/prefix-routing.ts; the same options)
 *   --turn-ttft            TTFT per turn of one conversation on the CPU engine, prefix caching
 *                          on and off (bench/serve/turn-ttft.ts)
 *   --gateway              the service with its gateway features on: API-key authentication,
 *                          rate limits in Redis (the sim tier's limits, set high) and moderation
 *                          (a 50-word blocklist); the client sends the key
 *   --profile DIR          the service runs with `node --cpu-prof --cpu-prof-dir DIR` (a .cpuprofile
 *                          per service start, written when it stops)
 */
import { execFileSync, spawn } from "node:child_process"
import { chmodSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { performance } from "node:perf_hooks"
import { serviceNodeArgs } from "../../test/support/nodeArgs.js"
import { makeAgent, type Target } from "./client.js"
import { pointLabel, runPoint, type LoadPoint, type PointResult } from "./loadgen.js"
import { createPrivateDatabase, type PrivateDatabase } from "./database.js"
import { connectInspector, inspectorUrlOf } from "./inspector.js"
import { measureIdleMemory, type MemoryResult } from "./memory.js"
import { renderSvg, type Panel } from "./plot.js"
import { REPO_ROOT, startBaseline, startService, type Running } from "./processes.js"
import { CpuMeter } from "./proc.js"
import { Progress } from "./progress.js"
import { round } from "./stats.js"
import { SHAREGPT_LIKE } from "./workload.js"

// ---------------------------------------------------------------------------------------------
// Options

const argv = process.argv.slice(2)
const flag = (name: string) => argv.includes(`--${name}`)
const value = (name: string): string | undefined => {
  const i = argv.indexOf(`--${name}`)
  return i >= 0 ? argv[i + 1] : undefined
}
const numbers = (name: string): Array<number> | undefined => {
  const v = value(name)
  if (v === undefined) return undefined
  if (v === "none") return []
  return v.split(",").map((s) => {
    const n = Number(s)
    if (!(n > 0)) throw new Error(`--${name}: bad number ${s}`)
    return n
  })
}

const full = flag("full")
const mode = full ? "full" : "short"
const name = value("name") ?? `serve-${mode}`
const device = value("device") ?? "sim"
const only = value("only")
const embedded = flag("embedded")
const databaseUrl = value("database-url") ?? process.env.DATABASE_URL ?? "postgres://postgres@127.0.0.1:5432/test"

/** Warm-up and window (seconds) of a point: long enough for requests of ~338 tokens at that load. */
const schedule = (p: LoadPoint): { warmup: number; duration: number } => {
  const w = value("warmup"), d = value("duration")
  const base = !full
    ? { warmup: 1, duration: 5 }
    : p.kind === "poisson"
    ? { warmup: 8, duration: 20 }
    : p.concurrency >= 2048
    ? { warmup: 25, duration: 30 }
    : p.concurrency >= 1024
    ? { warmup: 18, duration: 30 }
    : p.concurrency >= 256
    ? { warmup: 6, duration: 20 }
    : { warmup: 3, duration: 15 }
  return { warmup: w === undefined ? base.warmup : Number(w), duration: d === undefined ? base.duration : Number(d) }
}

const concurrency = numbers("concurrency") ?? (full ? [1, 16, 64, 256, 1024, 2048] : [1, 64, 256])
const rates = numbers("rates") ?? (full ? [4, 16, 64] : [])
const points: Array<LoadPoint> = [
  ...concurrency.map((c): LoadPoint => ({ kind: "closed", concurrency: c })),
  ...rates.map((r): LoadPoint => ({ kind: "poisson", rate: r }))
]
const memoryStreams = Number(value("memory-streams") ?? (full ? 1000 : 256))
const engine = { maxNumSeqs: 2048, maxNumBatchedTokens: 8192, numSlots: 4096, clientBufferTokens: 64 }
const maxInFlight = 2048
const profileDir = value("profile")
const gateway = flag("gateway")
const GATEWAY_API_KEY = "bench-key"
/** Moderation's cost is the blocklist scan of each output window: a list of realistic size. */
const GATEWAY_BLOCKLIST = Array.from({ length: 50 }, (_, i) => `blockedterm${i}`).join(",")
const gatewayEnv: Record<string, string> = {
  API_KEYS: `${GATEWAY_API_KEY}=bench-user:bench`,
  RATE_LIMIT_STORE: "redis",
  REDIS_KEY_PREFIX: `bench-${process.pid}:`,
  MODERATION_BLOCKLIST: GATEWAY_BLOCKLIST
}

// ---------------------------------------------------------------------------------------------
// Helpers

const progress = new Progress()
const started = performance.now()
const log = (s: string) => progress.log(`[${((performance.now() - started) / 1000).toFixed(0).padStart(4)}s] ${s}`)
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

const git = (args: Array<string>): string => {
  try {
    return execFileSync("git", args, { cwd: REPO_ROOT, encoding: "utf8" }).trim()
  } catch {
    return "unknown"
  }
}

const machine = () => {
  const cpus = os.cpus()
  return {
    os: `${os.type()} ${os.release()} ${os.arch()}`,
    cpuModel: cpus[0]?.model ?? "unknown",
    cpuCount: cpus.length,
    totalMemGiB: round(os.totalmem() / 2 ** 30, 1),
    node: process.version,
    hostname: os.hostname()
  }
}

const targetOf = (r: Running): Target => ({
  host: r.host,
  port: r.port,
  agent: makeAgent(),
  ...(gateway && r.name === "service" ? { authorization: `Bearer ${GATEWAY_API_KEY}` } : {})
})

interface SystemRun {
  readonly points: Array<PointResult>
  memory?: MemoryResult
  memoryError?: string
  startupS?: number
}

const runPoints = async (system: "ours" | "baseline", running: Running): Promise<Array<PointResult>> => {
  const results: Array<PointResult> = []
  for (const point of points) {
    const target = targetOf(running)
    const { warmup, duration } = schedule(point)
    const r = await runPoint(target, point, {
      label: `${system} ${pointLabel(point)}`,
      warmupMs: warmup * 1000,
      durationMs: duration * 1000,
      workload: SHAREGPT_LIKE,
      maxInFlight,
      progress,
      cpuPids: () => ({ ...running.pids(), loadgen: process.pid }),
      rssPid: running.pid
    })
    results.push(r)
    log(
      `  ${system.padEnd(8)} ${pointLabel(point).padEnd(12)} TTFT p50 ${fmtMs(r.ttftMs.p50)} p99 ${fmtMs(r.ttftMs.p99)}  ` +
        `ITL p50 ${fmtMs(r.itlMs.p50)}  ${Math.round(r.outputTokPerS)} tok/s  ${r.reqPerS.toFixed(1)} req/s  ` +
        `errors ${r.errors.total}  cpu ${JSON.stringify(r.cpuCores)}`
    )
    for (const s of r.errors.samples) log(`    error: ${s}`)
    // Let the target finish the cancellations of the aborted streams: wait until its processes
    // are quiet (< 0.25 cores over 300 ms), at most 30 s.
    const quietSince = performance.now()
    await sleep(300)
    for (;;) {
      const meter = new CpuMeter(running.pids)
      meter.start()
      await sleep(300)
      const used = Object.values(meter.stop()).reduce((a, b) => a + b, 0)
      if (used < 0.25 || performance.now() - quietSince > 30_000) break
    }
    target.agent.destroy()
  }
  return results
}

/** Targets running now: stopped if this process is interrupted. */
const live = new Set<Running>()
const track = async <A extends Running>(r: Promise<A>): Promise<A> => {
  const running = await r
  live.add(running)
  running.process.once("exit", () => live.delete(running))
  return running
}
for (const signal of ["SIGINT", "SIGTERM"] as const) {
  process.once(signal, () => {
    progress.finish()
    process.stderr.write(`${signal}: stopping the targets\n`)
    void Promise.all([...live].map((r) => r.stop())).finally(() => process.exit(130))
  })
}

const inspectorOf = async (r: Running) => {
  const url = inspectorUrlOf(r.output())
  if (url === undefined) return undefined
  try {
    return await connectInspector(url)
  } catch (e) {
    log(`inspector: ${String(e)}; memory without a forced GC`)
    return undefined
  }
}

const fmtMs = (x: number) => (Number.isFinite(x) ? (x >= 1000 ? `${(x / 1000).toFixed(2)}s` : `${x.toFixed(1)}ms`) : "–")

const runOverhead = async (): Promise<{ command: string; output: string; exitCode: number | null } | undefined> => {
  const script = path.join(REPO_ROOT, "bench/scheduler/overhead.ts")
  if (!existsSync(script) || flag("no-overhead")) return undefined
  const args = ["--import", "tsx", "bench/scheduler/overhead.ts", ...(full ? [] : ["--short"])]
  log(`scheduler overhead: node ${args.join(" ")}`)
  return await new Promise((resolve) => {
    const child = spawn(process.execPath, args, { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"] })
    let output = ""
    child.stdout.on("data", (d: Buffer) => (output += d.toString()))
    child.stderr.on("data", (d: Buffer) => process.stderr.write(d))
    const timer = setTimeout(() => child.kill("SIGKILL"), full ? 600_000 : 90_000)
    child.on("exit", (code) => {
      clearTimeout(timer)
      resolve({ command: `node ${args.join(" ")}`, output: output.trim(), exitCode: code })
    })
  })
}

// ---------------------------------------------------------------------------------------------
// Report

const num = (x: number, d = 1) => (Number.isFinite(x) ? x.toFixed(d) : "–")
const kb = (b: number) => (Number.isFinite(b) ? `${(b / 1024).toFixed(1)} KB` : "–")

interface Comparison {
  readonly point: LoadPoint
  readonly label: string
  readonly ours: PointResult | undefined
  readonly baseline: PointResult | undefined
  readonly vsBaseline: {
    readonly ttftP50DeltaMs: number
    readonly ttftP99DeltaMs: number
    readonly itlP50DeltaMs: number
    readonly tpotP50DeltaMs: number
    readonly e2eP99DeltaMs: number
    readonly outputTokPerSRatio: number
    readonly reqPerSRatio: number
  } | undefined
}

const compare = (ours: SystemRun | undefined, base: SystemRun | undefined): Array<Comparison> =>
  points.map((point, i) => {
    const o = ours?.points[i]
    const b = base?.points[i]
    return {
      point,
      label: pointLabel(point),
      ours: o,
      baseline: b,
      vsBaseline: o === undefined || b === undefined ? undefined : {
        ttftP50DeltaMs: round(o.ttftMs.p50 - b.ttftMs.p50, 2),
        ttftP99DeltaMs: round(o.ttftMs.p99 - b.ttftMs.p99, 2),
        itlP50DeltaMs: round(o.itlMs.p50 - b.itlMs.p50, 2),
        tpotP50DeltaMs: round(o.tpotMs.p50 - b.tpotMs.p50, 2),
        e2eP99DeltaMs: round(o.e2eMs.p99 - b.e2eMs.p99, 1),
        outputTokPerSRatio: round(o.outputTokPerS / b.outputTokPerS, 3),
        reqPerSRatio: round(o.reqPerS / b.reqPerS, 3)
      }
    }
  })

const table = (rows: Array<Comparison>): string => {
  const head = ["load", "system", "TTFT p50", "TTFT p90", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50", "E2E p50", "E2E p99", "out tok/s", "req/s", "errors", "cpu cores (svc/eng/gen)"]
  const lines: Array<Array<string>> = [head]
  const row = (label: string, system: string, r: PointResult) => {
    const c = r.cpuCores
    const cpu = [c.service ?? c.baseline, c.engine, c.loadgen].map((x) => (x === undefined ? "-" : x.toFixed(2))).join("/")
    return [label, system, fmtMs(r.ttftMs.p50), fmtMs(r.ttftMs.p90), fmtMs(r.ttftMs.p99), fmtMs(r.itlMs.p50), fmtMs(r.itlMs.p99), fmtMs(r.tpotMs.p50), fmtMs(r.e2eMs.p50), fmtMs(r.e2eMs.p99), num(r.outputTokPerS, 0), num(r.reqPerS, 1), String(r.errors.total), cpu]
  }
  const delta = (x: number) => (Number.isFinite(x) ? `${x >= 0 ? "+" : ""}${fmtMs(x)}` : "–")
  for (const c of rows) {
    if (c.ours !== undefined) lines.push(row(c.label, "ours", c.ours))
    if (c.baseline !== undefined) lines.push(row(c.ours === undefined ? c.label : "", "baseline", c.baseline))
    const v = c.vsBaseline
    if (v !== undefined && c.ours !== undefined && c.baseline !== undefined) {
      lines.push(["", "ours−base", delta(v.ttftP50DeltaMs), delta(c.ours.ttftMs.p90 - c.baseline.ttftMs.p90), delta(v.ttftP99DeltaMs), delta(v.itlP50DeltaMs), delta(c.ours.itlMs.p99 - c.baseline.itlMs.p99), delta(v.tpotP50DeltaMs), delta(c.ours.e2eMs.p50 - c.baseline.e2eMs.p50), delta(v.e2eP99DeltaMs), `×${num(v.outputTokPerSRatio, 2)}`, `×${num(v.reqPerSRatio, 2)}`, "", ""])
    }
  }
  const widths = head.map((_, i) => Math.max(...lines.map((l) => (l[i] ?? "").length)))
  return lines.map((l, j) => {
    const s = l.map((cell, i) => (i < 2 ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join("  ")
    return j === 0 ? `${s}\n${"-".repeat(s.length)}` : s
  }).join("\n")
}

const plot = (rows: Array<Comparison>, title: string, footnote: string): string => {
  const closed = rows.filter((r) => r.point.kind === "closed")
  const open = rows.filter((r) => r.point.kind === "poisson")
  const xOf = (r: Comparison) => (r.point.kind === "closed" ? r.point.concurrency : r.point.rate)
  const series = (rs: Array<Comparison>, pick: (p: PointResult) => number, which: "ours" | "baseline", name: string, color: string, dashed: boolean) => ({
    name,
    color,
    dashed,
    points: rs.flatMap((r) => {
      const p = r[which]
      return p === undefined ? [] : [[xOf(r), pick(p)] as const]
    })
  })
  const latency = (rs: Array<Comparison>, xLabel: string, title: string): Panel => ({
    title,
    xLabel,
    yLabel: "TTFT (ms)",
    logX: true,
    logY: true,
    series: [
      series(rs, (p) => p.ttftMs.p50, "ours", "ours p50", "#1f77b4", false),
      series(rs, (p) => p.ttftMs.p99, "ours", "ours p99", "#d62728", false),
      series(rs, (p) => p.ttftMs.p50, "baseline", "baseline p50", "#1f77b4", true),
      series(rs, (p) => p.ttftMs.p99, "baseline", "baseline p99", "#d62728", true)
    ]
  })
  const throughput = (rs: Array<Comparison>, xLabel: string, title: string): Panel => ({
    title,
    xLabel,
    yLabel: "output tokens/s",
    logX: true,
    logY: true,
    series: [
      series(rs, (p) => p.outputTokPerS, "ours", "ours", "#2ca02c", false),
      series(rs, (p) => p.outputTokPerS, "baseline", "baseline", "#2ca02c", true)
    ]
  })
  const itl = (rs: Array<Comparison>, xLabel: string, title: string): Panel => ({
    title,
    xLabel,
    yLabel: "ms",
    logX: true,
    logY: true,
    series: [
      series(rs, (p) => p.itlMs.p50, "ours", "ours ITL p50", "#9467bd", false),
      series(rs, (p) => p.itlMs.p99, "ours", "ours ITL p99", "#ff7f0e", false),
      series(rs, (p) => p.itlMs.p50, "baseline", "baseline ITL p50", "#9467bd", true),
      series(rs, (p) => p.itlMs.p99, "baseline", "baseline ITL p99", "#ff7f0e", true)
    ]
  })
  const panels: Array<Panel> = []
  if (closed.length > 0) {
    panels.push(latency(closed, "concurrent streams (closed loop)", "TTFT vs concurrency"))
    panels.push(throughput(closed, "concurrent streams (closed loop)", "Output throughput vs concurrency"))
    panels.push(itl(closed, "concurrent streams (closed loop)", "Inter-token latency vs concurrency"))
  }
  if (open.length > 0) {
    panels.push(latency(open, "arrival rate (turns/s, Poisson)", "TTFT vs arrival rate"))
    panels.push(throughput(open, "arrival rate (turns/s, Poisson)", "Output throughput vs arrival rate"))
  }
  return renderSvg(title, footnote, panels, panels.length >= 3 ? 3 : 2)
}

// ---------------------------------------------------------------------------------------------
// Main

const main = async () => {
  const info = machine()
  const commit = git(["rev-parse", "HEAD"])
  const dirty = git(["status", "--porcelain"]).length > 0
  const command = process.env.npm_lifecycle_event === "bench"
    ? `npm run bench${argv.length > 0 ? ` -- ${argv.join(" ")}` : ""}`
    : `node --import tsx bench/serve/run.ts ${argv.join(" ")}`.trim()
  log(`serving benchmark (${mode}): ${points.map(pointLabel).join(", ")}; ${info.cpuCount}× ${info.cpuModel}, node ${info.node}, commit ${commit.slice(0, 10)}${dirty ? " (dirty)" : ""}`)
  log(`service: device ${device}, ${embedded ? "embedded PGlite" : `a private database on the PostgreSQL of ${databaseUrl.replace(/\/\/[^@]*@/, "//…@")}`}`)

  const dataDir = mkdtempSync(path.join(os.tmpdir(), "chat-bench-data-"))
  let database: PrivateDatabase | undefined
  if (!embedded && only !== "baseline") {
    database = await createPrivateDatabase(databaseUrl)
    log(`database ${database.name} created (dropped at the end)`)
  }
  // A private copy of the engine binary: a rebuild of engine/build during the run cannot pull it away.
  let engineBin = process.env.ENGINE_BIN
  if (engineBin === undefined && only !== "baseline") {
    const built = path.join(REPO_ROOT, "engine/build/llm-engine")
    if (!existsSync(built)) throw new Error("engine/build/llm-engine is missing: run `npm run build:engine` first")
    engineBin = path.join(dataDir, "llm-engine")
    copyFileSync(built, engineBin)
    chmodSync(engineBin, 0o755)
  }
  // The memory measurement's engine: the sim slowed down 20× (`--sim-time-scale 20`), so that its
  // blocker turn (bench/serve/memory.ts) outlasts the opening of every idle stream.
  const slowEngineBin = path.join(dataDir, "llm-engine-slow")
  writeFileSync(slowEngineBin, `#!/bin/sh\nexec "${engineBin ?? path.join(REPO_ROOT, "engine/build/llm-engine")}" "$@" ${device === "sim" ? "--sim-time-scale 20" : ""}\n`)
  chmodSync(slowEngineBin, 0o755)
  const serviceEnv = (extra: Record<string, string>) => ({
    DATABASE_URL: database?.url,
    ENGINE_BIN: engineBin,
    BENCH_DEVICE: device,
    BENCH_MAX_NUM_SEQS: String(engine.maxNumSeqs),
    BENCH_NUM_SLOTS: String(engine.numSlots),
    BENCH_MAX_NUM_BATCHED_TOKENS: String(engine.maxNumBatchedTokens),
    BENCH_CLIENT_BUFFER_TOKENS: String(engine.clientBufferTokens),
    // sim: 2^40 bytes = 524,288 blocks of 16 Llama-8B tokens (2 MiB each; none allocated):
    // enough for every stream, so KV capacity (preemption) is not what is measured. cpu: 1 GiB.
    BENCH_KV_CACHE_BYTES: String(device === "sim" ? 2 ** 40 : 2 ** 30),
    ...(gateway ? gatewayEnv : {}),
    ...extra
  })

  let ours: SystemRun | undefined
  let baseline: SystemRun | undefined
  try {
    if (only !== "service") {
      log("baseline: dist/bench/baseline/server.js (compiled)")
      const t = performance.now()
      const b = await track(startBaseline(engine))
      baseline = { points: [], startupS: round((performance.now() - t) / 1000, 2) }
      try {
        baseline.points.push(...(await runPoints("baseline", b)))
      } finally {
        await b.stop()
      }
      if (memoryStreams > 0) {
        log(`baseline: memory with ${memoryStreams} idle streams`)
        const m = await track(startBaseline({ ...engine, maxNumSeqs: 1, timeScale: 20 }, ["--inspect=127.0.0.1:0"]))
        // A connected inspector keeps the process from exiting: closed before stop().
        const inspector = await inspectorOf(m)
        try {
          baseline.memory = await measureIdleMemory(targetOf(m), m.pid, memoryStreams, progress, `baseline memory ${memoryStreams}`, inspector)
        } catch (e) {
          baseline.memoryError = String(e)
          log(`baseline memory measurement failed: ${String(e)}`)
        } finally {
          inspector?.close()
          await m.stop()
        }
        log("baseline: memory done")
      }
    }
    if (only !== "baseline") {
      log("service: dist/src/main.js (compiled), CLUSTER_CONFIG=bench/serve/sim.config.ts")
      const t = performance.now()
      const s = await track(startService({ dataDir, env: serviceEnv({}), nodeArgs: profileDir === undefined ? [] : ["--cpu-prof", `--cpu-prof-dir=${path.resolve(profileDir)}`] }))
      ours = { points: [], startupS: round((performance.now() - t) / 1000, 2) }
      log(`  started in ${ours.startupS} s`)
      try {
        ours.points.push(...(await runPoints("ours", s)))
      } catch (e) {
        log(`service output (tail):\n${s.output().slice(-3000)}`)
        throw e
      } finally {
        await s.stop()
      }
      if (memoryStreams > 0) {
        log(`service: memory with ${memoryStreams} idle streams`)
        const m = await track(startService({ dataDir, env: serviceEnv({ BENCH_MAX_NUM_SEQS: "1", ENGINE_BIN: slowEngineBin }), nodeArgs: ["--inspect=127.0.0.1:0"] }))
        const inspector = await inspectorOf(m)
        try {
          ours.memory = await measureIdleMemory(targetOf(m), m.pid, memoryStreams, progress, `ours memory ${memoryStreams}`, inspector)
          log("service: memory measured; stopping")
        } catch (e) {
          ours.memoryError = String(e)
          log(`service memory measurement failed: ${String(e)}\n${m.output().slice(-2000)}`)
        } finally {
          inspector?.close()
          await m.stop()
        }
      }
    }
  } finally {
    rmSync(dataDir, { recursive: true, force: true })
    await database?.drop().catch((e) => log(`could not drop ${database?.name}: ${String(e)}`))
  }

  log("done with the load points")
  const overhead = await runOverhead()
  const rows = compare(ours, baseline)
  const at1024 = rows.find((r) => r.point.kind === "closed" && r.point.concurrency === 1024)?.vsBaseline
  const memKb = ours?.memory === undefined ? NaN : ours.memory.perStreamBytes / 1024
  const targets = {
    ttftP99DeltaAt1024Ms: at1024 === undefined ? null : { value: at1024.ttftP99DeltaMs, target: "≤ 50 ms", met: at1024.ttftP99DeltaMs <= 50 },
    outputTokPerSRatioAt1024: at1024 === undefined ? null : { value: at1024.outputTokPerSRatio, target: "≥ 0.5", met: at1024.outputTokPerSRatio >= 0.5 },
    memoryPerIdleStreamKB: Number.isFinite(memKb) ? { value: round(memKb, 1), target: "≤ 50 KB", met: memKb <= 50 } : null
  }
  const elapsedS = round((performance.now() - started) / 1000, 1)
  const date = new Date().toISOString()

  const results = {
    name,
    mode,
    date,
    git: { commit, dirty },
    command,
    // The Node flags of the service (its pool size depends on the machine; BENCH_SERVICE_NODE_ARGS
    // is not in the command).
    service_node_args: serviceNodeArgs(),
    machine: info,
    elapsedS,
    parameters: {
      points,
      schedule: points.map((p) => ({ point: pointLabel(p), ...schedule(p) })),
      workload: SHAREGPT_LIKE,
      engine: { device, ...engine, simKvCacheBytes: device === "sim" ? 2 ** 40 : 2 ** 30, stepModel: "engine/src/sim/sim_backend.h defaults (Llama-3.1-8B on H100 SXM5)" },
      database: embedded ? "embedded PGlite" : `a private database on ${databaseUrl.replace(/\/\/[^@]*@/, "//…@").replace(/\/[^/]*$/, "")}`,
      maxInFlight,
      memoryStreams
    },
    startupS: { ours: ours?.startupS ?? null, baseline: baseline?.startupS ?? null },
    points: rows,
    memory: {
      ours: ours?.memory ?? ours?.memoryError ?? null,
      baseline: baseline?.memory ?? baseline?.memoryError ?? null
    },
    targets,
    schedulerOverhead: overhead ?? null
  }

  const resultsDir = path.join(REPO_ROOT, "bench/results")
  mkdirSync(resultsDir, { recursive: true })
  const jsonPath = path.join(resultsDir, `${name}.json`)
  const svgPath = path.join(resultsDir, `${name}.svg`)
  writeFileSync(jsonPath, JSON.stringify(results, null, 2) + "\n")
  writeFileSync(
    svgPath,
    plot(
      rows,
      `chat-serve vs bare-http baseline — sim H100 / Llama-3.1-8B (${mode})`,
      `${date.slice(0, 16)}Z · ${info.cpuCount}× ${info.cpuModel} · node ${info.node} · commit ${commit.slice(0, 10)}${dirty ? "+dirty" : ""} · solid: ours, dashed: baseline`
    )
  )

  // The summary on stdout.
  const out: Array<string> = []
  out.push("")
  out.push(`Serving benchmark (${mode}) — ${date} — ${info.cpuCount}× ${info.cpuModel}, ${info.totalMemGiB} GiB, node ${info.node} — commit ${commit.slice(0, 10)}${dirty ? " (dirty)" : ""}`)
  out.push(`workload: ShareGPT-like input ~${SHAREGPT_LIKE.input.mean} / output ~${SHAREGPT_LIKE.output.mean} tokens (log-normal), geometric turns mean ${SHAREGPT_LIKE.turnsMean}; engine sim (Llama-3.1-8B on H100 model), max_num_seqs ${engine.maxNumSeqs}, ${engine.maxNumBatchedTokens} tokens/step`)
  out.push("")
  out.push(table(rows))
  out.push("")
  for (const r of rows) {
    const o = r.ours, b = r.baseline
    if (o === undefined && b === undefined) continue
    const t = (p: PointResult | undefined) => (p === undefined ? "–" : `new input ${num(p.tokens.meanNewInput)}, prompt ${num(p.tokens.meanPrompt)}, output ${num(p.tokens.meanOutput)} tok, ${num(p.tokens.tokensPerEvent, 2)} tok/event; ${p.requests.completedInWindow} done in window, ${p.requests.waitingAtEnd} waiting for a first token at the end${p.requests.dropped > 0 ? `, ${p.requests.dropped} arrivals dropped` : ""}${p.requests.resentAfterReset > 0 ? `, ${p.requests.resentAfterReset} re-sent after a keep-alive reset` : ""}; client loop delay p99 ${num(p.clientLoopDelayMs.p99)} ms`)
    out.push(`${r.label.padEnd(12)} ours: ${t(o)}`)
    out.push(`${"".padEnd(12)} base: ${t(b)}`)
  }
  out.push("")
  const mem = (m: MemoryResult | undefined, err: string | undefined) =>
    m !== undefined
      ? `${kb(m.perStreamBytes)} per stream (RSS marginal ${kb(m.marginalPerStreamBytes)}, V8 heap ${kb(m.heapPerStreamBytes)}); RSS ${m.levels.map((l) => round(l.rssBytes / 2 ** 20, 1)).join(" → ")} MiB at ${m.levels.map((l) => l.streams).join("/")} idle streams${m.forcedGc ? " (forced GC)" : ""}${m.streamsWithTokens > 0 || m.streamsFailed > 0 ? ` (${m.streamsWithTokens} got tokens, ${m.streamsFailed} failed)` : ""}`
      : err ?? "not measured"
  out.push(`memory per idle SSE stream: ours ${mem(ours?.memory, ours?.memoryError)}`)
  out.push(`                            baseline ${mem(baseline?.memory, baseline?.memoryError)}`)
  out.push(`  (how: ${ours?.memory?.method ?? baseline?.memory?.method ?? "see bench/serve/memory.ts"})`)
  out.push("")
  const target = (label: string, t: { value: number; target: string; met: boolean } | null) =>
    out.push(`target ${label}: ${t === null ? "not measured in this run" : `${t.value} (target ${t.target}): ${t.met ? "met" : "NOT met"}`}`)
  target("TTFT p99 ours − baseline at 1024 streams (ms)", targets.ttftP99DeltaAt1024Ms)
  target("output tok/s ours / baseline at 1024 streams", targets.outputTokPerSRatioAt1024)
  target("memory per idle SSE stream (KB)", targets.memoryPerIdleStreamKB)
  if (overhead !== undefined) {
    out.push("")
    out.push(`scheduler overhead (${overhead.command}, exit ${overhead.exitCode}):`)
    out.push(overhead.output)
  }
  out.push("")
  out.push(`results: ${path.relative(REPO_ROOT, jsonPath)}, plot: ${path.relative(REPO_ROOT, svgPath)}; total ${elapsedS} s`)
  process.stdout.write(out.join("\n") + "\n")
}

// `--cluster`: the local cluster against the one-process server instead (bench/serve/cluster.ts);
// `--event-loop`: the one-process server's event-loop delay at 2,048 streams (bench/serve/event-loop.ts).
if (flag("cluster")) void import("./cluster.js")
else if (flag("event-loop")) void import("./event-loop.js")
else if (flag("prefix-routing")) void import("./prefix-routing.js")
else if (flag("turn-ttft")) void import("./turn-ttft.js")
else main().then(
  () => process.exit(0),
  (e) => {
    progress.finish()
    process.stderr.write(`bench failed: ${e instanceof Error ? e.stack ?? e.message : String(e)}\n`)
    process.exit(1)
  }
)
