import { type Duration, Effect } from "effect"
import { randomInt } from "node:crypto"
import { timeoutDetached } from "./callTimeout.js"

/** How long (ms) a GPU that did not answer a call (admission, embedding) is asked last by this runner. */
const UNANSWERED_ASKED_LAST_MS = 30_000

/**
 * When each GPU that did not answer a call (its runner drained, stopped or died) may be
 * asked first again. A runner's own observation, not entity state: nothing a shard move must
 * carry (the next owner learns it again, at the cost of one ACQUIRE_TIMEOUT).
 */
const askedLastUntilMs = new Map<string, number>()

/** `gpuId` did not answer a call: for UNANSWERED_ASKED_LAST_MS it is asked after the others. */
export const markUnanswered = (gpuId: string): void => {
  askedLastUntilMs.set(gpuId, Date.now() + UNANSWERED_ASKED_LAST_MS)
}

/**
 * `call` to GPU `gpuId`'s entity, given up after `timeout` without waiting for it to stop
 * (`timeoutDetached`: to a GPU whose runner drained or died the cluster holds the call until
 * the runner is back); a GPU that did not answer in time is then asked last (`markUnanswered`).
 */
export const askGpu = <A, E, R>(gpuId: string, call: Effect.Effect<A, E, R>, timeout: Duration.DurationInput) =>
  timeoutDetached(call, timeout).pipe(Effect.tapErrorTag("TimeoutException", () => Effect.sync(() => markUnanswered(gpuId))))

/**
 * A pool's GPUs in the order admission asks them: `preferred` first (if in the pool), the rest
 * shuffled (Fisher–Yates); a GPU that lately did not answer (`markUnanswered`) after all others.
 */
export const gpuOrder = (gpuIds: ReadonlyArray<string>, preferred?: string | undefined): Array<string> => {
  const rest = gpuIds.filter((g) => g !== preferred)
  for (let i = rest.length - 1; i > 0; i--) {
    const j = randomInt(i + 1)
    ;[rest[i], rest[j]] = [rest[j]!, rest[i]!]
  }
  const order = preferred !== undefined && gpuIds.includes(preferred) ? [preferred, ...rest] : rest
  // One reading of the clock: every GPU lands in exactly one of the two parts.
  const nowMs = Date.now()
  const askedLast = (gpuId: string) => (askedLastUntilMs.get(gpuId) ?? 0) > nowMs
  return [...order.filter((g) => !askedLast(g)), ...order.filter(askedLast)]
}
