/**
 * A running turn outlives its GPU runner: the Conversation's runner probes the turn's
 * DecodeSlot every 0.5 s (`Alive`), and after three probes without an answer (the runner is
 * gone: its GPU's shard group has no other owner) it starts the turn again on another GPU of
 * the pool. The new slot prefills the prompt plus the tokens the lost one generated (read back
 * from the turn's event log), continues the text and event indices where they ended, and keeps
 * the sampling seed, so that the tokens from there on are the ones the lost slot would have
 * produced (the engines sample by seed and position). The client sees a pause.
 *
 * When no GPU can take the turn, it fails: its stream ends with `generation_failed`.
 */
import { randomInt } from "node:crypto"
import { Duration, Effect, Option } from "effect"
import type { DataPlane } from "../../runtime/DataPlane.js"
import type { TurnId } from "../../runtime/Domain.js"
import type { TurnEventLog } from "../../runtime/TurnEventLog.js"
import type { Topology } from "../../runtime/Topology.js"
import { lookup } from "../../runtime/Topology.js"
import type { DecodeSlot, StartPayload } from "../DecodeSlot.js"
import type { GpuScheduler } from "../GpuScheduler.js"
import { shardGroupOf } from "../GpuScheduler.js"

/**
 * Probe period and timeout, and how many probes in a row may go unanswered before the turn
 * moves: a lost runner is noticed within ~3 × (0.5 + 1) s. A probe is one small entity
 * message per running turn and period.
 */
export const PROBE_INTERVAL = Duration.millis(500)
const PROBE_TIMEOUT = Duration.seconds(1)
const MAX_MISSED_PROBES = 3

/** What the watch needs of the turn (the Conversation's ActiveTurn). */
export interface WatchedTurn {
  readonly turnId: TurnId
  slotId: string | undefined
  start: StartPayload | undefined
}

type Slots = Effect.Effect.Success<typeof DecodeSlot.client>
type Gpus = Effect.Effect.Success<typeof GpuScheduler.client>

/**
 * Watches `turn` while `isActive()`; moves it to another GPU when its slot stops answering.
 * Never fails. @returns "lost" when the turn could not be moved (its client was told), else
 * "watched" (it ended, or is no longer active).
 */
export const watch = (deps: {
  readonly slots: Slots
  readonly gpus: Gpus
  readonly eventLog: TurnEventLog["Type"]
  readonly dataPlane: DataPlane["Type"]
  readonly topology: Topology
}, turn: WatchedTurn, isActive: () => boolean): Effect.Effect<"watched" | "lost"> =>
  Effect.gen(function*() {
    let missed = 0
    while (isActive()) {
      yield* Effect.sleep(PROBE_INTERVAL)
      if (!isActive() || turn.slotId === undefined) return "watched" as const
      const alive = yield* deps.slots(turn.slotId).Alive({ turn_id: turn.turnId }).pipe(Effect.timeout(PROBE_TIMEOUT), Effect.option)
      if (Option.isSome(alive)) {
        // Not running it any more: it ended there, and its FinishTurn is on its way.
        if (!alive.value) return "watched" as const
        missed = 0
        continue
      }
      if (++missed < MAX_MISSED_PROBES) continue
      missed = 0
      const moved = yield* move(deps, turn)
      if (moved !== "moved") return moved === "ended" ? "watched" as const : "lost" as const
    }
    return "watched" as const
  }).pipe(Effect.catchAllCause((cause) => Effect.as(Effect.logError(`failover watch of ${turn.turnId} stopped`, cause), "watched" as const)))

/** Starts `turn` on another GPU: "moved", "ended" (it had ended after all), or "lost". */
const move = (deps: Parameters<typeof watch>[0], turn: WatchedTurn) =>
  Effect.gen(function*() {
    const start = turn.start!
    const lostSlot = turn.slotId!
    const lostGpu = shardGroupOf(lostSlot)
    // Were the runner only slow to answer, its sequence must stop: the turn goes on elsewhere.
    yield* Effect.forkDaemon(deps.slots(lostSlot).Cancel().pipe(Effect.timeout(Duration.seconds(30)), Effect.ignore))
    const events = yield* deps.eventLog.read(turn.turnId).pipe(Effect.orElseSucceed(() => []))
    if (events.some((e) => e.kind === "done" || e.kind === "error")) return "ended" as const
    let text = ""
    const tokenIds: Array<number> = []
    let numEvents = 0
    for (const e of events) {
      if (e.kind !== "token") continue
      text += e.text
      tokenIds.push(...e.ids)
      numEvents = e.index + 1
    }
    const candidates = (lookup(deps.topology.pools, start.pool)?.gpus ?? []).map((g) => g.id).filter((g) => g !== lostGpu)
    // Spread the moved turns over the pool's other GPUs.
    for (let n = candidates.length; n > 0; n--) {
      const gpuId = candidates.splice(randomInt(n), 1)[0]!
      const slotId = yield* deps.gpus(gpuId).AcquireSlot({
        priority: start.priority,
        num_prompt_tokens: start.prompt_token_ids.length + tokenIds.length,
        ttft_target_ms: 3_600_000 // a moved turn is not refused for a TTFT target it already missed
      }).pipe(Effect.timeout(PROBE_TIMEOUT), Effect.option)
      if (Option.isNone(slotId)) continue
      const started = yield* deps.slots(slotId.value).Start({ ...start, resume: { num_events: numEvents, text, token_ids: tokenIds } }).pipe(
        Effect.timeout(Duration.seconds(5)),
        Effect.option
      )
      if (Option.isNone(started)) continue
      yield* Effect.logWarning(`turn ${turn.turnId} moved from ${lostGpu} to ${gpuId} after ${tokenIds.length} tokens`)
      turn.slotId = slotId.value
      return "moved" as const
    }
    yield* Effect.logError(`turn ${turn.turnId} lost its GPU ${lostGpu} and no other GPU of pool ${start.pool} took it`)
    deps.dataPlane.sink(start.stream_id)?.fail("generation_failed", `the GPU runner of this turn was lost (${lostGpu})`)
    return "lost" as const
  })
