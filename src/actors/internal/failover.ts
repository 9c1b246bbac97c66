/**
 * A running turn outlives its GPU runner: the Conversation's runner pings each GPU it has
 * turns on every 0.5 s, and after three pings without an answer (the runner is gone: its GPU's
 * shard group has no other owner) it starts those turns again on other GPUs of the pool. The new slot prefills the prompt plus the tokens the lost one generated (read back
 * from the turn's event log), continues the text and event indices where they ended, and keeps
 * the sampling seed, so that the tokens from there on are the ones the lost slot would have
 * produced (the engines sample by seed and position). The client sees a pause.
 *
 * When no GPU can take the turn, it fails: its stream ends with `generation_failed`.
 */
import { randomInt } from "node:crypto"
import { Cause, Duration, Effect, Exit, Option } from "effect"
import type { DataPlane } from "../../runtime/DataPlane.js"
import type { TurnId } from "../../runtime/Domain.js"
import type { TurnEventLog } from "../../runtime/TurnEventLog.js"
import type { Topology } from "../../runtime/Topology.js"
import { lookup } from "../../runtime/Topology.js"
import type { DecodeSlot, StartPayload } from "../DecodeSlot.js"
import type { GpuScheduler } from "../GpuScheduler.js"
import { shardGroupOf } from "../GpuScheduler.js"
import { timeoutDetached } from "./callTimeout.js"

/**
 * Probe period and timeout, and how many probes in a row may go unanswered before the turns
 * of a GPU move: a lost runner is noticed within ~3 × (0.5 + 1) s, or up to 3 × (0.5 + 3) s
 * while the watching runner's own fibers wait for their turn (LIVENESS_LAG_GRACE). The probe
 * is one `Ping` per GPU and period from each runner that watches turns there, whatever the
 * number of turns.
 */
export const PROBE_INTERVAL = Duration.millis(500)
const PROBE_TIMEOUT = Duration.seconds(1)
const MAX_MISSED_PROBES = 3
/**
 * The calls that judge whether a GPU runner is alive (pings, slot checks, a move's
 * `AcquireSlot` and `Start`) allow for this runner's own lag up to this many times their
 * timeout (`timeoutDetached`): an overloaded gateway otherwise took GPUs that answered for lost.
 */
const LIVENESS_LAG_GRACE = 2
/**
 * A slot that answers but no longer runs the turn (its runner restarted and lost it), checked
 * this often, moves the turn once that has lasted as long (a finished turn's FinishTurn
 * arrives well within it). One `RunningTurns` per GPU and period asks about every turn this
 * runner watches there (see `slotChecks`).
 */
const SLOT_CHECK_INTERVAL_MS = 5_000
/**
 * When no GPU of the pool answers, this runner is likely the stalled one: a turn waits this
 * long before it is given up anyway (then moved, or failed: it must not wait forever).
 */
const ALL_SILENT_GRACE_MS = 20_000

/** An answer, or none: a failure, a defect or an interruption (a shard move) alike. */
const answered = <A, E>(effect: Effect.Effect<A, E>): Effect.Effect<Option.Option<A>> =>
  Effect.map(Effect.exit(effect), (exit) => Exit.isSuccess(exit) ? Option.some(exit.value) : Option.none())

/** What the watch needs of the turn (the Conversation's ActiveTurn). */
export interface WatchedTurn {
  readonly turnId: TurnId
  slotId: string | undefined
  start: StartPayload | undefined
  /** Its slot reported its end, and the reply is being stored: nothing is left to move. */
  readonly reporting?: boolean | undefined
}

type Slots = Effect.Effect.Success<typeof DecodeSlot.client>
type Gpus = Effect.Effect.Success<typeof GpuScheduler.client>

export interface FailoverDeps {
  readonly slots: Slots
  readonly gpus: Gpus
  readonly eventLog: TurnEventLog["Type"]
  readonly dataPlane: DataPlane["Type"]
  readonly topology: Topology
  /** Consecutive unanswered pings of a GPU (see `gpuHealth`); -1 before its first answer or miss. */
  readonly missedPings: (gpuId: string) => number
  /** This runner's slot checks of the turns it watches (see `slotChecks`). */
  readonly slotChecks: SlotChecks
}

/** A slot check's answer: whether slot `slotId` ran the turn at `atMs` (undefined: no answer). */
export interface SlotCheck {
  readonly slotId: string
  readonly atMs: number
  readonly running: boolean | undefined
}

