/**
 * Entity calls made apart from the caller's fiber refs.
 */
import { Effect, Fiber, Runtime } from "effect"

/**
 * `effect` run in a new fiber of `runtime` (its context and fiber refs), which the caller joins:
 * interrupting the caller interrupts the call and waits for it to end, as for a call made
 * inline.
 *
 * Why: an entity that a call creates keeps the fiber refs of the fiber that created it for as
 * long as it lives (its RPC server's runtime, whose fibers run every later message), and a
 * fiber's refs hold, beside their values, the values of each fiber it was forked from.
 * `Effect.locally(FiberRef.currentContext, …)` replaces only the current fiber's value: called
 * from an HTTP handler through a timeout's fiber, the conversation still held the finished
 * request (its request, response and socket objects; 3,280 of them at 2,048 streams in a heap
 * snapshot of `bench/serve/event-loop.ts`).
 */
export const detachedIn = <R>(runtime: Runtime.Runtime<R>) =>
<A, E>(effect: Effect.Effect<A, E, R>): Effect.Effect<A, E> =>
  Effect.suspend(() => {
    const fiber = Runtime.runFork(runtime)(effect)
    return Effect.onInterrupt(Fiber.join(fiber), () => Fiber.interrupt(fiber))
  })
