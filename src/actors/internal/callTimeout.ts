/**
 * Time limits on calls to entities on other runners.
 */
import { type Cause, type Duration, Effect, Exit, Fiber } from "effect"

/**
 * `call` given up after `timeout`, without waiting for it to stop. `Effect.timeout` interrupts
 * the call and waits for that to finish; the cluster's client then tries to tell the callee's
 * runner, and a runner that died answers nothing, so the caller would wait as long as the
 * cluster retries (a failover watch that waits there moves nothing). Here the call runs in a
 * fiber of its own and is interrupted in the background. Fails with `TimeoutException` as
 * `Effect.timeout` does.
 */
export const timeoutDetached = <A, E, R>(
  call: Effect.Effect<A, E, R>,
  timeout: Duration.DurationInput
): Effect.Effect<A, E | Cause.TimeoutException, R> =>
  Effect.flatMap(Effect.forkDaemon(call), (fiber) =>
    Fiber.join(fiber).pipe(
      Effect.timeout(timeout),
      Effect.onExit((exit) => Exit.isSuccess(exit) ? Effect.void : Fiber.interruptFork(fiber))
    ))
