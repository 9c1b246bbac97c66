/**
 * EventLoopScheduler: fiber work that keeps yielding lets waiting I/O in once its slice is
 * spent (Effect's default scheduler resumes it on microtasks, 2,048 times before a timer); a
 * check phase runs about its budget however many fibers wait; a task that waited too long runs
 * past the budget, up to a bound; how long tasks waited is on record.
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect } from "effect"
import { EventLoopScheduler, URGENT_PRIORITY } from "../../src/runtime/EventLoopScheduler.js"
import { busyMs, keepYielding } from "../support/busy.js"

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

/** `numFibers` fibers at once, each `numSteps` busy steps of 1 ms with a yield after each; `onStep` after each step. */
const busyFibers = (numFibers: number, numSteps: number, onStep: () => void = () => {}) =>
  Effect.forEach(
    Array.from({ length: numFibers }),
    () =>
      Effect.forEach(Array.from({ length: numSteps }), () => Effect.zipRight(Effect.sync(() => (busyMs(1), onStep())), Effect.yieldNow()), {
        discard: true
      }),
    { concurrency: "unbounded", discard: true }
  )

/**
 * Loop turns that each spend 20 ms outside fibers (a stand-in for heavy socket callbacks), from
 * now until `stop`; `turns()` counts them.
 */
const busyIoTurns = () => {
  let turns = 0
  let running = true
  const io = () => {
    turns++
    busyMs(20)
    if (running) setImmediate(io)
  }
  setImmediate(io)
  return { turns: () => turns, stop: () => void (running = false) }
}

/**
 * The most busy steps (1 ms each) that ran between two turns of the event loop while
 * `numFibers` fibers each run `numSteps` of them with a yield after each: a chain of
 * setImmediate callbacks marks the turns. Counted in steps, not milliseconds, so that a
 * preempted or collecting test process cannot fail it (a budget measured in time only ever runs
 * fewer steps when the process is slowed).
 */
const mostStepsInOneLoopTurn = (program: <A>(self: Effect.Effect<A>) => Effect.Effect<A>, numFibers: number, numSteps: number) =>
  new Promise<number>((resolve) => {
    let steps = 0
    let most = 0
    let running = true
    const probe = () => {
      most = Math.max(most, steps)
      steps = 0
      if (running) setImmediate(probe)
    }
    setImmediate(probe)
    Effect.runFork(
      program(busyFibers(numFibers, numSteps, () => steps++)).pipe(
        Effect.tap(() => {
          running = false
          resolve(Math.max(most, steps))
        })
      )
    )
  })

