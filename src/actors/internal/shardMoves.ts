/**
 * Entity calls across shard moves. A call whose callee is stopped mid-call because the
 * cluster moved its shard (a runner joined, left, drained, or gave up its shard locks when
 * their refresh was late) ends interrupted although its caller was not. Sent again, it
 * reaches the shard's next owner once the shard is reassigned.
 */
import { Cause, Duration, Effect, Schedule } from "effect"

/** The pause between attempts. */
const RETRY_INTERVAL = Duration.millis(250)

/** Attempts after the first that cover a shard reassignment (~5 s, drill (c)'s bound). */
export const SHARD_MOVE_RETRIES = 20

class ShardMoved {
  readonly _tag = "ShardMoved"
}

/**
 * Runs `call` (given the attempt number, 0 first) and, while it ends interrupted only, again
 * every 250 ms, up to `retries` more times; then fails with `giveUp()`. The callee must take
 * a call sent twice (an idempotency key, or a reply it already has). The caller's own
 * interruption is not retried.
 */
export const retryShardMoves = <A, E, R, E2>(
  call: (attempt: number) => Effect.Effect<A, E, R>,
  giveUp: () => E2,
  retries: number = SHARD_MOVE_RETRIES
): Effect.Effect<A, E | E2, R> => {
  let attempt = 0
  return Effect.suspend(() => call(attempt++)).pipe(
    Effect.catchAllCause((cause): Effect.Effect<never, E | ShardMoved> =>
      Cause.isInterruptedOnly(cause) ? Effect.fail(new ShardMoved()) : Effect.failCause(cause)
    ),
    Effect.retry({ while: (e) => e instanceof ShardMoved, schedule: Schedule.spaced(RETRY_INTERVAL), times: retries }),
    Effect.catchIf((e): e is ShardMoved => e instanceof ShardMoved, () => Effect.fail(giveUp()))
  )
}
