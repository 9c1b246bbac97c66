/**
 * Time limits on calls to entities on other runners.
 */
import { Cause, Duration, Effect, Exit, Fiber, FiberRef, Option } from "effect"
import { performance } from "node:perf_hooks"
import { EventLoopScheduler } from "../../runtime/EventLoopScheduler.js"

/** A wait of this runner's own fibers shorter than this (ms) does not extend a call's time. */
const MIN_LAG_MS = 10

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
 * `Effect.timeout` does, in an uninterruptible region too (where `Effect.timeout` waits for the
 * call, however long: a turn whose memory lookup embedded on a drained GPU's runner waited
 * for good).
 *
 * With `maxLagGrace` > 0, a caller that is itself slow does not blame the callee: when the
 * timeout passes, the call gets as much more time as this runner's fiber tasks waited for
 * their turn meanwhile (its answer may be here, waiting behind them), again until they waited
 * less than 10 ms, and in all at most `maxLagGrace` × `timeout` more. For the calls that judge
 * whether a runner is alive: an overloaded gateway whose scheduler queue was seconds deep took
 * every GPU it pinged for lost, and failed their turns. The idea is Lifeguard's local health
 * awareness (Dadgar, Phillips and Currey, "Lifeguard: Local Health Awareness for More Accurate
 * Failure Detection", DSN Workshops 2018): a member scales its timeouts by evidence of its own
 * slowness rather than suspecting others.
 */
export const timeoutDetached = <A, E, R>(
  call: Effect.Effect<A, E, R>,
  timeout: Duration.DurationInput,
  maxLagGrace = 0
): Effect.Effect<A, E | Cause.TimeoutException, R> =>
  Effect.flatMap(Effect.forkDaemon(call), (fiber) => {
    const timeoutMs = Duration.toMillis(timeout)
    const awaitFor = (sinceMs: number, waitMs: number, graceLeftMs: number): Effect.Effect<A, E | Cause.TimeoutException> =>
      Effect.interruptible(Fiber.join(fiber)).pipe(
        Effect.timeoutOption(Duration.millis(waitMs)),
        Effect.flatMap(Option.match({
          onSome: Effect.succeed,
          onNone: () =>
            Effect.flatMap(graceLeftMs > 0 ? localLagMsSince(sinceMs) : Effect.succeed(0), (lagMs) => {
              const extraMs = Math.min(lagMs, graceLeftMs)
              if (extraMs >= MIN_LAG_MS) return awaitFor(performance.now(), extraMs, graceLeftMs - extraMs)
              const extendedMs = maxLagGrace * timeoutMs - graceLeftMs
              return Effect.fail(
                new Cause.TimeoutException(
                  `Operation timed out after ${Math.round(timeoutMs)} ms` +
                    (extendedMs > 0 ? ` and ${Math.round(extendedMs)} ms more for this runner's own lag` : "")
                )
              )
            })
        }))
      )
    return awaitFor(performance.now(), timeoutMs, maxLagGrace * timeoutMs).pipe(
      Effect.onExit((exit) => Exit.isSuccess(exit) ? Effect.void : Fiber.interruptFork(fiber))
    )
  })

/** How long a best-effort call (`quietly`) is waited for. */
export const BEST_EFFORT_TIMEOUT = Duration.seconds(10)

/**
 * A best-effort call to another entity: whatever happens to it (a failure, a shard move that
 * cuts it off) is ignored, and it is given up after BEST_EFFORT_TIMEOUT (a call to a GPU runner
 * that died or drained is held by the cluster until it is back).
 */
export const quietly = <A, E, R>(call: Effect.Effect<A, E, R>): Effect.Effect<void, never, R> =>
  Effect.catchAllCause(Effect.asVoid(timeoutDetached(call, BEST_EFFORT_TIMEOUT)), () => Effect.void)