describe("EventLoopScheduler", () => {
  it("holds the loop for about its check-phase budget however many fibers wait (Effect's default runs them all in one check phase)", async () => {
    // 40 fibers × 3 steps of 1 ms: the default scheduler holds the loop throughout (microtasks),
    // and where its per-fiber run queues fall back to setImmediate, one check phase runs them all.
    // A slice of 2 ms and a check-phase budget of 6 ms let at most ~10 steps of 1 ms run per turn.
    expect(await mostStepsInOneLoopTurn((self) => self, 40, 3)).toBeGreaterThan(30)
    expect(await mostStepsInOneLoopTurn(Effect.withScheduler(new EventLoopScheduler(2, 6)), 40, 3)).toBeLessThan(15)
  })

  it("runs a task that has waited maxWaitMs past the budget, so busy I/O cannot starve fibers", async () => {
    // Each loop turn spends 20 ms outside fibers, and the budget lets fibers 1 ms a turn: without the rule 40 fibers × 3 steps of 1 ms need
    // ~120 turns; with it, what has waited 30 ms runs at once.
    const loopTurnsUntilDone = (scheduler: EventLoopScheduler) =>
      new Promise<number>((resolve) => {
        const io = busyIoTurns()
        Effect.runFork(
          busyFibers(40, 3).pipe(
            Effect.withScheduler(scheduler),
            Effect.tap(() => {
              io.stop()
              resolve(io.turns())
            })
          )
        )
      })
    expect(await loopTurnsUntilDone(new EventLoopScheduler(1, 1, 30))).toBeLessThan(30)
    expect(await loopTurnsUntilDone(new EventLoopScheduler(1, 1, 60_000))).toBeGreaterThan(60)
  })

  it("bounds a drain of overdue tasks at maxDrainMs (a heap-marking slowdown ages thousands at once)", async () => {
    // 100 fibers × 3 steps of 1 ms, overdue after 5 ms: nearly all of them are overdue at once.
    // A drain may run overdue tasks for 10 ms past its 2 ms budget: ~10 steps a turn. Without
    // that bound (maxDrainMs huge) one drain runs every overdue task: most of the 300 steps.
    expect(await mostStepsInOneLoopTurn(Effect.withScheduler(new EventLoopScheduler(1, 2, 5, 10)), 100, 3)).toBeLessThan(20)
    expect(await mostStepsInOneLoopTurn(Effect.withScheduler(new EventLoopScheduler(1, 2, 5, 60_000)), 100, 3)).toBeGreaterThan(100)
  })

  it("records how long tasks waited for their turn (a call's timeout reads it)", async () => {
    const scheduler = new EventLoopScheduler()
    const startMs = performance.now()
    let stop = false
    // A fiber that keeps yielding, so that a task is always waiting, and the loop held 80 ms.
    const spinner = Effect.runFork(keepYielding(() => stop).pipe(Effect.withScheduler(scheduler)))
    await new Promise((r) => setTimeout(r, 20))
    busyMs(80)
    await new Promise((r) => setTimeout(r, 20))
    const afterMs = performance.now()
    await new Promise((r) => setTimeout(r, 120))
    stop = true
    await Effect.runPromise(spinner.await)
    expect(scheduler.maxTaskWaitMsSince(startMs)).toBeGreaterThanOrEqual(80)
    // From the end of the hold on, none of it counts.
    expect(scheduler.maxTaskWaitMsSince(afterMs)).toBeLessThan(40)
  })

  it("runs an urgent fiber's tasks before the queue, whatever the budget (a shard lock refresh among 2,048 streams)", async () => {
    // 40 busy fibers fill the queue; loop turns spend 20 ms outside fibers and the budget lets
    // fibers 1 ms a turn. How many loop turns does a fiber of 10 short hops need?
    const loopTurnsUntilUrgentDone = (hop: Effect.Effect<void>, priority: number) =>
      new Promise<number>((resolve) => {
        const io = busyIoTurns()
        const hops = Effect.forEach(Array.from({ length: 10 }), () => hop, { discard: true }).pipe(
          Effect.withSchedulingPriority(priority),
          Effect.tap(() => resolve(io.turns()))
        )
        Effect.runFork(
          Effect.all([busyFibers(40, 3), Effect.zipRight(Effect.yieldNow(), hops)], { concurrency: "unbounded", discard: true }).pipe(
            Effect.withScheduler(new EventLoopScheduler(1, 1, 60_000)),
            Effect.ensuring(Effect.sync(io.stop))
          )
        )
      })
    // A yield, and an I/O callback's resumption (a SQL reply: each hop needs a loop turn).
    const io = Effect.async<void>((resume) => void setImmediate(() => resume(Effect.void)))
    expect(await loopTurnsUntilUrgentDone(Effect.yieldNow(), URGENT_PRIORITY)).toBeLessThan(5)
    expect(await loopTurnsUntilUrgentDone(Effect.yieldNow(), 0)).toBeGreaterThan(20)
    expect(await loopTurnsUntilUrgentDone(io, URGENT_PRIORITY)).toBeLessThan(25)
    expect(await loopTurnsUntilUrgentDone(io, 0)).toBeGreaterThan(50)
  })

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
