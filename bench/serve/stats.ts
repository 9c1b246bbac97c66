/** Percentiles and the per-load-point summary. */

export interface Summary {
  readonly n: number
  readonly mean: number
  readonly p50: number
  readonly p90: number
  readonly p99: number
  readonly max: number
}

/** Nearest-rank percentiles of `values` (sorted in place). */
export const summarize = (values: Float64Array | Array<number>): Summary => {
  const a = values instanceof Float64Array ? values : Float64Array.from(values)
  a.sort()
  const n = a.length
  if (n === 0) return { n: 0, mean: NaN, p50: NaN, p90: NaN, p99: NaN, max: NaN }
  let sum = 0
  for (let i = 0; i < n; i++) sum += a[i]!
  const at = (p: number) => a[Math.min(n - 1, Math.max(0, Math.ceil((p / 100) * n) - 1))]!
  return { n, mean: sum / n, p50: at(50), p90: at(90), p99: at(99), max: a[n - 1]! }
}

/**
 * Latencies in ms as `{ n, p50_ms, p99_ms, max_ms }` (nearest rank, index ⌊p·n⌋), for the
 * probe benchmarks (long messages, long conversations).
 */
export const latencySummary = (xs: ReadonlyArray<number>) => {
  const sorted = [...xs].sort((a, b) => a - b)
  const at = (p: number) => sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))] ?? Number.NaN
  return { n: xs.length, p50_ms: +at(50).toFixed(2), p99_ms: +at(99).toFixed(2), max_ms: +Math.max(...xs).toFixed(2) }
}

/** A growable Float64Array (millions of inter-token gaps without boxing). */
export class Samples {
  private data = new Float64Array(1024)
  private size = 0
  push(v: number): void {
    if (this.size === this.data.length) {
      const next = new Float64Array(this.data.length * 2)
      next.set(this.data)
      this.data = next
    }
    this.data[this.size++] = v
  }
  get length(): number {
    return this.size
  }
  values(): Float64Array {
    return this.data.slice(0, this.size)
  }
}

export const round = (x: number, digits = 1): number => {
  if (!Number.isFinite(x)) return x
  const f = 10 ** digits
  return Math.round(x * f) / f
}

/** One load point of a sweep: what a policy delivered at one concurrency. */
export interface CurvePoint {
  readonly concurrency: number
  readonly outputTokPerS: number
  readonly ttftP99Ms: number
}

/**
 * The most output tok/s a policy sustains with its TTFT p99 at or under `sloMs`, from a sweep
 * over concurrency (points in any order; sorted by concurrency here): the best measured point
 * under the SLO, or, where p99 crosses the SLO between two neighbouring loads, the throughput
 * interpolated linearly in p99 at the crossing. null when every point's p99 is over the SLO (the
 * policy meets it at no measured load). This is goodput under a latency SLO as DistServe
 * (Zhong et al., OSDI 2024) defines it, with TTFT p99 as the SLO.
 */
export const ttftSloCapacity = (points: ReadonlyArray<CurvePoint>, sloMs: number): number | null => {
  const sorted = [...points].sort((a, b) => a.concurrency - b.concurrency)
  let best: number | null = null
  const consider = (v: number) => {
    if (best === null || v > best) best = v
  }
  sorted.forEach((p, i) => {
    if (p.ttftP99Ms <= sloMs) consider(p.outputTokPerS)
    const q = sorted[i + 1]
    if (q !== undefined && (p.ttftP99Ms - sloMs) * (q.ttftP99Ms - sloMs) < 0) {
      const f = (sloMs - p.ttftP99Ms) / (q.ttftP99Ms - p.ttftP99Ms)
      consider(p.outputTokPerS + f * (q.outputTokPerS - p.outputTokPerS))
    }
  })
  return best
}
