import { describe, expect, it } from "vitest"
import { ttftSloCapacity } from "../../bench/serve/stats.js"

// A policy's sweep: throughput and TTFT p99 both grow with concurrency until it saturates.
const curve = [
  { concurrency: 64, outputTokPerS: 2000, ttftP99Ms: 100 },
  { concurrency: 32, outputTokPerS: 1000, ttftP99Ms: 80 },
  { concurrency: 128, outputTokPerS: 3000, ttftP99Ms: 300 },
  { concurrency: 256, outputTokPerS: 2900, ttftP99Ms: 900 }
]

describe("ttftSloCapacity", () => {
  it("is null when no load meets the SLO", () => {
    expect(ttftSloCapacity(curve, 79)).toBeNull()
  })
  it("takes a measured point exactly at the SLO", () => {
    expect(ttftSloCapacity(curve, 100)).toBe(2000)
  })
  it("interpolates where p99 crosses the SLO between neighbouring loads", () => {
    expect(ttftSloCapacity(curve, 90)).toBe(1500)
    expect(ttftSloCapacity(curve, 200)).toBe(2500)
  })
  it("keeps the best point under the SLO past saturation", () => {
    expect(ttftSloCapacity(curve, 600)).toBe(3000)
    expect(ttftSloCapacity(curve, 5000)).toBe(3000)
  })
})
