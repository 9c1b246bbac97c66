/**
 * EventLoopScheduler: fiber work that keeps yielding lets waiting I/O in once its slice is
 * spent (Effect's default scheduler resumes it on microtasks, 2,048 times before a timer).
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import { EventLoopScheduler } from "../../src/runtime/EventLoopScheduler.js"

const busyMs = (ms: number) => {
  const end = performance.now() + ms
  while (performance.now() < end) {
    // spin: the fiber's synchronous work between yields
  }
}

/** How many of `iterations` busy steps (1 ms each, a yield after each) ran before a setImmediate callback queued at the start. */
const stepsBeforeImmediate = (program: <A>(self: Effect.Effect<A>) => Effect.Effect<A>) =>
  new Promise<number>((resolve) => {
    let steps = 0
    let seen: number | undefined
    setImmediate(() => (seen = steps))
    Effect.runFork(
      program(
        Effect.forEach(Array.from({ length: 40 }), () => Effect.zipRight(Effect.sync(() => (busyMs(1), steps++)), Effect.yieldNow()), { discard: true })
      ).pipe(Effect.ensuring(Effect.promise(() => new Promise((r) => setImmediate(r)))), Effect.tap(() => resolve(seen ?? -1)))
    )
  })

describe("EventLoopScheduler", () => {
  it("lets a queued macrotask run once the slice is spent", async () => {
    const sliced = await stepsBeforeImmediate(Effect.withScheduler(new EventLoopScheduler(4)))
    expect(sliced).toBeGreaterThan(0)
    expect(sliced).toBeLessThan(40)
  })

  it("keeps resuming on microtasks within a slice (Effect's default scheduler for comparison holds the loop throughout)", async () => {
    expect(await stepsBeforeImmediate((self) => self)).toBe(40)
    expect(await stepsBeforeImmediate(Effect.withScheduler(new EventLoopScheduler(10_000)))).toBe(40)
  })
})