export interface SlotChecks {
  /** Checks `turn`'s slot from the next period on, until `remove`. */
  readonly add: (turn: WatchedTurn) => void
  readonly remove: (turn: WatchedTurn) => void
  /** The latest check of `turn`, if any. */
  readonly latest: (turn: WatchedTurn) => SlotCheck | undefined
}

/**
 * A loop of `step` every `period` while `busy()`, one at a time: `start` begins it (nothing
 * while it runs or nothing is to do); it ends once idle, and begins again at once for work
 * added as it was ending. @returns start
 */
const loopWhileBusy = (
  runFork: (effect: Effect.Effect<void>) => unknown,
  busy: () => boolean,
  period: Duration.DurationInput,
  step: Effect.Effect<void>
) => {
  let looping = false
  const loop: Effect.Effect<void> = Effect.gen(function*() {
    while (busy()) {
      yield* Effect.sleep(period)
      yield* step
    }
  }).pipe(Effect.ensuring(Effect.sync(() => {
    looping = false
    start()
  })))
  const start = () => {
    if (looping || !busy()) return
    looping = true
    runFork(loop)
  }
  return start
}

/**
 * This runner's slot checks: every SLOT_CHECK_INTERVAL_MS, while any turn is watched, one
 * `RunningTurns` per GPU (timeout PROBE_TIMEOUT) asks whether each watched turn's slot there
 * still runs it. A per-turn call cost ~100 RPCs a second at 512 streams, each paid by both
 * runners' event loops.
 */
export const slotChecks = (gpus: Gpus, runFork: (effect: Effect.Effect<void>) => unknown): SlotChecks => {
  const watched = new Map<WatchedTurn, SlotCheck | undefined>()
  const checkGpu = (gpuId: string, turns: ReadonlyArray<readonly [WatchedTurn, string]>) =>
    Effect.gen(function*() {
      const answer = yield* timeoutDetached(
        gpus(gpuId).RunningTurns({ turns: turns.map(([turn, slotId]) => ({ slot_id: slotId, turn_id: turn.turnId })) }),
        PROBE_TIMEOUT,
        LIVENESS_LAG_GRACE
      ).pipe(answered)
      const atMs = Date.now()
      turns.forEach(([turn, slotId], i) => {
        // A turn no longer watched, or moved meanwhile: the answer is not about it.
        if (!watched.has(turn) || turn.slotId !== slotId) return
        watched.set(turn, { slotId, atMs, running: Option.isSome(answer) ? answer.value[i] : undefined })
      })
    })
  const checkAll = Effect.suspend(() => {
    const byGpu = new Map<string, Array<readonly [WatchedTurn, string]>>()
    for (const turn of watched.keys()) {
      if (turn.slotId === undefined || turn.reporting === true) continue
      const gpuId = shardGroupOf(turn.slotId)
      let turns = byGpu.get(gpuId)
      if (turns === undefined) byGpu.set(gpuId, turns = [])
      turns.push([turn, turn.slotId])
    }
    return Effect.forEach(byGpu, ([gpuId, turns]) => checkGpu(gpuId, turns), { concurrency: "unbounded", discard: true })
  })
  const startLoop = loopWhileBusy(runFork, () => watched.size > 0, Duration.millis(SLOT_CHECK_INTERVAL_MS), checkAll)
  return {
    add: (turn) => {
      watched.set(turn, undefined)
      startLoop()
    },
    remove: (turn) => void watched.delete(turn),
    latest: (turn) => watched.get(turn)
  }
}

/**
 * This runner's view of each GPU's liveness: a prober per GPU, started when the first turn
 * there is watched, pings it every PROBE_INTERVAL and counts consecutive misses.
 */
export const gpuHealth = (gpus: Gpus, runFork: (effect: Effect.Effect<void>) => unknown) => {
  const missed = new Map<string, number>()
  return (gpuId: string): number => {
    const n = missed.get(gpuId)
    if (n !== undefined) return n
    missed.set(gpuId, -1)
    runFork(Effect.forever(Effect.gen(function*() {
      const ping = yield* Effect.exit(timeoutDetached(gpus(gpuId).Ping(), PROBE_TIMEOUT, LIVENESS_LAG_GRACE))
      // Interrupted: the GPU's runner was moving its shards (it gave up its shard locks for a
      // moment) as it answered; that says nothing either way, and must not end the prober.
      if (Exit.isSuccess(ping)) missed.set(gpuId, 0)
      else if (!Cause.isInterruptedOnly(ping.cause)) missed.set(gpuId, Math.max(0, missed.get(gpuId) ?? 0) + 1)
      yield* Effect.sleep(PROBE_INTERVAL)
    })))
    return -1
  }
}

