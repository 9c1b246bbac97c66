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
