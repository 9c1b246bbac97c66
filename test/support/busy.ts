/**
 * Synchronous and fiber load for scheduler tests: stand-ins for a sink's work, a collector
 * pause, a busy runner.
 */
import { Effect } from "effect"

/** Holds the thread for `ms` of wall time (a spin: nothing else runs meanwhile). */
export const busyMs = (ms: number): void => {
  const end = performance.now() + ms
  while (performance.now() < end) {
    // spin
  }
}

/** A fiber that yields again and again until `done()`: a task of it is always waiting. */
export const keepYielding = (done: () => boolean): Effect.Effect<void> =>
  Effect.whileLoop({ while: () => !done(), body: () => Effect.yieldNow(), step: () => {} })
