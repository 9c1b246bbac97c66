/**
 * `npm run bench -- --event-loop` (or `node --experimental-websocket --import tsx
 * bench/serve/event-loop.ts [--streams 2048] [--warmup 60] [--duration 150] [--client-nice N]`):
 * the one-process server (bench/serve/sim.config.ts, compiled) under N closed-loop streams of
 * the ShareGPT-like workload, every stream admitted (the tier's TTFT target lifted), with its event-loop delay
 * read from inside the server process: the bench connects to the server's inspector
 * (`--inspect`) and enables a `perf_hooks.monitorEventLoopDelay` histogram (10 ms resolution)
 * there, reset after the warm-up. That histogram records the interval between its timer's
 * runs, resolution included (an idle loop reads 10 ms), so the delay reported is the interval
 * less 10 ms. It reports the delay's p50, p99 and max over the window, each second's max, and
 * how many seconds had a stall over 50 ms.
 *
 * Each stall over 50 ms is also taken apart, from a 10 ms timer in the server: how much of it
 * the main thread spent on a CPU and how long it waited for one (Linux
 * `/proc/self/task/PID/schedstat`: run time and run-queue wait, ns), the collector pauses
 * within it (`PerformanceObserver` "gc" entries: kind 1 scavenge, 4 mark-compact, 8
 * incremental marking, which V8 reports as a marking cycle starts), and whether it fell in a
 * marking cycle (from that start to the end of the mark-compact that finishes it, while the
 * collector's helpers mark concurrently). On a 2-core machine shared with the load generator
 * and PostgreSQL, a thread that is ready to run may wait tens of milliseconds for a core.
 *
 * The window measures N live streams. The N users arrive within 1 s, and on a 2-core machine
 * the service takes ~30 s to create their conversations and admit their first turns; that
 * herd is the warm-up (60 s by default: on 2 cores the herd took 30–49 s), reported apart (`ramp`: its delay, and when the Nth
 * stream went live). `num_streams_live_at_window_start` < N means the warm-up was too short for
 * the machine and the window is not the steady state. The V8 heap's mark-compact cycles come
 * about once a minute at 2,048 streams, but not like clockwork: a 90 s window saw none once, so
 * the default window is 150 s.
 * Writes bench/results/event-loop.json with machine, date, commit and command.
 */
import { execFileSync } from "node:child_process"
import { mkdtempSync, readdirSync, writeFileSync } from "node:fs"
import os from "node:os"
import path from "node:path"
import { makeAgent } from "./client.js"
import { createPrivateDatabase } from "./database.js"
import { connectInspector, inspectorUrlOf } from "./inspector.js"
import { runPoint } from "./loadgen.js"
import { REPO_ROOT, startService } from "./processes.js"
import { Progress, type ProgressState } from "./progress.js"
import { round } from "./stats.js"
import { SHAREGPT_LIKE } from "./workload.js"
import { numberArg, provenance } from "./provenance.js"

const numStreams = numberArg("streams", 2048)
const warmupMs = numberArg("warmup", 60) * 1000
const durationMs = numberArg("duration", 150) * 1000
/**
 * The load generator's nice value (0–19), set on all its threads (Linux) once the service
 * runs: to see whether the service's stalls wait for the generator's share of the cores.
 */
const clientNice = numberArg("client-nice", 0)
if (!Number.isInteger(clientNice) || clientNice < 0 || clientNice > 19) {
  console.error("event-loop: --client-nice takes an integer from 0 to 19")
  process.exit(2)
}
const STALL_MS = 50
const RESOLUTION_MS = 10

/**
 * Evaluated in the server: a 10 ms timer that keeps, once `__benchStalls.on`, every interval
 * over RESOLUTION_MS + STALL_MS with the main thread's CPU time and run-queue wait over it (ms),
 * and the collector's pauses (start ms on `performance.now()`, duration ms, kind).
 */
const STALL_PROBE = `(() => {
  const fs = require("node:fs"); const { performance, PerformanceObserver } = require("node:perf_hooks");
  const S = globalThis.__benchStalls = { on: false, stalls: [], gcs: [] };
  const file = "/proc/self/task/" + process.pid + "/schedstat";
  const sched = () => { try { const [run, wait] = fs.readFileSync(file, "utf8").split(" "); return [Number(run) / 1e6, Number(wait) / 1e6] } catch { return [NaN, NaN] } };
  let last = performance.now(); let [lastRun, lastWait] = sched();
  setInterval(() => {
    const now = performance.now(); const [run, wait] = sched();
    if (S.on && now - last > ${RESOLUTION_MS + STALL_MS}) S.stalls.push({ at_ms: last, interval_ms: now - last, on_cpu_ms: run - lastRun, waiting_for_cpu_ms: wait - lastWait });
    last = now; lastRun = run; lastWait = wait;
  }, ${RESOLUTION_MS});
  new PerformanceObserver((list) => { if (S.on) for (const e of list.getEntries()) S.gcs.push({ at_ms: e.startTime, ms: e.duration, kind: e.detail ? e.detail.kind : e.kind }) }).observe({ entryTypes: ["gc"] });
  return 0 })()`

