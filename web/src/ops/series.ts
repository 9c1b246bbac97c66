/**
 * The dashboard's numbers from successive `GET /v1/ops/status` polls: per model pool, the
 * GPUs' running and waiting sequences and KV usage (the runners' reports, as
 * `npm run cluster -- status` shows them), output tokens/s over the last 10 s and TTFT p50/p99
 * over the last 60 s (deltas of this gateway's counters and histogram between two polls;
 * quantiles interpolated within a bucket, as Prometheus' `histogram_quantile`).
 */

export interface MetricJson {
  readonly name: string
  readonly values: ReadonlyArray<{ readonly labels: Record<string, string | number>; readonly value: number; readonly metricName?: string }>
}

export interface GpuJson {
  readonly gpu_id: string
  readonly engine_up: boolean
  readonly num_running: number
  readonly num_waiting: number
  readonly num_used_blocks: number
  readonly num_blocks: number
}

export interface RunnerJson {
  readonly state: "up" | "draining" | "down"
  readonly updated_at_ms: number
  readonly status: {
    readonly runner: string
    readonly roles: ReadonlyArray<string>
    readonly region: string
    readonly pid: number
    readonly num_shards: number
    readonly num_entities: number
    readonly num_streams: number
    readonly gpus: ReadonlyArray<GpuJson>
  }
}

export interface OpsStatus {
  readonly now_ms: number
  readonly runners: ReadonlyArray<RunnerJson>
  readonly pools: Record<string, ReadonlyArray<string>>
  readonly metrics: ReadonlyArray<MetricJson>
  readonly recent_errors: ReadonlyArray<{ readonly at_ms: number; readonly model: string; readonly tier: string; readonly code: string; readonly message: string }>
}

/** One poll, reduced to what the charts need per pool. */
interface Reading {
  readonly atMs: number
  /** Per pool: generated tokens so far, and TTFT bucket counts by upper bound (seconds). */
  readonly generated: Map<string, number>
  readonly ttftBuckets: Map<string, Map<number, number>>
}

const read = (status: OpsStatus): Reading => {
  const generated = new Map<string, number>()
  const ttftBuckets = new Map<string, Map<number, number>>()
  for (const m of status.metrics) {
    if (m.name === "generation_tokens_total") {
      for (const v of m.values) {
        const pool = String(v.labels["model"])
        generated.set(pool, (generated.get(pool) ?? 0) + v.value)
      }
    } else if (m.name === "time_to_first_token_seconds") {
      for (const v of m.values) {
        if (v.metricName !== undefined && !v.metricName.endsWith("_bucket")) continue
        const pool = String(v.labels["model"])
        const le = v.labels["le"] === "+Inf" ? Infinity : Number(v.labels["le"])
        const buckets = ttftBuckets.get(pool) ?? new Map<number, number>()
        buckets.set(le, (buckets.get(le) ?? 0) + v.value)
        ttftBuckets.set(pool, buckets)
      }
    }
  }
  return { atMs: status.now_ms, generated, ttftBuckets }
}

/** The `q` quantile of the observations between two cumulative histograms, in seconds; undefined with none. */
export const histogramQuantile = (q: number, now: ReadonlyMap<number, number>, then: ReadonlyMap<number, number> | undefined): number | undefined => {
  const bounds = [...now.keys()].sort((a, b) => a - b)
  const counts = bounds.map((le) => (now.get(le) ?? 0) - (then?.get(le) ?? 0))
  const total = counts.at(-1) ?? 0
  // Counts that went back: the histogram was reset in between (no quantile from a mix).
  if (total <= 0 || counts.some((c) => c < 0)) return undefined
  const rank = q * total
  for (let i = 0; i < bounds.length; i++) {
    if (counts[i]! >= rank) {
      const upper = bounds[i]!
      const lower = i === 0 ? 0 : bounds[i - 1]!
      // Past the last finite bound: the largest finite bound, as Prometheus does.
      if (upper === Infinity) return lower
      const below = i === 0 ? 0 : counts[i - 1]!
      const inBucket = counts[i]! - below
      return inBucket <= 0 ? upper : lower + (upper - lower) * ((rank - below) / inBucket)
    }
  }
  return undefined
}

export interface PoolSeries {
  readonly time: Array<number>
  readonly running: Array<number>
  readonly waiting: Array<number>
  readonly kvPercent: Array<number>
  readonly tokPerS: Array<number | null>
  readonly ttftP50Ms: Array<number | null>
  readonly ttftP99Ms: Array<number | null>
}

const emptySeries = (): PoolSeries => ({ time: [], running: [], waiting: [], kvPercent: [], tokPerS: [], ttftP50Ms: [], ttftP99Ms: [] })

/** Keeps `keepMs` of readings and each pool's chart series. */
export class Series {
  private readonly readings: Array<Reading> = []
  readonly pools = new Map<string, PoolSeries>()

  constructor(private readonly keepMs = 10 * 60_000) {}

  add(status: OpsStatus): void {
    const reading = read(status)
    this.readings.push(reading)
    while (this.readings.length > 0 && this.readings[0]!.atMs < reading.atMs - this.keepMs) this.readings.shift()
    const before = (ms: number) => this.readings.find((r) => r.atMs >= reading.atMs - ms && r !== reading) ?? this.readings[0]
    const tokWindow = before(10_000)
    const ttftWindow = before(60_000)
    for (const [pool, gpus] of Object.entries(status.pools)) {
      const s = this.pools.get(pool) ?? emptySeries()
      this.pools.set(pool, s)
      let running = 0
      let waiting = 0
      let used = 0
      let blocks = 0
      for (const r of status.runners) {
        if (r.state === "down") continue
        for (const g of r.status.gpus) {
          if (!gpus.includes(g.gpu_id)) continue
          running += g.num_running
          waiting += g.num_waiting
          used += g.num_used_blocks
          blocks += g.num_blocks
        }
      }
      const dt = tokWindow === undefined || tokWindow === reading ? 0 : (reading.atMs - tokWindow.atMs) / 1000
      const tokens = (reading.generated.get(pool) ?? 0) - (tokWindow?.generated.get(pool) ?? 0)
      const buckets = reading.ttftBuckets.get(pool)
      const earlier = ttftWindow === reading ? undefined : ttftWindow?.ttftBuckets.get(pool)
      const p50 = buckets === undefined ? undefined : histogramQuantile(0.5, buckets, earlier)
      const p99 = buckets === undefined ? undefined : histogramQuantile(0.99, buckets, earlier)
      s.time.push(reading.atMs / 1000)
      s.running.push(running)
      s.waiting.push(waiting)
      s.kvPercent.push(blocks === 0 ? 0 : (100 * used) / blocks)
      // A counter that went back (the gateway restarted, or another one answered) is no rate.
      s.tokPerS.push(dt > 0 && tokens >= 0 ? tokens / dt : null)
      s.ttftP50Ms.push(p50 === undefined ? null : p50 * 1000)
      s.ttftP99Ms.push(p99 === undefined ? null : p99 * 1000)
      const cutoff = reading.atMs / 1000 - this.keepMs / 1000
      while (s.time.length > 0 && s.time[0]! < cutoff) {
        for (const k of Object.keys(s) as Array<keyof PoolSeries>) s[k].shift()
      }
    }
  }
}
