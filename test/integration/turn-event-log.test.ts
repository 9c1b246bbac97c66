/**
 * The turn event log on the real Redis (REDIS_URL): events read back in order, a follower
 * gets what comes after its index and ends with the terminal event, and the key's TTL is set
 * once while the turn is live (not per appended event) and shortened by its terminal event.
 */
import { randomUUID } from "node:crypto"
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Deferred, Duration, Effect, Stream } from "effect"
import { Redis } from "ioredis"
import { TurnId } from "../../src/runtime/Domain.js"
import * as TurnEventLog from "../../src/runtime/TurnEventLog.js"

const redisUrl = process.env["REDIS_URL"] ?? "redis://127.0.0.1:6379"

const token = (index: number, text: string): TurnEventLog.LoggedEvent => ({ index, kind: "token", text, ids: [index] })

/** A log under a key prefix of its own, and a client of the same Redis to look at it (both closed with the scope). */
const redisLog = Effect.gen(function*() {
  const prefix = `test:${randomUUID()}:`
  const log = yield* Effect.provide(TurnEventLog.TurnEventLog, TurnEventLog.layerRedis(redisUrl, prefix))
  const redis = new Redis(redisUrl)
  yield* Effect.addFinalizer(() => Effect.promise(() => redis.quit()))
  return { log, prefix, redis }
})

/**
 * Follows `turnId` after `afterIndex` in a fiber of its own (started before it returns); the
 * effect returned gives what the follower got, once its stream ends (within 5 s).
 */
const followInBackground = (log: TurnEventLog.TurnEventLog["Type"], turnId: TurnId, afterIndex: number) =>
  Effect.gen(function*() {
    const followed = yield* log.follow(turnId, afterIndex)
    if (followed._tag !== "Events") return yield* Effect.dieMessage(`expected events, got ${followed._tag}`)
    const collected = yield* Effect.fork(Stream.runCollect(followed.events))
    yield* Effect.yieldNow()
    return Effect.map(collected.await.pipe(Effect.flatten, Effect.timeout(Duration.seconds(5))), Chunk.toArray)
  })

describe("TurnEventLog (Redis)", () => {
  it.scopedLive("reads and follows a turn's events; its TTL is set when it starts and when it ends, not per event", () =>
    Effect.gen(function*() {
      const { log, prefix, redis } = yield* redisLog
      const turnId = TurnId.make(`turn_${randomUUID()}`)
      const key = `${prefix}turn:${turnId}`
      const logged = (n: number) =>
        Effect.gen(function*() {
          const deadline = Date.now() + 5000
          while ((yield* Effect.promise(() => redis.xlen(key))) < n) {
            if (Date.now() > deadline) return yield* Effect.dieMessage(`fewer than ${n} events logged`)
            yield* Effect.sleep(Duration.millis(10))
          }
        })
      yield* Effect.sleep("100 millis") // connected

      log.append(turnId, token(0, "Hel"))
      log.append(turnId, token(1, "lo"))
      yield* logged(2)
      const liveTtl = yield* Effect.promise(() => redis.ttl(key))
      expect(liveTtl).toBeGreaterThan(3000)
      expect(liveTtl).toBeLessThanOrEqual(3600)

      // Later events leave the TTL alone (it was set a moment ago): here, none at all.
      yield* Effect.promise(() => redis.persist(key))
      log.append(turnId, token(2, ","))
      log.append(turnId, token(3, " you"))
      yield* logged(4)
      expect(yield* Effect.promise(() => redis.ttl(key))).toBe(-1)

      const followed = yield* log.follow(turnId, 1)
      expect(followed._tag).toBe("Events")
      const done: TurnEventLog.LoggedEvent = {
        index: 4,
        kind: "done",
        done: { turn_id: turnId, finish_reason: "stop", usage: { prompt_tokens: 3, completion_tokens: 4, prompt_tokens_details: { cached_tokens: 0 } } }
      }
      log.append(turnId, done)
      yield* logged(5)
      const endedTtl = yield* Effect.promise(() => redis.ttl(key))
      expect(endedTtl).toBeGreaterThan(0)
      expect(endedTtl).toBeLessThanOrEqual(TurnEventLog.ENDED_TTL_S)

      if (followed._tag !== "Events") return
      const events = Chunk.toArray(yield* Stream.runCollect(followed.events))
      expect(events).toEqual([token(2, ","), token(3, " you"), done])
      expect((yield* log.read(turnId)).map((e) => e.index)).toEqual([0, 1, 2, 3, 4])
      expect(yield* log.follow(turnId, 4)).toEqual({ _tag: "Ended" })
      // A failover's start logged after the end does not hide it.
      log.append(turnId, { index: -1, kind: "start", slot_id: "gpu-2/0", request: {} })
      yield* logged(6)
      expect(yield* log.follow(turnId, 4)).toEqual({ _tag: "Ended" })
    }))

  it.scopedLive("one turn whose key cannot take an event loses only its own: the other turns of the tick are logged, with their TTLs", () =>
    Effect.gen(function*() {
      const { log, prefix, redis } = yield* redisLog
      const [a, broken, b] = [0, 1, 2].map(() => TurnId.make(`turn_${randomUUID()}`))
      // A key of another type: XADD on it fails (WRONGTYPE).
      yield* Effect.promise(() => redis.set(`${prefix}turn:${broken}`, "not a stream", "EX", 60))
      yield* Effect.sleep("100 millis") // connected
      // One tick: a's event, then the broken turn's, then b's.
      log.append(a!, token(0, "a"))
      log.append(broken!, token(0, "x"))
      log.append(b!, token(0, "b"))
      const deadline = Date.now() + 5000
      while ((yield* Effect.promise(() => redis.exists(`${prefix}turn:${b}`))) === 0 && Date.now() < deadline) {
        yield* Effect.sleep(Duration.millis(10))
      }
      expect((yield* log.read(a!)).map((e) => e.index)).toEqual([0])
      expect((yield* log.read(b!)).map((e) => e.index)).toEqual([0])
      expect(yield* Effect.promise(() => redis.ttl(`${prefix}turn:${b}`))).toBeGreaterThan(3000)
      expect(yield* Effect.promise(() => redis.type(`${prefix}turn:${broken}`))).toBe("string")
    }))
})

