/**
 * GpuWorker against the real engine process: continuous batching through EngineClient,
 * backpressure from a slow reader, and supervision (engine crash → sequences fail → restart).
 */
import { mkdtempSync } from "node:fs"
import { tmpdir } from "node:os"
import path from "node:path"
import { describe, expect, it } from "@effect/vitest"
import { Duration, Effect, Either, Fiber } from "effect"
import { generateTinyQwen3 } from "../../src/runtime/DefaultModel.js"
import * as GpuWorker from "../../src/runtime/GpuWorker.js"
import { busyMs } from "../support/busy.js"
import { assertEngineBuilt, ENGINE_BINARY } from "../support/engineProcess.js"

const modelDir = (() => {
  const dir = mkdtempSync(path.join(tmpdir(), "gpu-worker-model-"))
  generateTinyQwen3(dir)
  return dir
})()

const makeWorker = (bufferTokens: number, overrides: Partial<GpuWorker.GpuWorkerOptions> = {}) =>
  GpuWorker.make({
    gpuId: "gpu-test",
    binary: (assertEngineBuilt(), ENGINE_BINARY),
    modelDir,
    device: "cpu",
    endpoint: `ipc://${path.join(mkdtempSync(path.join(tmpdir(), "gw-")), "e.sock")}`,
    numBlocks: 64,
    maxNumSeqs: 16,
    maxNumBatchedTokens: 256,
    numSlots: 16,
    bufferTokens,
    ...overrides
  })

const greedy = { temperature: 0, top_p: 1, top_k: 0, seed: 0 }
const prompt = (n: number, salt: number) => Array.from({ length: n }, (_, i) => (i * 131 + salt * 17) % 5000 + 100)

/** Reads a sequence to its end; returns its tokens and finish reason. */
const drain = (seq: GpuWorker.Sequence) =>
  Effect.gen(function*() {
    const tokens: Array<number> = []
    for (;;) {
      const event = yield* seq.take
      if (event._tag === "Failed") return { tokens, finish: `failed:${event.error.code}` }
      tokens.push(event.tokenId)
      if (event.finishReason !== undefined) return { tokens, finish: event.finishReason }
    }
  })

/**
 * Starts `request` with a sink that spends `sinkMs` of synchronous work on each token (a
 * DecodeSlot's); `onToken` runs before it. Ends with the tokens and finish reason.
 */
const startSlow = (worker: GpuWorker.GpuWorker, request: GpuWorker.GenerateRequest, sinkMs: number, onToken: () => void = () => {}) =>
  Effect.async<{ tokens: Array<number>; finish: string }>((resume) => {
    const tokens: Array<number> = []
    const started = worker.start(request, {
      onToken: (tokenId, finishReason) => {
        onToken()
        busyMs(sinkMs)
        tokens.push(tokenId)
        if (finishReason !== undefined) resume(Effect.succeed({ tokens, finish: finishReason }))
      },
      onFailed: (error) => resume(Effect.succeed({ tokens, finish: `failed:${error.code}` }))
    })
    if (Either.isLeft(started)) resume(Effect.succeed({ tokens, finish: "refused" }))
  })