/** The delay of a histogram interval (ms): the interval less the timer's resolution. */
const delayOf = (intervalMs: number): number => round(Math.max(0, intervalMs - RESOLUTION_MS), 1)

interface Stall { readonly at_ms: number; readonly interval_ms: number; readonly on_cpu_ms: number; readonly waiting_for_cpu_ms: number }
interface GcPause { readonly at_ms: number; readonly ms: number; readonly kind: number }

/** The load generator's progress, watched for the moment every stream has a turn in flight. */
class LiveStreams extends Progress {
  /** Seconds from the point's start until `numStreams` turns were first in flight at once. */
  allLiveAtS: number | undefined
  inFlight = 0
  constructor(private readonly numStreams: number) {
    super()
  }
  override update(s: ProgressState): void {
    this.inFlight = s.inFlight
    if (this.allLiveAtS === undefined && s.inFlight >= this.numStreams) this.allLiveAtS = s.elapsedS
    super.update(s)
  }
}

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
    // After the spawn: the service and its children keep nice 0; only this process, the load
    // generator, runs behind them. Linux sets a nice value per thread.
    if (clientNice !== 0) for (const tid of readdirSync("/proc/self/task")) os.setPriority(Number(tid), clientNice)
    const url = inspectorUrlOf(service.output())
    const inspector = url === undefined ? undefined : await connectInspector(url)
    if (inspector === undefined) throw new Error("no inspector (run with node --experimental-websocket)")
    /** Evaluates `expression` in the server's global scope (with the console's `require`). */
    const evaluate = async (expression: string): Promise<unknown> => {
      const r = await inspector.call("Runtime.evaluate", { expression, includeCommandLineAPI: true, returnByValue: true })
      return (r["result"] as { value?: unknown } | undefined)?.value
    }
    await evaluate(STALL_PROBE)
    await evaluate(`globalThis.__benchLoop = require("node:perf_hooks").monitorEventLoopDelay({ resolution: ${RESOLUTION_MS} }); globalThis.__benchLoop.enable(); 0`)
    const read = `(() => { const h = globalThis.__benchLoop; const v = { p50: h.percentile(50) / 1e6, p99: h.percentile(99) / 1e6, max: h.max / 1e6, count: h.count }; return v })()`
    const live = new LiveStreams(numStreams)
    let ramp: { p50: number; p99: number; max: number } | undefined
    let liveAtWindowStart = 0
    const perSecondMaxMs: Array<number> = []
    let window: { p50: number; p99: number; max: number } | undefined
    // A second histogram for each second's max, read and reset once a second.
    await evaluate(`globalThis.__benchSecond = require("node:perf_hooks").monitorEventLoopDelay({ resolution: ${RESOLUTION_MS} }); globalThis.__benchSecond.enable(); 0`)
    let sampling = false
    const sampler = setInterval(() => {
      if (!sampling) return
      void evaluate(`(() => { const m = globalThis.__benchSecond.max / 1e6; globalThis.__benchSecond.reset(); return m })()`).then((m) => {
        if (typeof m === "number" && m > 0) sampling && perSecondMaxMs.push(delayOf(m))
      })
    }, 1000)
    setTimeout(() => {
      liveAtWindowStart = live.inFlight
      // The warm-up's histogram is the herd's (read first: the same call resets it).
      void evaluate(`(() => { const v = ${read}; globalThis.__benchLoop.reset(); globalThis.__benchSecond.reset(); globalThis.__benchStalls.on = true; globalThis.__benchStalls.start_ms = require("node:perf_hooks").performance.now(); return v })()`).then((v) => {
        ramp = v as { p50: number; p99: number; max: number }
      })
      sampling = true
    }, warmupMs)
    // Read at the window's end: after it the load generator aborts its streams, a burst no
    // serving loop sees.
    const windowRead = new Promise<{ p50: number; p99: number; max: number }>((resolve, reject) =>
      setTimeout(() => {
        sampling = false
        evaluate(`(() => { globalThis.__benchStalls.on = false; return ${read} })()`).then((w) => resolve(w as { p50: number; p99: number; max: number }), reject)
      }, warmupMs + durationMs)
    )
    const point = await runPoint({ host: service.host, port: service.port, agent: makeAgent() }, { kind: "closed", concurrency: numStreams }, {
      label: `${numStreams} streams`,
      warmupMs,
      durationMs,
      workload: SHAREGPT_LIKE,
      maxInFlight: numStreams,
      progress: live,
      cpuPids: () => ({ ...service.pids(), loadgen: process.pid })
    })
    clearInterval(sampler)
    window = await windowRead
    const probe = JSON.parse(String(await evaluate(`JSON.stringify(globalThis.__benchStalls)`))) as { stalls: Array<Stall>; gcs: Array<GcPause>; start_ms?: number }
    const windowStartMs = probe.start_ms ?? 0
    // A marking cycle runs from its start (V8 reports a kind-8 "gc" entry there) to the end of
    // the mark-compact that finishes it; meanwhile the collector's helpers mark concurrently.
    // A cycle under way when the window opened has no start here, and its stalls are not marked.
    const byTime = [...probe.gcs].sort((a, b) => a.at_ms - b.at_ms)
    const markingCycles = byTime.flatMap((g, i) => {
      if (g.kind !== 8) return []
      const mc = byTime.slice(i + 1).find((h) => h.kind === 4)
      return [{ start_ms: g.at_ms, end_ms: mc === undefined ? Infinity : mc.at_ms + mc.ms }]
    })
    const stalls = probe.stalls.map((st) => {
      const end = st.at_ms + st.interval_ms
      const pauses = probe.gcs.filter((g) => g.at_ms < end && g.at_ms + g.ms > st.at_ms)
      return {
        delay_ms: round(st.interval_ms - RESOLUTION_MS, 1),
        on_cpu_ms: round(st.on_cpu_ms, 1),
        waiting_for_cpu_ms: round(st.waiting_for_cpu_ms, 1),
        gc_pause_ms: round(pauses.reduce((a, g) => a + g.ms, 0), 1),
        gc_kinds: [...new Set(pauses.map((g) => g.kind))],
        in_a_marking_cycle: markingCycles.some((c) => c.start_ms < end && c.end_ms > st.at_ms),
        at_s: round((st.at_ms - windowStartMs) / 1000, 2)
      }
    })
    const majorGcs = probe.gcs.filter((g) => g.kind === 4)
    inspector.close()
    const result = {
      benchmark: "event-loop",
      ...provenance(`node --experimental-websocket --import tsx bench/serve/event-loop.ts --streams ${numStreams} --warmup ${warmupMs / 1000} --duration ${durationMs / 1000}${clientNice === 0 ? "" : ` --client-nice ${clientNice}`}`),
      num_streams: numStreams,
      num_streams_live_at_window_start: liveAtWindowStart,
      ramp: {
        all_streams_live_at_s: live.allLiveAtS === undefined ? null : round(live.allLiveAtS, 1),
        event_loop_delay_ms: ramp === undefined ? null : {
          p99: delayOf(ramp.p99),
          max: delayOf(ramp.max)
        }
      },
      event_loop_delay_ms: {
        p50: delayOf(window.p50),
        p99: delayOf(window.p99),
        max: delayOf(window.max)
      },
      // From the stall probe: the per-second histogram's reset can land inside a stall (the
      // inspector runs it mid-task), and that second then misses it.
      seconds_with_stall_over_50_ms: new Set(stalls.flatMap((st) => {
        const first = Math.floor(st.at_s)
        const last = Math.floor(st.at_s + (st.delay_ms + RESOLUTION_MS) / 1000)
        return Array.from({ length: last - first + 1 }, (_, i) => first + i)
      })).size,
      seconds_sampled: perSecondMaxMs.length,
      per_second_max_ms: perSecondMaxMs,
      stalls_over_50_ms: {
        count: stalls.length,
        with_over_50_ms_on_cpu: stalls.filter((st) => st.on_cpu_ms > STALL_MS).length,
        waiting_for_cpu_ms_total: round(stalls.reduce((a, st) => a + st.waiting_for_cpu_ms, 0), 1),
        overlapping_a_mark_compact_pause: stalls.filter((st) => st.gc_kinds.includes(4)).length,
        in_a_marking_cycle: stalls.filter((st) => st.in_a_marking_cycle).length,
        each: stalls
      },
      gc: {
        num_scavenges: probe.gcs.filter((g) => g.kind === 1).length,
        scavenge_max_ms: round(Math.max(0, ...probe.gcs.filter((g) => g.kind === 1).map((g) => g.ms)), 1),
        num_mark_compacts: majorGcs.length,
        // Each cycle's wall time from the start of marking to the end of its mark-compact.
        marking_cycles_ms: markingCycles.filter((c) => c.end_ms !== Infinity).map((c) => round(c.end_ms - c.start_ms, 0)),
        mark_compact_max_ms: round(Math.max(0, ...majorGcs.map((g) => g.ms)), 1),
        pause_ms_total: round(probe.gcs.reduce((a, g) => a + g.ms, 0), 1)
      },
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
