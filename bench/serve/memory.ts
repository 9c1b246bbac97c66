/**
 * Memory per idle open SSE stream. The target runs with max-num-seqs = 1 and one "blocker"
 * turn generating a long reply, so every further turn waits in the scheduler's queue: its HTTP
 * request is in, its SSE response is open, no token flows. The target is started with
 * `--inspect=127.0.0.1:0`; before each reading we force a full GC through the inspector
 * (HeapProfiler.collectGarbage, twice) and read the V8 heap in use (Runtime.getHeapUsage) and
 * VmRSS (/proc/<pid>/status, median of 3 readings). Readings: after a warm-up with no idle
 * stream (level 0), then with N/4, N/2, 3N/4 (1 s after each level is open) and N idle streams
 * (6 s after: SETTLE_MS). Reported:
 *   per stream  = (RSS(N) − RSS(0)) / N              the headline figure
 *   marginal    = least-squares slope of RSS over the levels N/4 … N (one-time growth cancels)
 *   heap        = least-squares slope of the V8 heap in use over all levels
 * RSS counts everything the process keeps for a stream (user-space socket buffers, HTTP
 * parser, fibers, entity state, queues); kernel socket buffers are not in RSS.
 */
import { setMaxListeners } from "node:events"
import { performance } from "node:perf_hooks"
import { createConversation, streamTurn, type Target, type Turn } from "./client.js"
import type { Inspector } from "./inspector.js"
import type { Progress } from "./progress.js"
import { rssBytes } from "./proc.js"
import { contentOf } from "./workload.js"

export interface MemoryLevel {
  readonly streams: number
  readonly rssBytes: number
  /** V8 heap in use after a forced GC (NaN without the inspector). */
  readonly heapUsedBytes: number
}

export interface MemoryResult {
  readonly streams: number
  readonly levels: ReadonlyArray<MemoryLevel>
  readonly perStreamBytes: number
  readonly marginalPerStreamBytes: number
  readonly heapPerStreamBytes: number
  readonly forcedGc: boolean
  /** Idle streams that received a token (should be 0) or failed while measured. */
  readonly streamsWithTokens: number
  readonly streamsFailed: number
  readonly method: string
}

/**
 * Wait before the last reading: the state of a stream that has waited a few seconds, not of
 * one just opened. The cluster reaps entity instances idle for their `maxIdleTime` (1 s for
 * Conversation and DecodeSlot) on a 5 s period.
 */
const SETTLE_MS = 6_000

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

const slope = (xs: ReadonlyArray<number>, ys: ReadonlyArray<number>): number => {
  const n = xs.length
  const mx = xs.reduce((a, b) => a + b, 0) / n
  const my = ys.reduce((a, b) => a + b, 0) / n
  let num = 0
  let den = 0
  for (let i = 0; i < n; i++) {
    num += (xs[i]! - mx) * (ys[i]! - my)
    den += (xs[i]! - mx) ** 2
  }
  return den === 0 ? NaN : num / den
}

