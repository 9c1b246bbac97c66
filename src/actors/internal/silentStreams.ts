/**
 * The gateway's last resort for a client stream whose end will never be written: its turn is
 * over (the reply is stored) but the producer that should have ended it is gone. The failover
 * paths cover the windows they know of (a watch moves a running turn, a guard ends a stream
 * from a reply stored just before its GPU runner died); this covers whatever they miss, such as
 * a SendTurn retried after a shard move whose first attempt never started (the takeover stores
 * it `failed`, and nothing was writing to the stream).
 *
 * A stream that has carried no text for `SILENCE_MS` is checked against its conversation
 * (`InFlight`); if its turn is no longer in flight, it is ended from the stored reply
 * (`endFromReply`). A stream still in flight (waiting in a GPU queue, paused by its reader, or
 * being moved) is left alone and checked again after twice as long.
 */
import { Duration, Effect, Option } from "effect"
import type { ConversationId, Turn, TurnId } from "../../runtime/Domain.js"
import { endFromReply, type TurnStream } from "../../runtime/TurnStream.js"
import { timeoutDetached } from "./callTimeout.js"

/** Silence (ms) before a stream's first check; each later check waits twice as long. */
export const SILENCE_MS = 15_000
/** How often open streams are looked at. */
export const SWEEP_PERIOD = Duration.seconds(5)
/** How long a stream whose reply is stored is given to end by itself before it is ended. */
const END_GRACE = Duration.seconds(2)
/** Checks run at once, and the time limit of each. */
const CHECK_CONCURRENCY = 8
const CHECK_TIMEOUT = Duration.seconds(8)

export interface SilentStreamsDeps {
  /** The open streams of this runner. */
  readonly streams: () => ReadonlyArray<TurnStream>
  /** The conversation's turn in flight (Conversation's `InFlight`), null when none. */
  readonly inFlight: (id: ConversationId) => Effect.Effect<TurnId | null, unknown>
  /** The stored turn `seq` of conversation `id`, if it is stored. */
  readonly storedTurn: (id: ConversationId, seq: number) => Effect.Effect<Option.Option<Turn>, unknown>
}

interface Mark {
  readonly numTextChars: number
  readonly sinceMs: number
  waitMs: number
}

/**
 * One look at the open streams at `nowMs`: the ones silent past their wait are checked, and
 * those whose turn is over are ended. Never fails (a check that fails is tried again later).
 */
export const makeSweep = (deps: SilentStreamsDeps) => {
  const marks = new WeakMap<TurnStream, Mark>()
  const check = (stream: TurnStream, turnId: string): Effect.Effect<void> => {
    const at = turnId.lastIndexOf(":")
    const id = turnId.slice(0, at) as ConversationId
    const seq = Number(turnId.slice(at + 1))
    return Effect.gen(function*() {
      if ((yield* deps.inFlight(id)) === turnId) return
      const reply = yield* deps.storedTurn(id, seq)
      // Not in flight and not stored: its reply is being written; the next check sees it.
      if (Option.isNone(reply) || reply.value.role !== "assistant" || stream.isClosed) return
      // A reply stored just now (a slow store): its slot writes the end within moments.
      const numTextChars = stream.numTextChars
      yield* Effect.sleep(END_GRACE)
      if (stream.isClosed || stream.numTextChars !== numTextChars) return
      const turn = reply.value
      yield* Effect.logInfo(`turn ${turnId}: its stream was silent for ${SILENCE_MS / 1000} s or more after its reply was stored (${turn.status}); ended from the reply`)
      endFromReply(stream, {
        turn_id: turn.turn_id,
        status: turn.status,
        text: turn.content,
        // The row keeps no finish reason: a cancelled reply says so, any other one ended.
        finish_reason: turn.status === "cancelled" ? "cancelled" : "stop",
        num_prompt_tokens: turn.num_prompt_tokens ?? 0,
        num_completion_tokens: turn.num_completion_tokens ?? 0
      })
    }).pipe((e) => timeoutDetached(e, CHECK_TIMEOUT), Effect.catchAllCause(() => Effect.void))
  }
  return (nowMs: number): Effect.Effect<void> =>
    Effect.suspend(() => {
      const due: Array<Effect.Effect<void>> = []
      for (const stream of deps.streams()) {
        const turnId = stream.turnId
        if (stream.isClosed || turnId === undefined) continue
        const mark = marks.get(stream)
        if (mark === undefined || mark.numTextChars !== stream.numTextChars) {
          marks.set(stream, { numTextChars: stream.numTextChars, sinceMs: nowMs, waitMs: SILENCE_MS })
          continue
        }
        if (nowMs - mark.sinceMs < mark.waitMs) continue
        mark.waitMs *= 2
        due.push(check(stream, turnId))
      }
      return Effect.all(due, { concurrency: CHECK_CONCURRENCY, discard: true })
    })
}

/** Sweeps every SWEEP_PERIOD, for ever (fork it in the gateway's scope). */
export const sweepForever = (deps: SilentStreamsDeps): Effect.Effect<never> => {
  const sweep = makeSweep(deps)
  return Effect.forever(Effect.zipRight(Effect.sleep(SWEEP_PERIOD), Effect.suspend(() => sweep(Date.now()))))
}
