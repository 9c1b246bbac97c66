/**
 * The service's Effect scheduler: it bounds how long fiber work holds the Node event loop.
 *
 * Effect's default `MixedScheduler` resumes yielded fibers on the microtask queue up to 2,048
 * times in a row before it falls back to a timer, and it keeps one run queue per fiber. While
 * microtasks run, no socket or timer callback does; and once many fibers fall back to
 * `setImmediate` at the same moment (2,048 streams whose tokens one engine step delivered),
 * Node's check phase runs every one of them in one go. Either way one burst of fiber work (a
 * turn's prompt, an engine step's results, its storage writes) delays every request behind it,
 * `/healthz` included, and the event loop stalls for tens of milliseconds.
 *
 * This scheduler keeps one FIFO of fiber tasks for the whole process and reads the clock before
 * each task. Work scheduled by a socket or timer callback runs on microtasks for a slice of
 * `sliceMs` (the slice begins with the first task after the loop's check phase); the rest waits
 * for a `setImmediate`, which lets the I/O already waiting in (Node polls before its check
 * phase). There one drain runs tasks, those they schedule included, for up to `checkBudgetMs`;
 * what is left runs in the next loop iteration, first. So a check phase holds the loop for
 * about `checkBudgetMs` however many fibers wait, and a loop turn takes about that plus its own
 * I/O callbacks. A turn's first token takes many fiber hops (HTTP handler, Conversation,
 * GpuScheduler, DecodeSlot); one drain carries them on, where a drain limited to the tasks
 * waiting when it began sent each hop to the next loop turn (TTFT p50 at 256 streams 91 →
 * 177 ms in an A/B run).
 *
 * A task that has waited `maxWaitMs` runs in the current drain whatever its budget: under
 * overload the loop turns slower rather than starve fibers (a shard lease's refresh among them,
 * whose lapse would cost the runner its shards).
 *
 * Yielding within a fiber is unchanged (`shouldYield`: Effect's op-count rule); a fiber that
 * yields goes to the back of the queue. A task of a fiber running at a scheduling priority
 * above 0 (`Effect.withSchedulingPriority`, `URGENT_PRIORITY`) skips the queue: each drain runs
 * every such task first, whatever its budget. Only work that has a deadline and is small runs
 * so: a shard lock refresh (`Cluster.ts`), whose many fiber hops each waited up to `maxWaitMs`
 * behind thousands of stream tasks and together passed the lock's 1.33 s deadline, and the
 * runner then gave up all its shards.
 */
import type { Fiber } from "effect"
import { Scheduler } from "effect"
import { performance } from "node:perf_hooks"

/** Default slice: long enough that a busy loop pays little for its macrotasks. */
export const DEFAULT_SLICE_MS = 2
/** Default budget of a check-phase drain (ms): it leaves a loop turn room for its I/O under 50 ms. */
export const DEFAULT_CHECK_BUDGET_MS = 15
/** Default age (ms) past which a waiting task runs whatever the budget. */
export const DEFAULT_MAX_WAIT_MS = 100
/**
 * A scheduling priority whose tasks run before the queue, with no budget (see the class docs):
 * only for short work with a deadline. Effect's default scheduler runs higher priorities later,
 * so off this scheduler it means the opposite.
 */
export const URGENT_PRIORITY = 1

export class EventLoopScheduler implements Scheduler.Scheduler {
  /** Waiting tasks and when each was scheduled (ms); `head` is the next to run. */
  private tasks: Array<Scheduler.Task | undefined> = []
  private scheduledAtMs: Array<number> = []
  private head = 0
  /** Tasks of fibers at a priority above 0: run before `tasks`, whatever the budget. */
  private urgent: Array<Scheduler.Task> = []
  /** A drain is queued (microtask or immediate) or running: new tasks only join the queue. */
  private drainPending = false
  /** When the current slice started (ms, `performance.now()`), or undefined between slices. */
  private sliceStartMs: number | undefined = undefined

  /**
   * @param sliceMs how long (ms) fibers may run on microtasks before waiting I/O gets a turn; > 0.
   * @param checkBudgetMs how long (ms) one check-phase drain may run tasks (those they schedule
   *   included) before the rest waits for the next loop turn; > 0.
   * @param maxWaitMs a task that has waited this long (ms) runs in the current drain whatever
   *   its budget: under overload the loop turns slower rather than starve fibers (a shard lease
   *   refresh among them).
   */
  constructor(
    readonly sliceMs: number = DEFAULT_SLICE_MS,
    readonly checkBudgetMs: number = DEFAULT_CHECK_BUDGET_MS,
    readonly maxWaitMs: number = DEFAULT_MAX_WAIT_MS
  ) {}

  shouldYield(fiber: Fiber.RuntimeFiber<unknown, unknown>): number | false {
    return Scheduler.defaultShouldYield(fiber)
  }

  scheduleTask(task: Scheduler.Task, priority: number, _fiber?: Fiber.RuntimeFiber<unknown, unknown>): void {
    const now = performance.now()
    if (priority > 0) this.urgent.push(task)
    else {
      this.tasks.push(task)
      this.scheduledAtMs.push(now)
    }
    if (this.drainPending) return
    this.drainPending = true
    if (this.sliceStartMs === undefined) {
      this.sliceStartMs = now
      setImmediate(this.endSlice)
    }
    if (now - this.sliceStartMs < this.sliceMs) queueMicrotask(this.drainInSlice)
    else setImmediate(this.drainInCheckPhase)
  }

  private readonly endSlice = () => {
    this.sliceStartMs = undefined
  }

  private readonly drainInSlice = () => this.drain(this.sliceStartMs ?? performance.now(), this.sliceMs)

  private readonly drainInCheckPhase = () => this.drain(performance.now(), this.checkBudgetMs)

  /**
   * Runs tasks, those they schedule included, until the queue is empty or `budgetMs` from
   * `startMs` have passed; past that, only a task that has waited `maxWaitMs`. Urgent tasks
   * run first, each time round, whatever the budget.
   */
  private drain(startMs: number, budgetMs: number): void {
    let done = false
    try {
      for (;;) {
        // Checked per task at the cost of a length read; shift() is fine on a list this short.
        if (this.urgent.length > 0) {
          this.urgent.shift()!()
          continue
        }
        if (this.head >= this.tasks.length) break
        const now = performance.now()
        if (now - startMs >= budgetMs && now - this.scheduledAtMs[this.head]! < this.maxWaitMs) return
        const task = this.tasks[this.head]!
        this.tasks[this.head++] = undefined
        task()
      }
      done = true
    } finally {
      if (done) {
        this.tasks = []
        this.scheduledAtMs = []
        this.head = 0
        this.drainPending = false
      } else {
        // Spent (or a task threw): what is left runs in a later loop iteration's check phase.
        if (this.head > 1024 && this.head * 2 > this.tasks.length) {
          this.tasks = this.tasks.slice(this.head)
          this.scheduledAtMs = this.scheduledAtMs.slice(this.head)
          this.head = 0
        }
        setImmediate(this.drainInCheckPhase)
      }
    }
  }
}