describe("TurnEventLog (in memory, the one-runner deployment)", () => {
  it.scoped("reads a running turn back as appended, ids included; follows it to its end; keeps the ended turn's text", () =>
    Effect.gen(function*() {
      const log = yield* Effect.provide(TurnEventLog.TurnEventLog, TurnEventLog.layerMemory)
      const turnId = TurnId.make(`turn_${randomUUID()}`)
      const start = (slot: string): TurnEventLog.LoggedEvent => ({ index: -1, kind: "start", slot_id: slot, request: { n: 1 } })
      log.append(turnId, start("gpu-0/1"))
      log.append(turnId, token(0, "Hel"))
      log.append(turnId, { index: 1, kind: "token", text: "lo", ids: [7, 8, 9] })
      // A failover starts it again on another slot, after two token events.
      log.append(turnId, start("gpu-0/2"))
      log.append(turnId, { index: 2, kind: "token", text: ",", ids: [] })
      expect(yield* log.read(turnId)).toEqual([
        start("gpu-0/1"),
        token(0, "Hel"),
        { index: 1, kind: "token", text: "lo", ids: [7, 8, 9] },
        start("gpu-0/2"),
        { index: 2, kind: "token", text: ",", ids: [] }
      ])

      const followed = yield* log.follow(turnId, 0)
      // Logged after `follow` and before its stream runs: the stream must still see it.
      log.append(turnId, { index: 3, kind: "token", text: " you", ids: [4] })
      const done: TurnEventLog.LoggedEvent = {
        index: 4,
        kind: "done",
        done: { turn_id: turnId, finish_reason: "stop", usage: { prompt_tokens: 3, completion_tokens: 5, prompt_tokens_details: { cached_tokens: 0 } } }
      }
      if (followed._tag !== "Events") return yield* Effect.dieMessage(`expected events, got ${followed._tag}`)
      // The follower has read what was logged (through index 3) before the end comes live.
      const caughtUp = yield* Deferred.make<void>()
      const collected = yield* Effect.fork(Stream.runCollect(followed.events.pipe(
        Stream.tap((e) => (e.index === 3 ? Deferred.succeed(caughtUp, undefined) : Effect.void))
      )))
      yield* Deferred.await(caughtUp)
      log.append(turnId, done)
      log.append(turnId, token(5, "late")) // after the end: ignored
      // It read the running turn (ids included), then got the rest live.
      expect(Chunk.toArray(yield* collected.await.pipe(Effect.flatten))).toEqual([
        { index: 1, kind: "token", text: "lo", ids: [7, 8, 9] },
        { index: 2, kind: "token", text: ",", ids: [] },
        { index: 3, kind: "token", text: " you", ids: [4] },
        done
      ])
      // A follower that comes after the end reads the packed turn.
      const late = yield* log.follow(turnId, 2)
      if (late._tag !== "Events") return yield* Effect.dieMessage(`expected events, got ${late._tag}`)
      expect(Chunk.toArray(yield* Stream.runCollect(late.events))).toEqual([{ index: 3, kind: "token", text: " you", ids: [] }, done])
      // Ended: its token texts and indices are kept (not the ids: only a failover reads them).
      expect(yield* log.read(turnId)).toEqual([
        { index: 0, kind: "token", text: "Hel", ids: [] },
        { index: 1, kind: "token", text: "lo", ids: [] },
        { index: 2, kind: "token", text: ",", ids: [] },
        { index: 3, kind: "token", text: " you", ids: [] },
        done
      ])
      expect(yield* log.follow(turnId, 4)).toEqual({ _tag: "Ended" })
    }))

  it.scopedLive("a follower whose Last-Event-ID is past the turn's end gets the end, not a stream left open or closed without it", () =>
    Effect.gen(function*() {
      const log = yield* Effect.provide(TurnEventLog.TurnEventLog, TurnEventLog.layerMemory)
      const turnId = TurnId.make(`turn_${randomUUID()}`)
      log.append(turnId, token(0, "Hi"))
      const collected = yield* followInBackground(log, turnId, 10)
      log.append(turnId, token(1, "!"))
      log.append(turnId, { index: 2, kind: "error", code: "cancelled", message: "cancelled" })
      expect(yield* collected).toEqual([{ index: 2, kind: "error", code: "cancelled", message: "cancelled" }])
      // A follower at the end's own index saw that end already: it is not sent again.
      const other = TurnId.make(`turn_${randomUUID()}`)
      log.append(other, token(0, "Hi"))
      const collectedAtEnd = yield* followInBackground(log, other, 1)
      log.append(other, { index: 1, kind: "done", done: { turn_id: other, finish_reason: "stop", usage: { prompt_tokens: 1, completion_tokens: 1, prompt_tokens_details: { cached_tokens: 0 } } } })
      expect(yield* collectedAtEnd).toEqual([])
    }))
})
