/**
 * The dashboard's arithmetic (web/src/ops/series.ts): histogram quantiles between two polls,
 * as Prometheus' histogram_quantile, and the per-pool series from successive status polls.
 */
import { describe, expect, it } from "vitest"
import { histogramQuantile, type OpsStatus, Series } from "../../web/src/ops/series.js"

const buckets = (entries: Array<[number, number]>) => new Map(entries)

describe("ops dashboard series", () => {
  it("interpolates a quantile within its bucket, over the observations between two polls", () => {
    // 10 observations: 4 in (0, 0.1], 6 in (0.1, 0.5].
    const now = buckets([[0.1, 4], [0.5, 10], [Infinity, 10]])
    expect(histogramQuantile(0.5, now, undefined)).toBeCloseTo(0.1 + 0.4 * (1 / 6))
    expect(histogramQuantile(0.2, now, undefined)).toBeCloseTo(0.05)
    // Only what came after `then` counts: 0 new in the first bucket, 6 in the second.
    expect(histogramQuantile(0.5, now, buckets([[0.1, 4], [0.5, 4], [Infinity, 4]]))).toBeCloseTo(0.1 + 0.4 * 0.5)
    // Past the last finite bound: that bound.
    expect(histogramQuantile(0.99, buckets([[0.1, 0], [0.5, 0], [Infinity, 3]]), undefined)).toBe(0.5)
    expect(histogramQuantile(0.5, now, now)).toBeUndefined()
  })

  it("sums each pool's GPUs over live runners and turns counters into rates", () => {
    const status = (atMs: number, generated: number, running: number): OpsStatus => ({
      now_ms: atMs,
      pools: { mini: ["gpu-0"], big: ["gpu-1", "gpu-2"] },
      runners: [
        { state: "up", updated_at_ms: atMs, status: { runner: "a", roles: [], region: "r", pid: 1, num_shards: 1, num_entities: 0, num_streams: 0, gpus: [
          { gpu_id: "gpu-0", engine_up: true, num_running: running, num_waiting: 1, num_used_blocks: 25, num_blocks: 100 },
          { gpu_id: "gpu-1", engine_up: true, num_running: 2, num_waiting: 0, num_used_blocks: 10, num_blocks: 100 }
        ] } },
        { state: "down", updated_at_ms: 0, status: { runner: "b", roles: [], region: "r", pid: 2, num_shards: 0, num_entities: 0, num_streams: 0, gpus: [
          { gpu_id: "gpu-2", engine_up: false, num_running: 9, num_waiting: 9, num_used_blocks: 99, num_blocks: 100 }
        ] } }
      ],
      metrics: [{ name: "generation_tokens_total", values: [{ labels: { model: "mini", tier: "free" }, value: generated }, { labels: { model: "mini", tier: "paid" }, value: generated }] }],
      recent_errors: []
    })
    const series = new Series()
    series.add(status(10_000, 0, 3))
    series.add(status(12_000, 50, 4))
    const mini = series.pools.get("mini")!
    expect(mini.running).toEqual([3, 4])
    expect(mini.waiting).toEqual([1, 1])
    expect(mini.kvPercent).toEqual([25, 25])
    expect(mini.tokPerS).toEqual([null, 50])
    // The runner that is down does not count.
    expect(series.pools.get("big")!.running).toEqual([2, 2])
    expect(series.pools.get("big")!.kvPercent).toEqual([10, 10])
  })
})
