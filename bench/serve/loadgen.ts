/**
 * The load generator: closed-loop users (a fixed number of concurrent streams, each user runs
 * multi-turn conversations back to back, think time 0) or open-loop Poisson arrivals of turns.
 * One call measures one load point against one target (our service or the baseline).
 *
 * Timeline of a point: [0, warmup) ramps up and is not measured; [warmup, warmup + duration)
 * is the window; at its end every stream still open is aborted (a disconnect, which the
 * service treats as a cancel) and the point is over. So every loop stops by itself.
 *
 * What counts (see bench/README.md, "Metrics"):
 * - TTFT: request sent → first `event: token`, for requests sent inside the window that got one.
 * - ITL: gaps between consecutive token events of requests sent inside the window. The service
 *   may put several tokens in one event when a reader lags (DecodeSlot coalescing), so ITL is
 *   per event; `tokensPerEvent` says how much that happened.
 * - TPOT: (last event − first event) / (completion_tokens − 1) of the window's requests that
 *   completed (completion_tokens from `done`'s usage).
 * - E2E: request sent → `event: done`, for the window's requests that completed.
 * - output tok/s: tokens received inside the window / window length, over all requests: each
 *   event of a completed request counts completion_tokens / events tokens; an event of a
 *   request cut at the end counts the point's mean tokens per event.
 * - req/s: requests that completed (done) inside the window / window length.
 * - errors: HTTP errors, `event: error`, streams that ended without `done`, network errors,
 *   over the whole point (our own aborts at the end are not errors).
 */
import { setMaxListeners } from "node:events"
import { monitorEventLoopDelay, performance } from "node:perf_hooks"
import { createConversation, retries, streamTurn, type ErrorKind, type Target, type Turn, type TurnResult } from "./client.js"
import type { Progress } from "./progress.js"
import { CpuMeter, rssBytes } from "./proc.js"
import { round, Samples, summarize, type Summary } from "./stats.js"
import { contentOf, rng, sampleGapMs, sampleLength, sampleTurns, type Workload } from "./workload.js"

export type LoadPoint =
  | { readonly kind: "closed"; readonly concurrency: number }
  | { readonly kind: "poisson"; readonly rate: number }

export const pointLabel = (p: LoadPoint): string => (p.kind === "closed" ? `c=${p.concurrency}` : `${p.rate} req/s`)

export interface PointOptions {
  readonly label: string
  readonly warmupMs: number
  readonly durationMs: number
  readonly workload: Workload
  /** Open loop: arrivals while this many turns are open are dropped (counted). */
  readonly maxInFlight: number
  readonly progress: Progress
  /** Processes whose CPU use is recorded during the window (name → pid). */
  readonly cpuPids: () => Record<string, number>
  /** The serving process: its peak VmRSS during the window is recorded. */
  readonly rssPid?: number
}

export interface PointResult {
  readonly point: LoadPoint
  readonly label: string
  readonly windowS: number
  readonly ttftMs: Summary
  readonly itlMs: Summary
  readonly tpotMs: Summary
  readonly e2eMs: Summary
  readonly outputTokPerS: number
  readonly reqPerS: number
  readonly requests: {
    readonly sent: number
    readonly completed: number
    readonly completedInWindow: number
    /** Sent inside the window, no first token when the window closed. */
    readonly waitingAtEnd: number
    readonly abortedAtEnd: number
    /** Open loop: arrivals dropped because maxInFlight turns were open. */
    readonly dropped: number
    /** Requests re-sent after ECONNRESET on a reused keep-alive socket (not errors). */
    readonly resentAfterReset: number
  }
  readonly errors: { readonly total: number; readonly byKind: Record<string, number>; readonly samples: Array<string> }
  readonly tokens: {
    readonly meanNewInput: number
    readonly meanPrompt: number
    readonly meanOutput: number
    /** completion_tokens / token events over completed turns (1 = no coalescing). */
    readonly tokensPerEvent: number
  }
  readonly conversations: { readonly created: number; readonly meanTurnsCompleted: number }
  /**
   * Turns after a conversation's first (started in the window): mean new prompt tokens (what
   * the previous turn's prompt + reply did not hold) and mean computed prompt tokens
   * (prompt − cached_tokens).
   */
  readonly laterTurns: {
    readonly count: number
    readonly meanNewTokens: number
    readonly meanComputedTokens: number
    /** The same over the later turns that hit the prefix cache (cached_tokens > 0). */
    readonly hits: { readonly count: number; readonly meanNewTokens: number; readonly meanComputedTokens: number }
  }
  /** Cores used by each process during the window. */
  readonly cpuCores: Record<string, number>
  /** Peak VmRSS of the serving process during the window (bytes), sampled every ~0.5 s. */
  readonly peakRssBytes: number
  /** Event-loop delay of the load generator itself (ms): if high, latencies are inflated by the client. */
  readonly clientLoopDelayMs: { readonly p50: number; readonly p99: number; readonly max: number }
}