export const measureIdleMemory = async (
  target: Target,
  pid: number,
  n: number,
  progress: Progress,
  label: string,
  inspector: Inspector | undefined
): Promise<MemoryResult> => {
  const t0 = performance.now()
  const turns: Array<Turn> = []
  const status = (fraction: number) =>
    progress.update({
      label,
      fraction,
      elapsedS: (performance.now() - t0) / 1000,
      totalS: 0,
      done: turns.length,
      inFlight: turns.filter((t) => t.result.end === 0).length,
      tokPerS: 0,
      errors: turns.filter((t) => t.result.end !== 0 && !t.result.aborted).length
    })
  const reading = async (streams: number): Promise<MemoryLevel> => {
    let heapUsedBytes = NaN
    if (inspector !== undefined) {
      await inspector.call("HeapProfiler.collectGarbage")
      await inspector.call("HeapProfiler.collectGarbage")
      const usage = await inspector.call("Runtime.getHeapUsage")
      heapUsedBytes = typeof usage.usedSize === "number" ? usage.usedSize : NaN
    }
    const xs: Array<number> = []
    for (let i = 0; i < 3; i++) {
      await sleep(150)
      xs.push(rssBytes(pid))
    }
    xs.sort((a, b) => a - b)
    return { streams, rssBytes: xs[1]!, heapUsedBytes }
  }
  // MEMORY_HEAP_SNAPSHOT=PREFIX: a V8 heap snapshot at level 0 and at level N, written to
  // PREFIX-<level>.heapsnapshot (diff them with bench/serve/heap-diff.ts).
  const snapshotPrefix = process.env["MEMORY_HEAP_SNAPSHOT"]
  const snapshot = async (level: string) => {
    if (inspector === undefined || snapshotPrefix === undefined) return
    const chunks: Array<string> = []
    const off = inspector.on("HeapProfiler.addHeapSnapshotChunk", (params) => chunks.push(String(params.chunk)))
    await inspector.call("HeapProfiler.takeHeapSnapshot", { reportProgress: false })
    off()
    await import("node:fs").then((fs) => fs.writeFileSync(`${snapshotPrefix}-${level}.heapsnapshot`, chunks.join("")))
  }
  let blocker: Turn | undefined
  // The whole measurement is bounded: pending requests are cut after `timeoutMs`.
  const timeoutMs = 60_000 + n * 200
  const deadline = new AbortController()
  setMaxListeners(0, deadline.signal)
  const timer = setTimeout(() => deadline.abort(), timeoutMs)
  try {
    status(0)
    if (inspector !== undefined) await inspector.call("HeapProfiler.enable")
    // Warm-up: a few complete turns so lazily built state is in level 0.
    for (let i = 0; i < 3; i++) {
      const id = await createConversation(target)
      const r = await streamTurn(target, id, contentOf(16), 2).finished
      if (!r.ok) throw new Error(`memory warm-up turn failed: ${r.error?.message ?? "?"}`)
    }
    // The blocker takes the only running slot while the idle streams are measured (4000 tokens
    // at ~6.3 ms × the time scale the caller gave the target: 20 → ~8 min).
    const blockerConv = await createConversation(target)
    let first!: () => void
    const gotFirst = new Promise<void>((r) => (first = r))
    blocker = streamTurn(target, blockerConv, contentOf(8), 4000, () => first())
    await Promise.race([gotFirst, blocker.finished])
    if (blocker.result.end !== 0) throw new Error(`memory blocker turn ended early: ${blocker.result.error?.message ?? "?"}`)
    await sleep(500)
    const levels: Array<MemoryLevel> = [await reading(0)]
    await snapshot("0")
    // MEMORY_HEAP_PROFILE=FILE: sample allocations from here on; what is still alive at the end
    // is written as a V8 sampling heap profile (attributes the per-stream memory to code).
    const heapProfile = process.env["MEMORY_HEAP_PROFILE"]
    if (inspector !== undefined && heapProfile !== undefined) {
      await inspector.call("HeapProfiler.startSampling", { samplingInterval: 4096 })
    }
    const open = async (count: number) => {
      const batch = 64
      for (let i = 0; i < count; i += batch) {
        await Promise.all(
          Array.from({ length: Math.min(batch, count - i) }, async () => {
            const id = await createConversation(target, deadline.signal)
            turns.push(streamTurn(target, id, contentOf(16), 16))
          })
        )
        status(turns.length / n)
      }
    }
    for (const k of [1, 2, 3, 4]) {
      const level = Math.round((n * k) / 4)
      await open(level - turns.length)
      await sleep(k === 4 ? SETTLE_MS : 1000)
      levels.push(await reading(level))
    }
    await snapshot(String(n))
    if (inspector !== undefined && heapProfile !== undefined) {
      const { profile } = (await inspector.call("HeapProfiler.getSamplingProfile")) as { profile: unknown }
      await import("node:fs").then((fs) => fs.writeFileSync(heapProfile, JSON.stringify(profile)))
    }
    if (blocker.result.end !== 0) throw new Error("memory blocker turn ended before the measurement did; streams were not idle")
    const streamsWithTokens = turns.filter((t) => t.result.tokenTimes.length > 0).length
    const streamsFailed = turns.filter((t) => t.result.end !== 0 && !t.result.aborted).length
    const last = levels[levels.length - 1]!
    const upper = levels.slice(1)
    return {
      streams: n,
      levels,
      perStreamBytes: (last.rssBytes - levels[0]!.rssBytes) / n,
      marginalPerStreamBytes: slope(upper.map((l) => l.streams), upper.map((l) => l.rssBytes)),
      heapPerStreamBytes: slope(levels.map((l) => l.streams), levels.map((l) => l.heapUsedBytes)),
      forcedGc: inspector !== undefined,
      streamsWithTokens,
      streamsFailed,
      method:
        "max_num_seqs=1 and one long blocker turn, so N further turns wait in the scheduler queue with their SSE " +
        "responses open and no token flowing; " +
        (inspector !== undefined ? "a full GC forced through the inspector before each reading; " : "no forced GC (no WebSocket); ") +
        "VmRSS of the serving process (/proc/<pid>/status) at 0, N/4, N/2, 3N/4, N idle streams; " +
        "per stream = (RSS(N) - RSS(0)) / N; marginal = RSS slope over N/4..N; heap = slope of V8 heap used"
    }
  } catch (e) {
    throw deadline.signal.aborted ? new Error(`memory measurement did not finish in ${timeoutMs / 1000} s: ${String(e)}`) : e
  } finally {
    clearTimeout(timer)
    progress.finish()
    for (const t of turns) t.abort()
    blocker?.abort()
  }
}