describe("GpuWorker with the real engine", () => {
  it.scopedLive("serves concurrent sequences and frees all blocks afterwards", () =>
    Effect.gen(function*() {
      const worker = yield* makeWorker(64)
      const results = yield* Effect.forEach(
        [5, 20, 37],
        (n, i) => Effect.scoped(Effect.flatMap(worker.generate({ promptTokenIds: prompt(n, i), maxTokens: 10, sampling: greedy, priority: 0 }), drain)),
        { concurrency: "unbounded" }
      )
      for (const r of results) {
        expect(r.tokens.length).toBe(10)
        expect(r.finish).toBe("length")
      }
      // Each one alone gives the same tokens (continuous batching changes nothing).
      const alone = yield* Effect.scoped(Effect.flatMap(worker.generate({ promptTokenIds: prompt(20, 1), maxTokens: 10, sampling: greedy, priority: 0 }), drain))
      expect(alone.tokens).toEqual(results[1]!.tokens)
      yield* Effect.sleep(Duration.millis(50))
      const info = yield* worker.engine().info
      expect(info.num_used_blocks).toBe(0)
      expect(info.num_active_seqs).toBe(0)
      expect((yield* worker.stats).numFreeBlocks).toBe(64)
    }))

  it.scopedLive("a reader that stops reading pauses its sequence (bounded buffer)", () =>
    Effect.gen(function*() {
      const worker = yield* makeWorker(4)
      const seq = yield* worker.generate({ promptTokenIds: prompt(8, 2), maxTokens: 200, sampling: greedy, priority: 0 })
      yield* Effect.sleep(Duration.millis(300))
      const stepsWhilePaused = (yield* worker.stats).numSteps
      yield* Effect.sleep(Duration.millis(300))
      // Paused: no step ran although the sequence is far from max tokens.
      expect((yield* worker.stats).numSteps).toBe(stepsWhilePaused)
      expect(stepsWhilePaused).toBeLessThanOrEqual(5)
      // A lagging reader catches up in one take: everything buffered comes at once.
      const caughtUp = yield* seq.takeAvailable(64)
      expect(caughtUp.length).toBeGreaterThanOrEqual(4)
      const result = yield* drain(seq)
      expect(result.tokens.length + caughtUp.length).toBe(200)
      expect((yield* worker.stats).numSteps).toBeGreaterThanOrEqual(200)
    }))

  it.scopedLive("hands a step's tokens to their sinks in slices, with the event loop turning between them", () =>
    Effect.gen(function*() {
      // 16 sequences whose sinks take 2 ms a token (a DecodeSlot's work while the collector
      // marks a large heap): one step's tokens are 32 ms of sink work. A chain of setImmediate
      // callbacks marks the loop's turns; counted in sink calls, not ms, so that a slowed test
      // process only ever sees fewer per turn. Handed over in one go, a turn would see all 16.
      const worker = yield* makeWorker(64)
      let callsThisTurn = 0
      let mostCallsInOneTurn = 0
      let running = true
      const probe = () => {
        mostCallsInOneTurn = Math.max(mostCallsInOneTurn, callsThisTurn)
        callsThisTurn = 0
        if (running) setImmediate(probe)
      }
      setImmediate(probe)
      const results = yield* Effect.forEach(
        Array.from({ length: 16 }, (_, i) => i),
        (i) => startSlow(worker, { promptTokenIds: prompt(12, i), maxTokens: 8, sampling: greedy, priority: 0 }, 2, () => callsThisTurn++),
        { concurrency: "unbounded" }
      )
      running = false
      for (const r of results) {
        expect(r.finish).toBe("length")
        expect(r.tokens.length).toBe(8)
      }
      // Sliced, every token arrived, in order: each equals the sequence generated alone.
      const alone = yield* Effect.scoped(Effect.flatMap(worker.generate({ promptTokenIds: prompt(12, 5), maxTokens: 8, sampling: greedy, priority: 0 }), drain))
      expect(results[5]!.tokens).toEqual(alone.tokens)
      expect(mostCallsInOneTurn).toBeGreaterThan(0)
      expect(mostCallsInOneTurn).toBeLessThan(10)
    }))

  it.scopedLive("closing a sequence's scope cancels it and frees its blocks within a step", () =>
    Effect.gen(function*() {
      const worker = yield* makeWorker(64)
      const fiber = yield* Effect.fork(Effect.scoped(Effect.flatMap(worker.generate({ promptTokenIds: prompt(40, 3), maxTokens: 3000, sampling: greedy, priority: 0 }), drain)))
      yield* Effect.sleep(Duration.millis(200))
      expect((yield* worker.stats).numRunning).toBe(1)
      yield* Fiber.interrupt(fiber)
      expect((yield* worker.stats).numFreeBlocks).toBe(64)
      yield* Effect.sleep(Duration.millis(100))
      expect((yield* worker.engine().info).num_active_seqs).toBe(0)
    }))

  it.scopedLive("restarts a crashed engine: live sequences are re-prefilled there and finish as if undisturbed", () =>
    Effect.gen(function*() {
      const worker = yield* makeWorker(64)
      const request = { promptTokenIds: prompt(10, 4), maxTokens: 200, sampling: greedy, priority: 0 }
      const undisturbed = yield* Effect.scoped(Effect.flatMap(worker.generate(request), drain))
      const first = worker.engine()
      const fiber = yield* Effect.fork(Effect.scoped(Effect.flatMap(worker.generate(request), drain)))
      yield* Effect.sleep(Duration.millis(100))
      process.kill(first.process.pid, "SIGKILL")
      const result = yield* Fiber.join(fiber)
      // A pause, not an error: the sequence went back to the queue with its output so far,
      // and the new engine prefilled prompt + generated tokens; greedy output is unchanged.
      expect(result.finish).toBe("length")
      expect(result.tokens).toEqual(undisturbed.tokens)
      expect(worker.engine()).not.toBe(first)
      expect((yield* worker.stats).numEngineRestarts).toBe(1)
      expect((yield* worker.stats).numFreeBlocks).toBe(64)
    }), 30_000)

  it.scopedLive("an engine crash while steps wait for their tokens to go out loses none of them", () =>
    Effect.gen(function*() {
      // Sinks of 20 ms a token: a step's 8 tokens take 160 ms to go out, far longer than a step
      // of the tiny model, so the step loop mostly waits with the latest step's tokens held
      // back. The crash lands there; those tokens are in the sequences' output (and prefilled
      // again), so they must still reach the sinks: each text equals an undisturbed run's.
      const worker = yield* makeWorker(64)
      const requests = Array.from({ length: 8 }, (_, i) => ({ promptTokenIds: prompt(10, 20 + i), maxTokens: 16, sampling: greedy, priority: 0 }))
      const undisturbed = yield* Effect.forEach(requests, (request) => Effect.scoped(Effect.flatMap(worker.generate(request), drain)))
      const first = worker.engine()
      const slow = yield* Effect.forEach(requests, (request) => Effect.fork(startSlow(worker, request, 20)))
      yield* Effect.sleep(Duration.millis(400))
      process.kill(first.process.pid, "SIGKILL")
      const results = yield* Fiber.joinAll(slow).pipe(Effect.timeout(Duration.seconds(20)))
      expect((yield* worker.stats).numEngineRestarts).toBe(1)
      results.forEach((r, i) => {
        expect(r.finish).toBe("length")
        expect(r.tokens).toEqual(undisturbed[i]!.tokens)
      })
    }), 30_000)

  it.scopedLive("admission: an idle GPU admits any prompt; a full one refuses past the TTFT target, and past its slots", () =>
    Effect.gen(function*() {
      const worker = yield* makeWorker(64, { maxNumSeqs: 2, numSlots: 4 })
      const admit = (ttftTargetMs: number) => worker.admit({ priority: 0, numPromptTokens: 200, ttftTargetMs })
      // Idle: its own prefill is no reason to refuse, whatever the target.
      const idle = admit(0)
      expect(Either.isRight(idle)).toBe(true)
      yield* worker.releaseSlot(Either.getOrThrow(idle).slot)
      // Both running seats taken by long sequences: a newcomer would wait for one to end.
      for (const salt of [5, 6]) {
        yield* Effect.forkScoped(Effect.scoped(Effect.flatMap(worker.generate({ promptTokenIds: prompt(8, salt), maxTokens: 3000, sampling: greedy, priority: 0 }), drain)))
      }
      yield* Effect.sleep(Duration.millis(300))
      expect((yield* worker.stats).numRunning).toBe(2)
      const refused = admit(100)
      expect(Either.isLeft(refused) && refused.left.reason).toBe("ttft_target")
      expect(Either.isLeft(refused) && refused.left.retryAfterS).toBeGreaterThanOrEqual(1)
      // A generous target admits, until the slots (the waiting bound) run out.
      const slots = [admit(3_600_000), admit(3_600_000), admit(3_600_000), admit(3_600_000)]
      expect(slots.map(Either.isRight)).toEqual([true, true, true, true])
      const full = admit(3_600_000)
      expect(Either.isLeft(full) && full.left.reason).toBe("no_free_slot")
    }), 30_000)

  it.scopedLive("prefix caching: the next turn (prompt + reply + new text) reuses the first turn's KV, and greedy output equals an uncached run token for token", () =>
    Effect.gen(function*() {
      const first = prompt(70, 3)
      const turn = (worker: GpuWorker.GpuWorker, ids: ReadonlyArray<number>) =>
        Effect.scoped(Effect.flatMap(worker.generate({ promptTokenIds: ids, maxTokens: 24, sampling: greedy, priority: 0 }), (seq) =>
          Effect.gen(function*() {
            const firstEvent = yield* seq.take
            const rest = yield* drain(seq)
            return { cached: firstEvent._tag === "Token" ? firstEvent.numCachedTokens : -1, tokens: [...(firstEvent._tag === "Token" ? [firstEvent.tokenId] : []), ...rest.tokens] }
          })))
      const cachedWorker = yield* makeWorker(64)
      const one = yield* turn(cachedWorker, first)
      expect(one.cached).toBe(0)
      const next = [...first, ...one.tokens, ...prompt(15, 9)]
      const two = yield* turn(cachedWorker, next)
      // 70 + 23 computed tokens of the first turn: 5 full blocks of 16 are cached.
      expect(two.cached).toBe(80)
      expect((yield* cachedWorker.stats).numPrefixHitTokens).toBe(80)
      const uncachedWorker = yield* makeWorker(64, { enablePrefixCaching: false })
      const reference = yield* turn(uncachedWorker, next)
      expect(reference.cached).toBe(0)
      expect(two.tokens).toEqual(reference.tokens)
    }), 60_000)

  it.scopedLive("a reserved slot nobody starts is freed after the reservation timeout; a started one is not; only the live reservation claims or releases a slot", () =>
    Effect.gen(function*() {
      const worker = yield* makeWorker(64, { numSlots: 2, reservationTimeoutMs: 300 })
      const admit = () => worker.admit({ priority: 0, numPromptTokens: 8, ttftTargetMs: 3_600_000 })
      const started = Either.getOrThrow(admit())
      expect(worker.claimSlot(started.slot, started.reservationId)).toBe(true)
      const lost = Either.getOrThrow(admit()) // its admitter never heard the answer
      expect(Either.isLeft(admit())).toBe(true)
      yield* Effect.sleep(Duration.millis(400))
      // The lost reservation is free again; the started slot stays taken.
      const again = Either.getOrThrow(admit())
      expect(again.slot).toBe(lost.slot)
      expect(again.reservationId).not.toBe(lost.reservationId)
      expect(Either.isLeft(admit())).toBe(true)
      // A Start or ReleaseSlot of the expired reservation, late, leaves the slot's new one alone.
      expect(worker.claimSlot(lost.slot, lost.reservationId)).toBe(false)
      worker.releaseReservation(lost.slot, lost.reservationId)
      expect(Either.isLeft(admit())).toBe(true)
      expect(worker.claimSlot(again.slot, again.reservationId)).toBe(true)
      expect(worker.claimSlot(again.slot, again.reservationId)).toBe(false)
      // A ReleaseSlot after the Start (a lost answer) does not free a running slot.
      worker.releaseReservation(again.slot, again.reservationId)
      expect(Either.isLeft(admit())).toBe(true)
      // Released twice (an ended sequence and a late release): freed once.
      yield* worker.releaseSlot(started.slot)
      yield* worker.releaseSlot(started.slot)
      const next = Either.getOrThrow(admit())
      expect(Either.isLeft(admit())).toBe(true)
      // Its own ReleaseSlot frees a reservation nobody started.
      worker.releaseReservation(next.slot, next.reservationId)
      expect(Either.isRight(admit())).toBe(true)
      // A new process of the runner (a restart) takes no reservation of the old one.
      const restarted = yield* makeWorker(64, { numSlots: 2 })
      const fresh = Either.getOrThrow(restarted.admit({ priority: 0, numPromptTokens: 8, ttftTargetMs: 3_600_000 }))
      expect(restarted.claimSlot(fresh.slot, started.reservationId)).toBe(false)
      expect(restarted.claimSlot(fresh.slot, fresh.reservationId)).toBe(true)
    }), 30_000)
})
