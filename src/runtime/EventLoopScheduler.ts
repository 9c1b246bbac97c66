/**
 * The service's Effect scheduler: it bounds how long fiber work holds the Node event loop.
 *
 * Effect's default `MixedScheduler` resumes yielded fibers on the microtask queue up to 2,048
 * times in a row before it falls back to a timer. While microtasks run, no socket or timer
 * callback does, so one burst of fiber work (a turn's prompt, an engine step's results, its
 * storage writes) delays every other request behind it, `/healthz` included. This scheduler
 * resumes fibers on microtasks until the current slice of the event loop has run `slice_ms`,
 * then on `setImmediate`, which lets the I/O already waiting in (Node's loop polls before its
 * check phase). A slice ends when the loop reaches its check phase; the first resumption after
 * that starts the next one.
 *
 * Yielding within a fiber is unchanged (`shouldYield`: Effect's op-count rule), so throughput
 * costs one `performance.now()` per resumption and a macrotask per `slice_ms` of busy loop.
 */
import type { Fiber } from "effect"
import { Scheduler } from "effect"
import { performance } from "node:perf_hooks"

/** Default slice: long enough that a busy loop pays little for its macrotasks. */
export const DEFAULT_SLICE_MS = 2

export class EventLoopScheduler implements Scheduler.Scheduler {
  /** When the current slice started (ms, `performance.now()`), or undefined between slices. */
  private sliceStartMs: number | undefined = undefined
  private readonly endSlice = () => {
    this.sliceStartMs = undefined
  }
  private readonly getRunner = Scheduler.SchedulerRunner.cached((depth, drain) => {
    const now = performance.now()
    if (this.sliceStartMs === undefined) {
      this.sliceStartMs = now
      setImmediate(this.endSlice)
    }
    if (now - this.sliceStartMs >= this.sliceMs) setImmediate(() => drain(0))
    else queueMicrotask(() => drain(depth + 1))
  })

  /** @param sliceMs how long (ms) fibers may run before waiting I/O gets a turn; > 0. */
  constructor(readonly sliceMs: number = DEFAULT_SLICE_MS) {}

  shouldYield(fiber: Fiber.RuntimeFiber<unknown, unknown>): number | false {
    return Scheduler.defaultShouldYield(fiber)
  }

  scheduleTask(task: Scheduler.Task, priority: number, fiber?: Fiber.RuntimeFiber<unknown, unknown>): void {
    this.getRunner(fiber).scheduleTask(task, priority)
  }
}