interface Conversation {
  readonly id: string
  turnsLeft: number
  context: number
  turnsDone: number
  /** Words that open its first message (Workload.distinctConversations). */
  readonly opening: string
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms))

export const runPoint = async (target: Target, point: LoadPoint, options: PointOptions): Promise<PointResult> => {
  const w = options.workload
  const seed = w.seed + (point.kind === "closed" ? point.concurrency : Math.round(point.rate * 1000))
  const u = rng(seed)
  const t0 = performance.now()
  const retries0 = retries.count
  const windowStart = t0 + options.warmupMs
  const windowEnd = windowStart + options.durationMs
  const totalMs = options.warmupMs + options.durationMs

  const inFlight = new Set<Turn>()
  const results: Array<TurnResult> = []
  const newInput: Array<number> = []
  let tokensLastSecond = 0
  let rateAt = t0
  let tokPerS = 0
  let completed = 0
  let completedInWindow = 0
  let errors = 0
  let sent = 0
  let dropped = 0
  let created = 0
  const turnsPerConversation: Array<number> = []
  const laterTurns: Array<{ readonly newTokens: number; readonly computedTokens: number; readonly hit: boolean }> = []
  const errorKinds: Record<string, number> = {}
  const errorSamples: Array<string> = []
  const noteError = (kind: ErrorKind | "create", message: string) => {
    errors++
    errorKinds[kind] = (errorKinds[kind] ?? 0) + 1
    if (errorSamples.length < 5) errorSamples.push(`${kind}: ${message}`)
  }
  const onToken = (now: number) => {
    void now
    tokensLastSecond++
  }
  const stopped = () => performance.now() >= windowEnd
  // Conversation creations still pending when the window closes are aborted with this.
  const creations = new AbortController()
  setMaxListeners(0, creations.signal) // one abort listener per pending request

  const newConversation = async (): Promise<Conversation | undefined> => {
    try {
      const id = await createConversation(target, creations.signal)
      created++
      return {
        id,
        turnsLeft: w.turnsMean === w.turnsCap ? w.turnsCap : sampleTurns(u, w.turnsMean, w.turnsCap),
        context: 0,
        turnsDone: 0,
        opening: w.distinctConversations === true ? ` conversation ${created} ${Math.floor(u() * 1e9)}:` : ""
      }
    } catch (e) {
      if (!creations.signal.aborted) noteError("create", String(e))
      return undefined
    }
  }

  /** Runs one turn of `conv`; false if the conversation cannot go on. */
  const runTurn = async (conv: Conversation, input: number, output: number): Promise<boolean> => {
    const turn = streamTurn(target, conv.id, (conv.turnsDone === 0 ? conv.opening : "") + contentOf(input), output, onToken)
    sent++
    if (turn.result.start >= windowStart) newInput.push(input)
    inFlight.add(turn)
    const r = await turn.finished
    inFlight.delete(turn)
    results.push(r)
    conv.turnsLeft--
    if (r.ok) {
      completed++
      // A later turn's prompt is the previous prompt + reply + this turn's new tokens: with the
      // prefix cache it computes only about those.
      if (conv.turnsDone > 0 && r.start >= windowStart && r.promptTokens !== undefined && r.cachedTokens !== undefined) {
        laterTurns.push({ newTokens: r.promptTokens - conv.context, computedTokens: r.promptTokens - r.cachedTokens, hit: r.cachedTokens > 0 })
      }
      conv.turnsDone++
      if (r.end >= windowStart && r.end < windowEnd) completedInWindow++
      conv.context = (r.promptTokens ?? conv.context + input) + (r.completionTokens ?? output)
      return conv.turnsLeft > 0
    }
    if (!r.aborted && r.error !== undefined) noteError(r.error.kind, r.error.message)
    return false
  }

  /** Samples the next turn's lengths; undefined when the conversation would outgrow its context. */
  const nextTurn = (conv: Conversation): { input: number; output: number } | undefined => {
    const input = sampleLength(u, w.input)
    const output = sampleLength(u, w.output)
    // +32: chat-template tokens around the new message and the reply.
    if (conv.context > 0 && conv.context + input + output + 32 > w.maxContextTokens) return undefined
    return { input, output }
  }

  const endConversation = (conv: Conversation) => turnsPerConversation.push(conv.turnsDone)

  const closedUser = async () => {
    while (!stopped()) {
      const conv = await newConversation()
      if (conv === undefined) {
        if (!stopped()) await sleep(100)
        continue
      }
      while (!stopped()) {
        const next = nextTurn(conv)
        if (next === undefined) break
        if (!(await runTurn(conv, next.input, next.output))) break
      }
      endConversation(conv)
    }
  }

  const openLoop = async (rate: number) => {
    const idle: Array<Conversation> = []
    const running = new Set<Promise<void>>()
    const launch = async () => {
      let conv = idle.shift()
      let next = conv === undefined ? undefined : nextTurn(conv)
      if (conv !== undefined && next === undefined) endConversation(conv)
      if (next === undefined) {
        conv = await newConversation()
        if (conv === undefined) return
        next = nextTurn(conv)!
      }
      const goOn = await runTurn(conv!, next.input, next.output)
      if (goOn) idle.push(conv!)
      else endConversation(conv!)
    }
    let due = t0
    while (!stopped()) {
      const now = performance.now()
      while (due <= now && due < windowEnd) {
        due += sampleGapMs(u, rate)
        if (inFlight.size + running.size >= options.maxInFlight) {
          dropped++
          continue
        }
        const p: Promise<void> = launch().finally(() => running.delete(p))
        running.add(p)
      }
      await sleep(Math.max(0, Math.min(due - performance.now(), windowEnd - performance.now(), 50)))
    }
    for (const c of idle) endConversation(c)
    await Promise.all(running)
  }

  const loopDelay = monitorEventLoopDelay({ resolution: 5 })
  const cpu = new CpuMeter(options.cpuPids)
  let cpuCores: Record<string, number> = {}
  let windowOpen = false
  let windowClosed = false
  let peakRss = NaN
  let rssAt = 0
  const ticker = setInterval(() => {
    const now = performance.now()
    if (windowOpen && options.rssPid !== undefined && now - rssAt >= 500) {
      rssAt = now
      const rss = rssBytes(options.rssPid)
      if (!(rss <= peakRss)) peakRss = rss
    }
    if (now - rateAt >= 1000) {
      tokPerS = (tokensLastSecond * 1000) / (now - rateAt)
      tokensLastSecond = 0
      rateAt = now
    }
    if (!windowOpen && !windowClosed && now >= windowStart) {
      windowOpen = true
      cpu.start()
      loopDelay.enable()
    }
    if (now >= windowEnd) {
      if (windowOpen) {
        windowOpen = false
        windowClosed = true
        cpuCores = cpu.stop()
        loopDelay.disable()
      }
      // Abort what is still open: the service sees disconnects and cancels.
      creations.abort()
      for (const t of inFlight) t.abort()
    }
    options.progress.update({
      label: options.label,
      fraction: (now - t0) / totalMs,
      elapsedS: (now - t0) / 1000,
      totalS: totalMs / 1000,
      done: completed,
      inFlight: inFlight.size,
      tokPerS,
      errors
    })
  }, 100)

  try {
    if (point.kind === "closed") {
      // Users start spread over the first 10 % of the warm-up (at most 1 s) to avoid a thundering herd.
      const spread = Math.min(1000, options.warmupMs * 0.1)
      await Promise.all(
        Array.from({ length: point.concurrency }, (_, i) => sleep((spread * i) / point.concurrency).then(closedUser))
      )
    } else {
      await openLoop(point.rate)
    }
    // Streams finishing exactly at the end: make sure everything is closed.
    for (const t of inFlight) t.abort()
  } finally {
    clearInterval(ticker)
    if (windowOpen) {
      cpuCores = cpu.stop()
      loopDelay.disable()
    }
    options.progress.finish()
  }

  // Per-request metrics of the window's requests.
  const windowS = options.durationMs / 1000
  const ttft: Array<number> = []
  const e2e: Array<number> = []
  const tpot: Array<number> = []
  const itl = new Samples()
  let waitingAtEnd = 0
  let abortedAtEnd = 0
  let promptSum = 0
  let promptN = 0
  let outputSum = 0
  let eventSum = 0
  for (const r of results) {
    if (r.ok && r.completionTokens !== undefined) {
      outputSum += r.completionTokens
      eventSum += r.tokenTimes.length
    }
  }
  const tokensPerEvent = eventSum === 0 ? 1 : outputSum / eventSum
  let tokensInWindow = 0
  for (const r of results) {
    const times = r.tokenTimes
    let inWindow = 0
    for (const t of times) if (t >= windowStart && t < windowEnd) inWindow++
    const perEvent = r.ok && r.completionTokens !== undefined && times.length > 0 ? r.completionTokens / times.length : tokensPerEvent
    tokensInWindow += inWindow * perEvent
    if (r.aborted) abortedAtEnd++
    if (r.start < windowStart) continue
    if (times.length > 0) ttft.push(times[0]! - r.start)
    else if (r.aborted) waitingAtEnd++
    for (let i = 1; i < times.length; i++) itl.push(times[i]! - times[i - 1]!)
    if (r.ok) {
      e2e.push(r.end - r.start)
      const n = r.completionTokens ?? times.length
      if (times.length >= 1 && n >= 2) tpot.push((times[times.length - 1]! - times[0]!) / (n - 1))
      if (r.promptTokens !== undefined) {
        promptSum += r.promptTokens
        promptN++
      }
    }
  }
  let windowOutputSum = 0
  let windowOutputN = 0
  for (const r of results) {
    if (r.start >= windowStart && r.ok && r.completionTokens !== undefined) {
      windowOutputSum += r.completionTokens
      windowOutputN++
    }
  }
  const mean = (xs: Array<number>) => (xs.length === 0 ? NaN : xs.reduce((a, b) => a + b, 0) / xs.length)
  const ms = (ns: number) => round(ns / 1e6, 2)
  return {
    point,
    label: options.label,
    windowS,
    ttftMs: summarize(ttft),
    itlMs: summarize(itl.values()),
    tpotMs: summarize(tpot),
    e2eMs: summarize(e2e),
    outputTokPerS: tokensInWindow / windowS,
    reqPerS: completedInWindow / windowS,
    requests: { sent, completed, completedInWindow, waitingAtEnd, abortedAtEnd, dropped, resentAfterReset: retries.count - retries0 },
    errors: { total: errors, byKind: errorKinds, samples: errorSamples },
    tokens: {
      meanNewInput: round(mean(newInput), 1),
      meanPrompt: round(promptN === 0 ? NaN : promptSum / promptN, 1),
      meanOutput: round(windowOutputN === 0 ? NaN : windowOutputSum / windowOutputN, 1),
      tokensPerEvent: round(tokensPerEvent, 3)
    },
    conversations: { created, meanTurnsCompleted: round(mean(turnsPerConversation), 2) },
    laterTurns: {
      count: laterTurns.length,
      meanNewTokens: round(mean(laterTurns.map((t) => t.newTokens)), 1),
      meanComputedTokens: round(mean(laterTurns.map((t) => t.computedTokens)), 1),
      hits: (() => {
        const hits = laterTurns.filter((t) => t.hit)
        return {
          count: hits.length,
          meanNewTokens: round(mean(hits.map((t) => t.newTokens)), 1),
          meanComputedTokens: round(mean(hits.map((t) => t.computedTokens)), 1)
        }
      })()
    },
    peakRssBytes: peakRss,
    cpuCores: Object.fromEntries(Object.entries(cpuCores).map(([k, v]) => [k, round(v, 2)])),
    clientLoopDelayMs: { p50: ms(loopDelay.percentile(50)), p99: ms(loopDelay.percentile(99)), max: ms(loopDelay.max) }
  }
}
