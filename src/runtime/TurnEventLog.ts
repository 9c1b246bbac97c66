/**
 * The event log of each turn's stream, for resuming it on any gateway
 * (`GET /v1/conversations/{id}/stream` with `Last-Event-ID`).
 *
 * The DecodeSlot that produces a turn appends every event it sends (token text with its index,
 * then one `done` or `error`; its Conversation appends the start, and the end of a turn that
 * never started), so that the log holds the turn even when the gateway that served
 * its client is gone. A follower replays the events after an index, then follows the live
 * ones until the terminal event.
 *
 * - `layerRedis`: a Redis Stream per turn (`<prefix>turn:<turn_id>`), appended by one Lua script call
 *   per tick (every sink of an engine step writes in the same tick), trimmed to ~100,000
 *   entries, expiring an hour after the last append or 5 minutes after the terminal event.
 *   Appends while Redis is down are dropped (the live stream does not depend on them).
 * - `layerMemory`: the same in this process (the one-runner deployment).
 */
import { Context, Effect, Layer, Stream } from "effect"
import { Redis } from "ioredis"
import type { TurnId, UsageJson } from "./Domain.js"
import { TurnEventsUnavailable } from "./Errors.js"
import { failFastRedisOptions } from "./internal/redisOptions.js"

export type LoggedEvent =
  /**
   * Written as a Conversation sends a turn's Start (with several runners), when the slot
   * starts the generation, and again when a failover starts it on another slot (index -1,
   * never sent): a follower finds the turn before its first token, and a
   * Conversation entity that takes the turn over after a shard move finds its slot and what
   * started it (`request`: the DecodeSlot's start payload, decoded by the reader).
   */
  | { readonly index: -1; readonly kind: "start"; readonly slot_id: string; readonly request: unknown }
  /** `ids`: the tokens generated since the previous token event (what a failover re-prefills). */
  | { readonly index: number; readonly kind: "token"; readonly text: string; readonly ids: ReadonlyArray<number> }
  | {
    readonly index: number
    readonly kind: "done"
    readonly done: { readonly turn_id: string; readonly finish_reason: string; readonly usage: UsageJson }
  }
  | { readonly index: number; readonly kind: "error"; readonly code: string; readonly message: string }

/** Seconds a turn's log is kept after its terminal event. */
export const ENDED_TTL_S = 300
/** Seconds a turn's log is kept after its last append (a producer that vanished): at least 3/4 of it. */
const LIVE_TTL_S = 3600
/**
 * A live turn's TTL is renewed at most this often: an EXPIRE per appended event was half of
 * the commands a GPU runner sent (one XADD and one EXPIRE per stream per engine step).
 */
const LIVE_TTL_RENEW_MS = (LIVE_TTL_S * 1000) / 4
/**
 * Appends ARGV[i] to stream KEYS[i] (field `e`, trimmed to ~100,000 entries), then sets its
 * TTL to ARGV[n + i] seconds where that is not 0, for i = 1..n (n = #KEYS, a key may repeat).
 * Each command is a `pcall`: one that fails (a key of another type) loses its own event, not
 * the rest of the call. @returns the number of failed commands.
 */
const APPEND_SCRIPT = `local n = #KEYS
local failed = 0
for i = 1, n do
  local r = redis.pcall('XADD', KEYS[i], 'MAXLEN', '~', 100000, '*', 'e', ARGV[i])
  if type(r) == 'table' and r.err then failed = failed + 1 end
  local ttl = tonumber(ARGV[n + i])
  if ttl > 0 then
    r = redis.pcall('EXPIRE', KEYS[i], ttl)
    if type(r) == 'table' and r.err then failed = failed + 1 end
  end
end
return failed`
/** Events per script call: a call holds Redis for its length (~1 µs an event). */
const MAX_EVENTS_PER_CALL = 4096
/** A follower that sees nothing for this long ends with `stream_stalled`. */
const FOLLOW_IDLE_MS = 120_000

/** A follow: the log has no such turn; the follower saw its terminal event already; or the events to come. */
export type Followed =
  | { readonly _tag: "Missing" }
  | { readonly _tag: "Ended" }
  | { readonly _tag: "Events"; readonly events: Stream.Stream<LoggedEvent, TurnEventsUnavailable> }

export class TurnEventLog extends Context.Tag("chat/TurnEventLog")<TurnEventLog, {
  /** Appends an event of `turnId` (fire and forget). */
  readonly append: (turnId: TurnId, event: LoggedEvent) => void
  /**
   * The events of `turnId` with index > `afterIndex` (-1: all), then the live ones, ending
   * after the terminal event (whose index is the number of tokens; it comes too where that
   * index is below `afterIndex`, a position beyond the turn's end).
   */
  readonly follow: (turnId: TurnId, afterIndex: number) => Effect.Effect<Followed, TurnEventsUnavailable>
  /** Every event of `turnId` logged so far (none if unknown). */
  readonly read: (turnId: TurnId) => Effect.Effect<ReadonlyArray<LoggedEvent>, TurnEventsUnavailable>
}>() {}

