/**
 * Time limits on calls to entities on other runners.
 */
import { Cause, Duration, Effect, Exit, Fiber, FiberRef, Option } from "effect"
import { performance } from "node:perf_hooks"
import { EventLoopScheduler } from "../../runtime/EventLoopScheduler.js"

/** A wait of this runner's own fibers shorter than this (ms) does not extend a call's time. */
const MIN_LAG_MS = 10
/** A call's time is extended by this runner's own lag up to this many times its timeout. */
const MAX_LAG_GRACE = 4

/**
 * The longest (ms) a fiber task of this runner waited for its turn since `sinceMs`
 * (`performance.now()` time): 0 off the service's EventLoopScheduler.
 */
const localLagMsSince = (sinceMs: number): Effect.Effect<number> =>
  Effect.map(FiberRef.get(FiberRef.currentScheduler), (scheduler) =>
    scheduler instanceof EventLoopScheduler ? scheduler.maxTaskWaitMsSince(sinceMs) : 0)

/**
 * `call` given up after `timeout`, without waiting for it to stop. `Effect.timeout` interrupts
 * the call and waits for that to finish; the cluster's client then tries to tell the callee's
 * runner, and a runner that died answers nothing, so the caller would wait as long as the
 * cluster retries (a failover watch that waits there moves nothing). Here the call runs in a
 * fiber of its own and is interrupted in the background. Fails with `TimeoutException` as
 * `Effect.timeout` does.
 *
 * A caller that is itself slow does not blame the callee: when the timeout passes, the call
 * gets as much more time as this runner's fiber tasks waited for their turn meanwhile (its
 * answer may be here, waiting behind them), again until they waited less than 10 ms, and in
 * all at most 4 × `timeout` more. An overloaded gateway whose scheduler queue was seconds deep
 * otherwise took every GPU that it pinged for lost, and failed their turns. The idea is
 * Lifeguard's local health awareness (Dadgar, Phillips and Currey, "Lifeguard: Local Health
 * Awareness for More Accurate Failure Detection", DSN Workshops 2018): a member scales its
 * timeouts by evidence of its own slowness rather than suspecting others.
 */
export const timeoutDetached = <A, E, R>(
  call: Effect.Effect<A, E, R>,
  timeout: Duration.DurationInput
): Effect.Effect<A, E | Cause.TimeoutException, R> =>
  Effect.flatMap(Effect.forkDaemon(call), (fiber) => {
    const timeoutMs = Duration.toMillis(timeout)
    const awaitFor = (sinceMs: number, waitMs: number, graceLeftMs: number): Effect.Effect<A, E | Cause.TimeoutException> =>
      Fiber.join(fiber).pipe(
        Effect.timeoutOption(Duration.millis(waitMs)),
        Effect.flatMap(Option.match({
          onSome: Effect.succeed,
          onNone: () =>
            Effect.flatMap(localLagMsSince(sinceMs), (lagMs) => {
              const extraMs = Math.min(lagMs, graceLeftMs)
              return extraMs < MIN_LAG_MS
                ? Effect.fail(new Cause.TimeoutException())
                : awaitFor(performance.now(), extraMs, graceLeftMs - extraMs)
            })
        }))
      )
    return awaitFor(performance.now(), timeoutMs, MAX_LAG_GRACE * timeoutMs).pipe(
      Effect.onExit((exit) => Exit.isSuccess(exit) ? Effect.void : Fiber.interruptFork(fiber))
    )
  })