/**
 * Watches `turn` while `isActive()`; moves it to another GPU when its GPU stops answering, or
 * when its slot no longer runs it. Never fails. @returns "lost" when the turn could not be
 * moved (its client was told), "ended" when a move found that it had ended (its log has its
 * end: its FinishTurn is due), else "watched" (it is no longer active).
 */
export const watch = (deps: FailoverDeps, turn: WatchedTurn, isActive: () => boolean): Effect.Effect<"watched" | "ended" | "lost"> =>
  Effect.gen(function*() {
    deps.slotChecks.add(turn)
    let lastCheckAtMs = 0
    let notRunningSinceMs: number | undefined
    const gpuLost = lossRule(deps)
    while (isActive()) {
      yield* Effect.sleep(PROBE_INTERVAL)
      if (!isActive() || turn.slotId === undefined) return "watched" as const
      if (turn.reporting === true) continue
      let lost = gpuLost(shardGroupOf(turn.slotId), turn.start?.pool ?? "")
      const check = deps.slotChecks.latest(turn)
      if (!lost && check !== undefined && check.slotId === turn.slotId && check.atMs > lastCheckAtMs) {
        lastCheckAtMs = check.atMs
        // No answer (or one cut by a shard move) says nothing; only "not running" counts.
        if (check.running === false) {
          notRunningSinceMs ??= check.atMs
          lost = check.atMs - notRunningSinceMs >= SLOT_CHECK_INTERVAL_MS && isActive()
        } else notRunningSinceMs = undefined
      }
      if (!lost) continue
      notRunningSinceMs = undefined
      gpuLost.reset()
      const moved = yield* move(deps, turn, isActive)
      if (moved !== "moved") return moved
    }
    return "watched" as const
  }).pipe(
    Effect.catchAllCause((cause) => Effect.as(Effect.logError(`failover watch of ${turn.turnId} stopped`, cause), "watched" as const)),
    Effect.ensuring(Effect.sync(() => deps.slotChecks.remove(turn)))
  )

/**
 * Waits until GPU `gpuId` of `pool` is given up by the rule of `watch` (never, while it
 * answers its pings). A Conversation races its Start on that GPU against this: a GPU runner
 * that dies between admitting a turn and answering its Start would otherwise keep the turn
 * waiting for ever (the cluster holds a message to a pinned shard until its runner is back).
 */
export const untilLost = (deps: FailoverDeps, gpuId: string, pool: string): Effect.Effect<void> =>
  Effect.suspend(() => {
    const gpuLost = lossRule(deps)
    const poll: Effect.Effect<void> = Effect.flatMap(Effect.sleep(PROBE_INTERVAL), () => gpuLost(gpuId, pool) ? Effect.void : poll)
    return poll
  })

/**
 * Whether a GPU is to be given up, asked once per PROBE_INTERVAL: once it has missed
 * MAX_MISSED_PROBES pings in a row, it is given up at once while another GPU of its pool
 * answers (or the pool has no other), else after ALL_SILENT_GRACE_MS. When no GPU answers,
 * the likely cause is this runner (its event loop or its links stalled under load), not every
 * GPU at once, and a move would have nowhere to go anyway. A GPU not yet probed counts as not
 * answering. `reset` starts the silence over (after a move).
 */
const lossRule = (deps: FailoverDeps) => {
  /** Since when the GPU asked about has been silent. */
  let silentSinceMs: number | undefined
  const isLost = (gpuId: string, pool: string): boolean => {
    const silent = deps.missedPings(gpuId) >= MAX_MISSED_PROBES
    silentSinceMs = silent ? silentSinceMs ?? Date.now() : undefined
    if (!silent) return false
    const others = (lookup(deps.topology.pools, pool)?.gpus ?? []).filter((g) => g.id !== gpuId)
    const anotherAnswers = others.length === 0 || others.some((g) => deps.missedPings(g.id) === 0)
    return anotherAnswers || Date.now() - silentSinceMs! >= ALL_SILENT_GRACE_MS
  }
  return Object.assign(isLost, { reset: () => void (silentSinceMs = undefined) })
}

/** Tells `slotId` to stop its sequence of `turnId` without ending the turn, in the background. */
const abandonSlot = (deps: FailoverDeps, slotId: string, turnId: TurnId) =>
  Effect.forkDaemon(deps.slots(slotId).Abandon({ turn_id: turnId }).pipe(Effect.timeout(Duration.seconds(30)), Effect.ignore))