const isTerminal = (e: LoggedEvent) => e.kind === "done" || e.kind === "error"

/**
 * Passes a follower's events on in order; an index past the next expected one means the log
 * missed events (appends are dropped while Redis is down): the follower then gets
 * `stream_incomplete` instead of a stream with a hole. @returns false once the stream ended.
 */
const inOrder = (afterIndex: number, emit: { single: (e: LoggedEvent) => unknown; end: () => unknown }) => {
  let expected = afterIndex + 1
  return (e: LoggedEvent): boolean => {
    if (e.index < expected) {
      // Seen already; but an end before the follower's position still ends its stream. At
      // that position exactly, the follower saw this end (its id is the end's): nothing more
      // is sent. Past it (a Last-Event-ID never sent), the stream ends with the end, so that
      // it does not close without a `done` or `error`.
      if (!isTerminal(e)) return true
      if (e.index < afterIndex) emit.single(e)
      emit.end()
      return false
    }
    if (e.index > expected) {
      emit.single({ index: expected, kind: "error", code: "stream_incomplete", message: `the turn's log lacks events from ${expected} on` })
      emit.end()
      return false
    }
    if (e.kind === "token") {
      expected++
      emit.single(e)
      return true
    }
    emit.single(e)
    emit.end()
    return false
  }
}

/**
 * An ended turn's token events, packed: one string and the end offset and index of each
 * event (a turn's events are kept for ENDED_TTL_S after it ends, ~2 objects per token
 * otherwise; at 2,048 streams that was hundreds of MB and long major GCs). Ids are dropped:
 * only a failover reads them, and it reads running turns.
 */
interface PackedTurn {
  readonly text: string
  readonly ends: Uint32Array
  readonly indices: Int32Array
  readonly terminal: LoggedEvent
}

const unpack = (packed: PackedTurn): Array<LoggedEvent> => {
  const events: Array<LoggedEvent> = []
  let start = 0
  for (let i = 0; i < packed.ends.length; i++) {
    events.push({ index: packed.indices[i]!, kind: "token", text: packed.text.slice(start, packed.ends[i]), ids: [] })
    start = packed.ends[i]!
  }
  events.push(packed.terminal)
  return events
}

/**
 * A running turn's events, kept without an object per token: a turn's token events are the
 * bulk of a one-process service's live heap at 2,048 streams (each event an object and an
 * array of ids, retained until the turn ends), and the major GC's marking time grows with the
 * number of live objects. Token events go into parallel arrays of strings and small integers;
 * the few others (`start`) are kept whole, with the number of token events before each, so the
 * log reads back in append order. The terminal event is not kept here: it packs the turn.
 */
class RunningEvents {
  private readonly texts: Array<string> = []
  private readonly indices: Array<number> = []
  /** Every token event's ids, in one array; `idEnds[i]` is the end of event i's. */
  private readonly ids: Array<number> = []
  private readonly idEnds: Array<number> = []
  private readonly others: Array<{ readonly before: number; readonly event: LoggedEvent }> = []

  push(e: LoggedEvent): void {
    if (e.kind !== "token") return void this.others.push({ before: this.texts.length, event: e })
    this.texts.push(e.text)
    this.indices.push(e.index)
    for (const id of e.ids) this.ids.push(id)
    this.idEnds.push(this.ids.length)
  }

  /** The events in append order. */
  events(): Array<LoggedEvent> {
    const out: Array<LoggedEvent> = []
    let other = 0
    for (let i = 0; i <= this.texts.length; i++) {
      while (other < this.others.length && this.others[other]!.before === i) out.push(this.others[other++]!.event)
      if (i === this.texts.length) break
      out.push({ index: this.indices[i]!, kind: "token", text: this.texts[i]!, ids: this.ids.slice(i === 0 ? 0 : this.idEnds[i - 1]!, this.idEnds[i]!) })
    }
    return out
  }

  /** The ended turn's packed form (`terminal` is its last event). */
  pack(terminal: LoggedEvent): PackedTurn {
    const ends = new Uint32Array(this.texts.length)
    let end = 0
    this.texts.forEach((text, i) => {
      end += text.length
      ends[i] = end
    })
    return { text: this.texts.join(""), ends, indices: Int32Array.from(this.indices), terminal }
  }
}

