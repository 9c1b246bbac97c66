/**
 * timeoutDetached with a lag grace (the failover's liveness calls): a call's timeout gives the
 * callee as much more time as the caller's own fiber tasks waited for their turn meanwhile
 * (its answer may be here, waiting behind them), within a bound; a caller that was not held
 * up, or a call without a grace, times out as before.
 */
import { describe, expect, it } from "@effect/vitest"
import { Duration, Effect, Exit } from "effect"
import { timeoutDetached } from "../../src/actors/internal/callTimeout.js"
import { EventLoopScheduler } from "../../src/runtime/EventLoopScheduler.js"
import { busyMs, keepYielding } from "../support/busy.js"

/**
 * A call answered after `answerMs`, given `timeoutMs`, on an EventLoopScheduler with a fiber
 * that keeps yielding (a busy runner: a task is always waiting); at 50 ms the loop is held
 * `holdMs`. @returns the call's exit and how long (ms) it took.
 */
const callUnderLoad = (answerMs: number, timeoutMs: number, holdMs: number, maxLagGrace = 4) =>
  new Promise<{ exit: Exit.Exit<string, unknown>; tookMs: number }>((resolve) => {
    let stop = false
    const startMs = performance.now()
    if (holdMs > 0) setTimeout(() => busyMs(holdMs), 50)
    const spinner = keepYielding(() => stop)
    const call = timeoutDetached(Effect.as(Effect.sleep(Duration.millis(answerMs)), "answer"), Duration.millis(timeoutMs), maxLagGrace).pipe(
      Effect.exit,
      Effect.tap((exit) => {
        stop = true
        resolve({ exit, tookMs: performance.now() - startMs })
      })
    )
    Effect.runFork(Effect.all([spinner, call], { concurrency: "unbounded", discard: true }).pipe(Effect.withScheduler(new EventLoopScheduler())))
  })

describe("timeoutDetached", () => {
  it("gives up on a call that never answers, in an uninterruptible region too (where Effect.timeout waits for it)", async () => {
    const startMs = performance.now()
    const exit = await Effect.runPromise(Effect.uninterruptible(Effect.exit(timeoutDetached(Effect.never, Duration.millis(100)))))
    expect(Exit.isFailure(exit) && exit.cause.toString()).toMatch(/TimeoutException/)
    expect(performance.now() - startMs).toBeLessThan(2000)
  })

  it("gives the callee as long again as its caller's loop was held (an answer held up behind the caller's own work)", async () => {
    // Timeout at 200 ms; the loop is held from 50 to 350 ms; the answer comes at 450 ms.
    const { exit } = await callUnderLoad(450, 200, 300)
    expect(Exit.isSuccess(exit) ? exit.value : exit.cause.toString()).toBe("answer")
  })

  it("gives no more time without a grace (a best-effort call)", async () => {
    const { exit, tookMs } = await callUnderLoad(450, 200, 300, 0)
    expect(Exit.isFailure(exit)).toBe(true)
    expect(tookMs).toBeLessThan(440)
  })

  it("times out as before when the caller was not held up", async () => {
    const { exit, tookMs } = await callUnderLoad(450, 200, 0)
    expect(Exit.isFailure(exit)).toBe(true)
    expect(tookMs).toBeLessThan(400)
  })

  it("extends a call by at most 4 times its timeout however long the caller was held", async () => {
    // Timeout 100 ms, the loop held 1.5 s from 50 ms: the timeout, due at 100 ms, is seen at
    // ~1.55 s, and the call may wait 400 ms more (1.5 s more without the bound); it never
    // answers in time.
    const { exit, tookMs } = await callUnderLoad(5_000, 100, 1_500)
    expect(Exit.isFailure(exit)).toBe(true)
    expect(tookMs).toBeGreaterThan(1_800)
    expect(tookMs).toBeLessThan(2_600)
  })
})