/** Starts `turn` on another GPU: "moved", "ended" (it had ended after all), or "lost". */
const move = (deps: FailoverDeps, turn: WatchedTurn, isActive: () => boolean) =>
  Effect.gen(function*() {
    const start = turn.start!
    const lostSlot = turn.slotId!
    const lostGpu = shardGroupOf(lostSlot)
    // Were the runner only slow to answer (it gave up its shard locks for a few seconds), its
    // sequence must stop without ending the turn (a Cancel would: `cancelled`), which goes on
    // elsewhere.
    yield* abandonSlot(deps, lostSlot, turn.turnId)
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
      const reserved = yield* timeoutDetached(deps.gpus(gpuId).AcquireSlot({
        priority: start.priority,
        num_prompt_tokens: start.prompt_token_ids.length + tokenIds.length,
        ttft_target_ms: 3_600_000 // a moved turn is not refused for a TTFT target it already missed
      }), PROBE_TIMEOUT, LIVENESS_LAG_GRACE).pipe(answered)
      if (Option.isNone(reserved)) continue
      const { slot_id: slotId, reservation_id: reservationId } = reserved.value
      // The turn is the new slot's from here: a turn with a token or two left can end, and its
      // FinishTurn arrive, before the Start's answer (a report from a slot the turn is not on
      // is void, and this one would be lost).
      turn.slotId = slotId
      const started = yield* timeoutDetached(
        deps.slots(slotId).Start({ ...start, reservation_id: reservationId, resume: { num_events: numEvents, text, token_ids: tokenIds } }),
        Duration.seconds(5),
        LIVENESS_LAG_GRACE
      ).pipe(answered)
      // No answer: it may run all the same, and must not next to the one tried next. Ended
      // meanwhile (the old slot's FinishTurn came): the new one is not wanted either.
      if (Option.isNone(started)) {
        yield* abandonSlot(deps, slotId, turn.turnId)
        // Its report, should it have ended before the Abandon, is void (its client was not fed).
        turn.slotId = lostSlot
        continue
      }
      if (!isActive()) {
        yield* abandonSlot(deps, slotId, turn.turnId)
        return "ended" as const
      }
      yield* Effect.logWarning(`turn ${turn.turnId} moved from ${lostGpu} to ${gpuId} after ${tokenIds.length} tokens`)
      return "moved" as const
    }
    yield* Effect.logError(`turn ${turn.turnId} lost its GPU ${lostGpu} and no other GPU of pool ${start.pool} took it`)
    deps.dataPlane.sink(start.stream_id)?.fail("generation_failed", `the GPU runner of this turn was lost (${lostGpu})`)
    return "lost" as const
  })

/**
 * How long after its reply is stored a turn's GPU is watched for the stream's end (see
 * `streamEndGuard`): longer than a lagging runner takes to give a GPU up (3 × (0.5 + 3) s).
 */
const STREAM_END_GUARD_MS = 15_000

/**
 * This runner's guard of stream ends. A slot writes its turn's terminal event only once the
 * Conversation stored the reply; a GPU runner that dies in between would leave the client's
 * stream open for ever (no turn is active any more, so no watch moves it). For
 * STREAM_END_GUARD_MS after a reply is stored, its GPU is checked by the watch's rule; given
 * up, `onLost` ends the stream from the stored reply (a stream that ended meanwhile ignores
 * it). One loop per runner checks every guarded turn each PROBE_INTERVAL, and only while any
 * is guarded.
 */
export const streamEndGuard = (deps: FailoverDeps, runFork: (effect: Effect.Effect<void>) => unknown) => {
  interface Guard {
    readonly gpuId: string
    readonly pool: string
    readonly untilMs: number
    readonly onLost: () => void
  }
  const guards = new Set<Guard>()
  const rules = new Map<string, ReturnType<typeof lossRule>>()
  const checkAll = Effect.sync(() => {
    const nowMs = Date.now()
    const lost = new Map<string, boolean>()
    for (const guard of guards) {
      if (nowMs > guard.untilMs) {
        guards.delete(guard)
        continue
      }
      let isLost = lost.get(guard.gpuId)
      if (isLost === undefined) {
        let rule = rules.get(guard.gpuId)
        if (rule === undefined) rules.set(guard.gpuId, rule = lossRule(deps))
        lost.set(guard.gpuId, isLost = rule(guard.gpuId, guard.pool))
      }
      if (!isLost) continue
      guards.delete(guard)
      guard.onLost()
    }
  })
  const startLoop = loopWhileBusy(runFork, () => guards.size > 0, PROBE_INTERVAL, checkAll)
  return (gpuId: string, pool: string, onLost: () => void): void => {
    guards.add({ gpuId, pool, untilMs: Date.now() + STREAM_END_GUARD_MS, onLost })
    startLoop()
  }
}