export const layerMemory = Layer.sync(TurnEventLog, () => {
  interface MemoryTurn {
    /** The events of a running turn; undefined once it ended and was packed. */
    running: RunningEvents | undefined
    packed: PackedTurn | undefined
    readonly listeners: Set<(e: LoggedEvent) => void>
    timer?: ReturnType<typeof setTimeout>
  }
  const turns = new Map<string, MemoryTurn>()
  const eventsOf = (turn: MemoryTurn): ReadonlyArray<LoggedEvent> =>
    turn.running?.events() ?? (turn.packed === undefined ? [] : unpack(turn.packed))
  return TurnEventLog.of({
    append: (turnId, event) => {
      let turn = turns.get(turnId)
      if (turn === undefined) turns.set(turnId, turn = { running: new RunningEvents(), packed: undefined, listeners: new Set() })
      if (turn.running === undefined) return // ended already
      if (!isTerminal(event)) turn.running.push(event)
      for (const listener of turn.listeners) listener(event)
      if (isTerminal(event)) {
        const t = turn
        t.packed = t.running!.pack(event)
        t.running = undefined
        t.timer = setTimeout(() => turns.get(turnId) === t && turns.delete(turnId), ENDED_TTL_S * 1000)
        t.timer.unref()
      }
    },
    read: (turnId) => Effect.sync(() => {
      const turn = turns.get(turnId)
      return turn === undefined ? [] : [...eventsOf(turn)]
    }),
    follow: (turnId, afterIndex) =>
      Effect.sync((): Followed => {
        const turn = turns.get(turnId)
        if (turn === undefined) return { _tag: "Missing" }
        const logged = eventsOf(turn)
        const last = logged.at(-1)
        if (last !== undefined && isTerminal(last) && last.index <= afterIndex) return { _tag: "Ended" }
        const events = Stream.asyncPush<LoggedEvent, TurnEventsUnavailable>((emit) =>
          Effect.acquireRelease(
            Effect.sync(() => {
              const next = inOrder(afterIndex, emit)
              let open = true
              const push = (e: LoggedEvent) => {
                if (open && e.kind !== "start") open = next(e)
              }
              // Read again: events may have come since `follow` (the stream runs later).
              const now = eventsOf(turn)
              for (const e of now) push(e)
              const end = now.at(-1)
              if (!open || (end !== undefined && isTerminal(end))) return undefined
              turn.listeners.add(push)
              return push
            }),
            (listener) => Effect.sync(() => listener !== undefined && turn.listeners.delete(listener))
          )
        )
        return { _tag: "Events", events }
      })
  })
})

/** How many of a turn's newest entries `follow` reads to find its end (starts come one per failover). */
const NEWEST_ENTRIES_READ = 8

const encode = (e: LoggedEvent): string => JSON.stringify(e)
const decode = (fields: ReadonlyArray<string>): LoggedEvent | undefined => {
  const i = fields.indexOf("e")
  if (i < 0) return undefined
  try {
    return JSON.parse(fields[i + 1]!) as LoggedEvent
  } catch {
    return undefined
  }
}

