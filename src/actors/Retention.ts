/**
 * Retention: conversations are kept `retention_days` after their last turn (their creator's
 * tier's, or org's, OrgPolicy; none: indefinitely), then deleted with everything of them.
 *
 * `sweep` finds the expired ones at the Clock's time (a test's TestClock) and deletes each
 * through `remove`; `layer` runs it hourly as a ClusterCron job (one run per cluster, on a
 * gateway runner), deleting through each conversation's entity (Conversation.Delete), which
 * also drops its cached state and shares. The same job creates the coming months' turn
 * partitions.
 */
import { ClusterCron } from "@effect/cluster"
import { Clock, Cron, Effect, Option } from "effect"
import type { ConversationId } from "../runtime/Domain.js"
import { ConversationStore } from "../runtime/Storage.js"
import { Conversation } from "./Conversation.js"

const DAY_MS = 86_400_000

/** Conversations listed and deleted at a time. */
const SWEEP_BATCH = 100

/**
 * Deletes every conversation past its retention at the Clock's now, through `remove` (given
 * the sweep's now; it may decline: false), a batch at a time. A conversation that cannot be
 * deleted now is logged and left to the next sweep. @returns how many were deleted.
 */
export const sweep = <E, R>(remove: (id: ConversationId, idleBeforeMs: number) => Effect.Effect<boolean, E, R>) =>
  Effect.gen(function*() {
    const store = yield* ConversationStore
    const nowMs = yield* Clock.currentTimeMillis
    let numDeleted = 0
    for (;;) {
      const expired = yield* store.listExpired(nowMs, SWEEP_BATCH)
      const results = yield* Effect.forEach(expired, (id) =>
        remove(id, nowMs).pipe(
          Effect.catchAllCause((cause) => Effect.as(Effect.logWarning(`retention: conversation ${id} could not be deleted`, cause), false))
        ), { concurrency: 8 })
      const n = results.filter(Boolean).length
      numDeleted += n
      // A batch that deleted nothing would come back the same: the next sweep tries again.
      if (expired.length < SWEEP_BATCH || n === 0) return numDeleted
    }
  })

/** The hourly sweep of the cluster (at minute 17). */
export const layer = ClusterCron.make({
  name: "RetentionSweep",
  cron: Cron.unsafeParse("17 * * * *"),
  execute: Effect.gen(function*() {
    const client = yield* Conversation.client
    const store = yield* ConversationStore
    // Next months' turn partitions exist before their first turn (else it goes to the default one).
    yield* store.preparePartitions(yield* Clock.currentTimeMillis)
    // Each conversation decides again: its user may have come back since it was listed.
    const n = yield* sweep((id, nowMs) =>
      Effect.flatMap(store.getConversation(id), (row) =>
        Option.match(row, {
          onNone: () => Effect.succeed(false),
          onSome: (c) => client(id).Delete({ if_idle_before_ms: nowMs - (c.retention_days ?? Infinity) * DAY_MS })
        })))
    if (n > 0) yield* Effect.logInfo(`retention: ${n} expired conversations deleted`)
  }).pipe(Effect.catchAllCause((cause) => Effect.logWarning("retention sweep failed", cause)))
})
