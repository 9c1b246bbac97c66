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
 * A task that has waited `maxWaitMs` may run in a check-phase drain past its budget, up to
 * `maxDrainMs`: under overload the loop turns slower rather than starve fibers behind busy I/O.
 * That is bounded: while the collector marks a large heap everything on the main thread runs
 * several times slower, many tasks pass `maxWaitMs` at once, and a drain that ran every one of
 * them held the loop for 100–350 ms (2,048 streams). Under sustained overload the queue then
 * grows, and every fiber waits longer: a call's timeout must not take that for a dead callee.
 * So the scheduler records how long tasks waited (`maxTaskWaitMsSince`), and the calls that
 * judge whether another runner is alive give it that much more time (`timeoutDetached`).
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
/** Default age (ms) past which a waiting task may run past the check-phase budget. */
export const DEFAULT_MAX_WAIT_MS = 100
/** Default bound (ms) of a check-phase drain that runs tasks past their budget. */
export const DEFAULT_MAX_DRAIN_MS = 25
/** Task waits are recorded per bucket of this many ms, for as many buckets (~6.4 s). */
const WAIT_BUCKET_MS = 10
const NUM_WAIT_BUCKETS = 640
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
   * Of the tasks that started in bucket `waitBucketIds[i]` (a ring): the longest wait (ms), and
   * when the last of them started.
   */
  private readonly waitBucketIds = new Float64Array(NUM_WAIT_BUCKETS).fill(-1)
  private readonly waitBucketMaxMs = new Float64Array(NUM_WAIT_BUCKETS)
  private readonly waitBucketLastMs = new Float64Array(NUM_WAIT_BUCKETS)

  /**
   * @param sliceMs how long (ms) fibers may run on microtasks before waiting I/O gets a turn; > 0.
   * @param checkBudgetMs how long (ms) one check-phase drain may run tasks (those they schedule
   *   included) before the rest waits for the next loop turn; > 0.
   * @param maxWaitMs a task that has waited this long (ms) may run in a check-phase drain past
   *   its budget: under overload the loop turns slower rather than starve fibers.
   * @param maxDrainMs how long (ms) a check-phase drain may run such tasks; ≥ checkBudgetMs.
   */
  constructor(
    readonly sliceMs: number = DEFAULT_SLICE_MS,
    readonly checkBudgetMs: number = DEFAULT_CHECK_BUDGET_MS,
    readonly maxWaitMs: number = DEFAULT_MAX_WAIT_MS,
    readonly maxDrainMs: number = Math.max(DEFAULT_MAX_DRAIN_MS, checkBudgetMs)
  ) {}

  /**
   * How long (ms) a task waited for its turn after `sinceMs` (`performance.now()` time, at
   * most ~6 s back), at most: the longest such wait, the one of the task now first in the queue
   * included. Waits are kept per 10 ms of start time, so a wait that began before `sinceMs`
   * may count for up to 10 ms more than its part after it. 0 when none waited.
   */
  maxTaskWaitMsSince(sinceMs: number): number {
    const now = performance.now()
    let most = this.head < this.tasks.length ? now - Math.max(sinceMs, this.scheduledAtMs[this.head]!) : 0
    const first = Math.max(Math.floor(sinceMs / WAIT_BUCKET_MS), Math.floor(now / WAIT_BUCKET_MS) - NUM_WAIT_BUCKETS + 1)
    for (let id = first; id <= Math.floor(now / WAIT_BUCKET_MS); id++) {
      const i = id % NUM_WAIT_BUCKETS
      if (this.waitBucketIds[i] !== id) continue
      // A wait ends when its task starts: what of it falls after sinceMs is at most that.
      most = Math.max(most, Math.min(this.waitBucketMaxMs[i]!, this.waitBucketLastMs[i]! - sinceMs))
    }
    return most
  }

  private recordWait(nowMs: number, waitMs: number): void {
    const id = Math.floor(nowMs / WAIT_BUCKET_MS)
    const i = id % NUM_WAIT_BUCKETS
    if (this.waitBucketIds[i] !== id) {
      this.waitBucketIds[i] = id
      this.waitBucketMaxMs[i] = waitMs
    } else if (waitMs > this.waitBucketMaxMs[i]!) this.waitBucketMaxMs[i] = waitMs
    this.waitBucketLastMs[i] = nowMs
  }

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

  private readonly drainInSlice = () => this.drain(this.sliceStartMs ?? performance.now(), this.sliceMs, this.sliceMs)

  private readonly drainInCheckPhase = () => this.drain(performance.now(), this.checkBudgetMs, this.maxDrainMs)

  /**
   * Runs tasks, those they schedule included, until the queue is empty or `budgetMs` from
   * `startMs` have passed; past that, only a task that has waited `maxWaitMs`, until `maxMs`.
   * Urgent tasks run first, each time round, whatever the budget.
   */
  private drain(startMs: number, budgetMs: number, maxMs: number): void {
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
        const elapsedMs = now - startMs
        const waitMs = now - this.scheduledAtMs[this.head]!
        if (elapsedMs >= budgetMs && (elapsedMs >= maxMs || waitMs < this.maxWaitMs)) return
        this.recordWait(now, waitMs)
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