/** Redis at `url`; keys start with `prefix` (tests use one of their own). */
export const layerRedis = (url: string, prefix: string) =>
  Layer.scoped(
    TurnEventLog,
    Effect.gen(function*() {
      const options = { ...failFastRedisOptions(), lazyConnect: false } as const
      const redis = new Redis(url, options)
      // Connection errors are retried by ioredis itself; log them once per outage.
      let down = false
      redis.on("error", () => {
        if (!down) console.warn(`TurnEventLog: Redis at ${url} unreachable; stream logs are not kept meanwhile`)
        down = true
      })
      /** When each live turn's TTL was last set (ms); a turn's entry goes with its terminal event. */
      const ttlSetAt = new Map<string, number>()
      redis.on("ready", () => {
        down = false
        // Redis may have restarted empty: an XADD then makes a key without a TTL.
        ttlSetAt.clear()
      })
      // A turn whose terminal event is written elsewhere (its slot was abandoned, the turn
      // moved) leaves its entry: entries past their renewal are dropped (an append renews).
      const prune = setInterval(() => {
        const before = Date.now() - LIVE_TTL_RENEW_MS
        for (const [k, at] of ttlSetAt) if (at < before) ttlSetAt.delete(k)
      }, LIVE_TTL_RENEW_MS)
      prune.unref()
      yield* Effect.addFinalizer(() => Effect.sync(() => clearInterval(prune)))
      yield* Effect.addFinalizer(() => Effect.promise(() => redis.quit().catch(() => undefined)))
      const key = (turnId: string) => `${prefix}turn:${turnId}`

      // One script call per tick (not a pipeline of one XADD per event): a GPU runner appends
      // an event for every running turn after each engine step, and a Command object per
      // event was a sixth of its CPU time at 512 streams. EVAL, not EVALSHA: a retry after
      // NOSCRIPT could land behind the next tick's call, out of order.
      const appendEvents = (numKeys: number, args: Array<string | number>) =>
        redis.eval(APPEND_SCRIPT, numKeys, ...args) as Promise<number>
      let pending: Array<{ readonly key: string; readonly event: LoggedEvent }> = []
      const flush = () => {
        const batch = pending
        pending = []
        if (redis.status !== "ready") return
        const now = Date.now()
        // Keys whose terminal event is in this batch: a later event of theirs (a failover's
        // start) must not lift the ended turn's TTL back to an hour.
        const ended = new Set<string>()
        for (let from = 0; from < batch.length; from += MAX_EVENTS_PER_CALL) {
          const n = Math.min(MAX_EVENTS_PER_CALL, batch.length - from)
          // The script's arguments in place: n keys, then n events, then n TTLs.
          const args = new Array<string | number>(3 * n)
          for (let i = 0; i < n; i++) {
            const { event, key } = batch[from + i]!
            let ttl = 0
            if (isTerminal(event)) {
              ttl = ENDED_TTL_S
              ttlSetAt.delete(key)
              ended.add(key)
            } else if (!ended.has(key) && now - (ttlSetAt.get(key) ?? -Infinity) >= LIVE_TTL_RENEW_MS) {
              ttl = LIVE_TTL_S
              ttlSetAt.set(key, now)
            }
            args[i] = key
            args[n + i] = encode(event)
            args[2 * n + i] = ttl
          }
          // A failed call or command may have left keys without a TTL: every live turn renews
          // it next time.
          appendEvents(n, args).then((failed) => failed > 0 && ttlSetAt.clear(), () => ttlSetAt.clear())
        }
      }

      return TurnEventLog.of({
        append: (turnId, event) => {
          if (pending.length === 0) setImmediate(flush)
          pending.push({ key: key(turnId), event })
        },
        read: (turnId) =>
          Effect.tryPromise({
            try: () => redis.xrange(key(turnId), "-", "+"),
            catch: (e) => new TurnEventsUnavailable({ message: `Redis: ${String(e)}` })
          }).pipe(Effect.map((entries) => entries.flatMap(([, fields]) => decode(fields) ?? []))),
        follow: (turnId, afterIndex) =>
          Effect.gen(function*() {
            const k = key(turnId)
            const unavailable = (e: unknown) => new TurnEventsUnavailable({ message: `Redis: ${String(e)}` })
            // The newest entries say whether the turn is known, and whether it has ended: the
            // newest that is not a `start` (a failover's start may be logged after the end).
            const newest = yield* Effect.tryPromise({
              try: () => redis.xrevrange(k, "+", "-", "COUNT", NEWEST_ENTRIES_READ),
              catch: unavailable
            })
            if (newest.length === 0) return { _tag: "Missing" } as const
            const last = newest.map(([, fields]) => decode(fields)).find((e) => e !== undefined && e.kind !== "start")
            if (last !== undefined && isTerminal(last) && last.index <= afterIndex) return { _tag: "Ended" } as const
            const events = Stream.asyncPush<LoggedEvent, TurnEventsUnavailable>((emit) =>
              Effect.acquireRelease(
                Effect.sync(() => {
                  // XREAD BLOCK holds its connection: each follower has one of its own.
                  const reader = redis.duplicate({ ...options, enableOfflineQueue: true })
                  reader.on("error", () => undefined)
                  let open = true
                  const next = inOrder(afterIndex, emit)
                  void (async () => {
                    let lastId = "0"
                    let lastSeenMs = Date.now()
                    try {
                      while (open) {
                        const reply = await reader.xread("COUNT", 1000, "BLOCK", 5000, "STREAMS", k, lastId)
                        if (!open) return
                        const entries = reply?.[0]?.[1] ?? []
                        if (entries.length === 0 && Date.now() - lastSeenMs > FOLLOW_IDLE_MS) {
                          emit.single({ index: afterIndex + 1, kind: "error", code: "stream_stalled", message: "the turn's producer has sent nothing for 120 s" })
                          return emit.end()
                        }
                        for (const [id, fields] of entries) {
                          lastId = id
                          lastSeenMs = Date.now()
                          const e = decode(fields)
                          if (e === undefined || e.kind === "start") continue
                          if (!next(e)) return
                        }
                      }
                    } catch (e) {
                      if (open) emit.fail(unavailable(e))
                    }
                  })()
                  return () => {
                    open = false
                    reader.disconnect()
                  }
                }),
                (close) => Effect.sync(close)
              )
            )
            return { _tag: "Events", events } as const
          })
      })
    })
  )
