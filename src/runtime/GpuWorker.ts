/**
 * GpuWorker: everything one GPU's runner holds for it: the engine process and its client, the
 * continuous-batching SchedulerCore with its KvBlockManager, the step loop, and the sinks of
 * the sequences it serves. The GpuScheduler and DecodeSlot entities of that GPU are pinned to
 * this runner (shard group) and talk to it in-process.
 *
 * Step loop (plain callbacks, no fiber per step or per token): schedule → send the `step` →
 * hand the previous step's tokens to their sinks while the engine computes → on the reply,
 * apply it and schedule again at once. The GPU waits only for apply + schedule + encode +
 * IPC; per-token work (detokenization, socket writes) runs in the engine's shadow, one step
 * behind. A sink pauses its sequence (backpressure) with `pause` and resumes it with `resume`.
 * Cancellation frees the sequence's blocks at once; the engine is told in the next step (or a
 * bare `release` when idle).
 */
import { randomInt } from "node:crypto"
import { Chunk, Duration, Effect, Either, ExecutionStrategy, Exit, Fiber, Option, Queue, Runtime, Schedule, Scope } from "effect"
import * as EngineClient from "./EngineClient.js"
import { forEachSampledToken, type InfoReply, type StepReply, type StepRequest } from "./EngineProtocol.js"
import { EngineError, PromptTooLong } from "./Errors.js"
import { KvBlockManager } from "./KvBlockManager.js"
import { type FinishReason, type SamplingParams, SchedulerCore, type StepPlan, type TokenOutput } from "./SchedulerCore.js"

/** What a sequence's reader receives (the Queue-based `generate`). */
export type SeqEvent =
  | { readonly _tag: "Token"; readonly tokenId: number; readonly finishReason: FinishReason | undefined; readonly numCachedTokens: number }
  | { readonly _tag: "Failed"; readonly error: EngineError }

export interface GenerateRequest {
  readonly promptTokenIds: ReadonlyArray<number>
  readonly maxTokens: number
  readonly sampling: SamplingParams
  readonly priority: number
}

/**
 * Receives a sequence's output, synchronously, from the step loop. After a token with a
 * `finishReason`, or `onFailed`, nothing more comes. Sinks must not throw.
 */
export interface SeqSink {
  /** `numCachedTokens`: prompt tokens whose KV came from the prefix cache (the same on every token). */
  readonly onToken: (tokenId: number, finishReason: FinishReason | undefined, numCachedTokens: number) => void
  readonly onFailed: (error: EngineError) => void
}

/** Control of a started sequence. */
export interface SeqHandle {
  readonly seqId: number
  /** Leave the sequence out of steps until `resume` (its reader is full). */
  readonly pause: () => void
  readonly resume: () => void
  /** Stops it: blocks free now, no more sink calls. @returns whether it was still live. */
  readonly cancel: () => boolean
}

export interface Sequence {
  readonly seqId: number
  /** Next event; the last one is a Token with a finishReason, or Failed. */
  readonly take: Effect.Effect<SeqEvent>
  /**
   * Waits for one event, then also takes every event already buffered (at most `max`): a
   * reader that fell behind catches up in one go instead of one message per token.
   */
  readonly takeAvailable: (max: number) => Effect.Effect<ReadonlyArray<SeqEvent>>
}

export interface StepStats {
  readonly numSteps: number
  readonly numEngineRestarts: number
  readonly numRunning: number
  readonly numWaiting: number
  readonly numFreeBlocks: number
  readonly numBlocks: number
  /** Free blocks that still hold cached KV (counted in numFreeBlocks too). */
  readonly numCachedFreeBlocks: number
  /** Prefix-cache lookups and hits since start, in prompt tokens. */
  readonly numPrefixQueriedTokens: number
  readonly numPrefixHitTokens: number
}

/**
 * Where one step's time went, in ms, on the GPU's critical path:
 * - `schedule_ms`: this side, from the previous reply being decoded (or a wake-up) to this
 *   step being handed to the socket: apply the reply, schedule, build, msgpack-encode, send;
 * - `rpc_ms`: send → reply frame received; `engine_ms` (the engine's `timings.total_ms`) is
 *   inside it, the rest is ZeroMQ IPC both ways and the engine's own msgpack work;
 * - `decode_ms`: this side, msgpack + Schema decoding of the reply.
 * `dispatch_ms`: time spent handing tokens to their sinks (in slices of 4 ms, between the
 * event loop's other work) since the previous step's record. It delays the GPU only when two
 * steps' tokens are still going out: the next step then waits, and that wait is also in its
 * `schedule_ms`.
 */
export interface StepRecord {
  readonly num_seqs: number
  readonly num_tokens: number
  readonly schedule_ms: number
  readonly rpc_ms: number
  readonly engine_ms: number
  readonly decode_ms: number
  readonly dispatch_ms: number
}

export interface GpuWorker {
  readonly gpuId: string
  /** The client of the engine process running now (a new one after a restart). */
  readonly engine: () => EngineClient.SpawnedEngineClient
  readonly engineInfo: InfoReply
  /** Longest prompt + output the model accepts, in tokens. */
  readonly maxModelLen: number
  /**
   * Queues a sequence whose output goes to `sink`. Fails with PromptTooLong (and changes
   * nothing) if it could never fit. The caller must `cancel` it if it stops caring.
   */
  readonly start: (request: GenerateRequest, sink: SeqSink) => Either.Either<SeqHandle, PromptTooLong>
  /**
   * `start` with a buffered reader: it pauses the sequence while `bufferTokens` events are
   * unread and resumes it at half; the sequence is cancelled when the scope closes.
   */
  readonly generate: (request: GenerateRequest) => Effect.Effect<Sequence, PromptTooLong, Scope.Scope>
  readonly stats: Effect.Effect<StepStats>
  /**
   * Admission of a new sequence: reserves a DecodeSlot index, or refuses it when every slot
   * is taken (the waiting bound) or when the queue ahead is predicted to delay its first token
   * by more than `ttftTargetMs` (`SchedulerCore.predictedQueueingSteps` × the measured step
   * time). An idle GPU admits any prompt: its own prefill time is no reason to refuse it.
   */
  readonly admit: (request: AdmitRequest) => Either.Either<Reservation, AdmitRefusal>
  /**
   * Whether a prompt of `numPromptTokens` fits this GPU: under the model's context and, with
   * its first generated token, in the whole KV cache (a pool's cache may hold fewer tokens than
   * the model's context). `start` refuses one that does not with the same error.
   */
  readonly checkPrompt: (numPromptTokens: number) => Either.Either<void, PromptTooLong>
  /**
   * Marks a reserved slot as started. @returns false unless `reservationId` is the slot's
   * live reservation: it expired (not started within `reservationTimeoutMs`: its admitter
   * never heard the answer, or went away; the next admission frees it), or it was made by an
   * earlier process of this runner (a Start the cluster delivered after a restart).
   */
  readonly claimSlot: (slot: number, reservationId: number) => boolean
  /** Frees a reserved or started slot (a free one is left as it is). */
  readonly releaseSlot: (slot: number) => Effect.Effect<void>
  /** Frees `slot` if `reservationId` is its live reservation, not started. */
  readonly releaseReservation: (slot: number, reservationId: number) => void
  /** Admits nothing from now on (a drain): running and waiting sequences go on. */
  readonly stopAdmitting: () => void
  /** Whether an engine process is up and answering (false while it restarts). */
  readonly isEngineUp: () => boolean
  /** The last steps' timings (a ring of `stepHistory` entries), oldest first. */
  readonly recentSteps: () => ReadonlyArray<StepRecord>
}

export interface AdmitRequest {
  readonly priority: number
  readonly numPromptTokens: number
  readonly ttftTargetMs: number
}

/**
 * An admitted sequence's slot. `reservationId` is random (48 bits), so that a reservation of
 * an earlier process of the runner, or an expired one, never claims the slot's next one.
 */
export interface Reservation {
  readonly slot: number
  readonly reservationId: number
}

export interface AdmitRefusal {
  readonly reason: "no_free_slot" | "ttft_target" | "draining"
  readonly message: string
  /** When a retry may be admitted, in whole seconds (≥ 1). */
  readonly retryAfterS: number
}

export interface GpuWorkerOptions extends EngineClient.EngineProcessOptions {
  readonly gpuId: string
  readonly maxNumSeqs: number
  readonly maxNumBatchedTokens: number
  readonly numSlots: number
  readonly bufferTokens: number
  readonly requestTimeoutMs?: number
  /** How many StepRecords `recentSteps` keeps (default 1024). */
  readonly stepHistory?: number
  /**
   * A step unanswered after `stepDeadlineMinMs` (default 2 s) + 10 × its predicted time gets
   * the engine killed and restarted, its sequences re-queued.
   */
  readonly stepDeadlineMinMs?: number
  /** Sequences wait this long for a restarting engine before they fail (default 30 s). */
  readonly engineDownMaxMs?: number
  /** A slot reserved by `admit` and not claimed within this is freed (default 60 s). */
  readonly reservationTimeoutMs?: number
  /** Reuse the KV of full blocks across sequences (KvBlockManager; default true). */
  readonly enablePrefixCaching?: boolean
}


/** How long (ms) one slice of a step's token delivery may hold the event loop. */
const DELIVER_SLICE_MS = 4

const SLOT_FREE = 0
const SLOT_RESERVED = 1
const SLOT_STARTED = 2

export const make = (options: GpuWorkerOptions): Effect.Effect<GpuWorker, EngineError, Scope.Scope> =>
  Effect.gen(function*() {
    const runFork = Runtime.runFork(yield* Effect.runtime<never>())
    // Each engine process lives in a child scope, so that a crashed one can be replaced. Their
    // parent is forked first so that it closes last, after the supervisor has stopped.
    const enginesScope = yield* Scope.fork(yield* Effect.scope, ExecutionStrategy.sequential)
    const startEngine = Effect.gen(function*() {
      const scope = yield* Scope.fork(enginesScope, ExecutionStrategy.sequential)
      const client = yield* EngineClient.make(options).pipe(
        Scope.extend(scope),
        Effect.onError(() => Scope.close(scope, Exit.void))
      )
      return { client, scope }
    })
    let current = yield* startEngine
    const engine = () => current.client
    let numEngineRestarts = 0
    const engineInfo = yield* current.client.info
    const maxModelLen = engineInfo.model.max_position_embeddings
    // The hash chains start from the model: another checkpoint's KV for the same ids differs.
    const kv = new KvBlockManager(engineInfo.num_blocks, engineInfo.block_size, {
      enableCaching: options.enablePrefixCaching !== false,
      salt: `${engineInfo.model.architecture}:${options.modelDir}`
    })
    const core = new SchedulerCore(kv, {
      maxNumBatchedTokens: options.maxNumBatchedTokens,
      maxNumSeqs: options.maxNumSeqs,
      maxModelLen
    })
    const eosTokenIds: ReadonlySet<number> = new Set(engineInfo.model.eos_token_ids)
    const sinks = new Map<number, SeqSink>()
    let draining = false
    const freeSlots = Array.from({ length: options.numSlots }, (_, i) => options.numSlots - 1 - i)
    /** Each slot's state: free, reserved by `admit` (with its time in `reservedAtMs`), or started. */
    const slotState = new Uint8Array(options.numSlots) // SLOT_FREE
    const reservedAtMs = new Map<number, number>()
    /** Each slot's latest reservation id (meaningful while it is reserved). */
    const reservationIds = new Float64Array(options.numSlots)
    const reservationTimeoutMs = options.reservationTimeoutMs ?? 60_000
    const freeSlot = (slot: number) => {
      if (slotState[slot] === SLOT_FREE) return
      slotState[slot] = SLOT_FREE
      reservedAtMs.delete(slot)
      freeSlots.push(slot)
    }
    /** Frees the reservations nobody started (a lost admission answer would leak its slot). */
    const expireReservations = () => {
      const now = Date.now()
      for (const [slot, at] of reservedAtMs) if (now - at > reservationTimeoutMs) freeSlot(slot)
    }
    let nextSeqId = 1
    let numSteps = 0
    const stepHistory = options.stepHistory ?? 1024
    const steps: Array<StepRecord> = []

    // Step loop state: at most one request (step or release) is in flight.
    // `engineEpoch` counts engine processes: a reply (or error) from an earlier one is void.
    let engineEpoch = 0
    let engineUp = true
    let stepMsEwma = 0
    let msPerTokenEwma = 0
    const stepDeadlineMinMs = options.stepDeadlineMinMs ?? 2000
    let deadlineTimer: ReturnType<typeof setTimeout> | undefined
    let busy = false
    let tickScheduled = false
    let stopped = false
    let undelivered: ReadonlyArray<TokenOutput> = []
    // One map for every step's sampled tokens (applyStepResult does not keep it).
    const sampled = new Map<number, number>()
    const setSampled = (seqId: number, tokenId: number) => void sampled.set(seqId, tokenId)

    /**
     * Outputs not yet handed to their sinks, oldest first, from `deliveringAt`. A sink's work
     * per token (detokenizing, stop strings, moderation, the turn log, the SSE write) is tens of
     * microseconds, several times that while the collector marks the heap, so the tokens go out
     * in slices of DELIVER_SLICE_MS with the event loop turning between them. A step's tokens
     * go out while the next step runs; a step is sent only while at most one earlier step's
     * tokens are still going out (`tick` waits otherwise), so a slow delivery paces the GPU and
     * the queue holds at most two steps' tokens.
     */
    let delivering: Array<TokenOutput> = []
    let deliveringAt = 0
    /** Where each step's outputs end in `delivering`, for the steps not yet all delivered. */
    let batchEnds: Array<number> = []
    /** Time spent in delivery slices since the last step record (its `dispatch_ms`). */
    let dispatchMs = 0
    /** When a tick found deliveries behind: it runs again, from this `since`, once they catch up. */
    let tickAfterDelivery: number | undefined = undefined
    /** A slice is running: a `deliver` from inside it (through `tick`) leaves the rest to it. */
    let inSlice = false
    const deliver = (outputs: ReadonlyArray<TokenOutput>) => {
      if (outputs.length === 0) return
      const idle = deliveringAt >= delivering.length
      if (idle) {
        delivering = []
        deliveringAt = 0
        batchEnds = []
      } else if (deliveringAt > 1024 && deliveringAt * 2 > delivering.length) {
        delivering = delivering.slice(deliveringAt)
        batchEnds = batchEnds.map((end) => end - deliveringAt)
        deliveringAt = 0
      }
      for (const out of outputs) delivering.push(out)
      batchEnds.push(delivering.length)
      if (!idle) return
      if (inSlice) setImmediate(deliverSlice)
      else deliverSlice()
    }
    const deliverSlice = () => {
      if (stopped) return
      const t0 = performance.now()
      inSlice = true
      try {
        while (deliveringAt < delivering.length) {
          const out = delivering[deliveringAt++]!
          const sink = sinks.get(out.seqId)
          if (sink !== undefined) {
            if (out.finishReason !== undefined) sinks.delete(out.seqId)
            sink.onToken(out.tokenId, out.finishReason, out.numCachedTokens)
          }
          if (performance.now() - t0 >= DELIVER_SLICE_MS) break
        }
      } finally {
        // Also when a sink threw (SeqSink must not): the rest still goes out, the loop goes on.
        inSlice = false
        dispatchMs += performance.now() - t0
        while (batchEnds.length > 0 && batchEnds[0]! <= deliveringAt) batchEnds.shift()
        if (deliveringAt < delivering.length) setImmediate(deliverSlice)
        if (tickAfterDelivery !== undefined && batchEnds.length <= 1) {
          const since = tickAfterDelivery
          tickAfterDelivery = undefined
          tick(since)
        }
      }
    }
    /** The sequence's tokens still going out reach its sink first; then its failure, unless one finished it. */
    const fail = (seqId: number, error: EngineError) => {
      const sink = sinks.get(seqId)
      if (sink === undefined) return
      sinks.delete(seqId)
      for (let i = deliveringAt; i < delivering.length; i++) {
        const out = delivering[i]!
        if (out.seqId !== seqId) continue
        sink.onToken(out.tokenId, out.finishReason, out.numCachedTokens)
        if (out.finishReason !== undefined) return
      }
      sink.onFailed(error)
    }
    const wake = () => {
      if (busy || tickScheduled || stopped || !engineUp) return
      tickScheduled = true
      setImmediate(() => tick(performance.now()))
    }

    /** A bare `release` (no step to carry it); the loop goes on when it is answered. */
    const sendRelease = (seqIds: ReadonlyArray<number>) => {
      busy = true
      const epoch = engineEpoch
      engine().sendRelease(seqIds, () => {
        if (epoch !== engineEpoch) return
        busy = false
        wake()
      })
    }

    /** The engine is hung: kill it; supervision restarts it and re-queues the sequences. */
    const onStepDeadline = (epoch: number, deadlineMs: number) => {
      if (epoch !== engineEpoch || stopped) return
      runFork(Effect.logError(`engine ${options.gpuId} did not answer a step within ${Math.round(deadlineMs)} ms; killing it`))
      try {
        process.kill(current.client.process.pid, "SIGKILL")
      } catch {
        // already gone: supervision sees it exit
      }
    }

    /** Sends the next step (or a pending release), then delivers the previous step's tokens. */
    const tick = (since: number): void => {
      tickScheduled = false
      if (busy || stopped || !engineUp) return
      if (batchEnds.length > 1) {
        tickAfterDelivery ??= since
        return
      }
      const plan = core.schedule()
      if (plan === undefined) {
        const outputs = undelivered
        undelivered = []
        deliver(outputs)
        const release = core.takePendingRelease()
        if (release.length > 0) sendRelease(release)
        return
      }
      const request: StepRequest = plan.release.length > 0
        ? { release: plan.release, packed_outputs: true, seqs: plan.items }
        : { packed_outputs: true, seqs: plan.items }
      let sentAt = Number.NaN
      busy = true
      const epoch = engineEpoch
      const deadlineMs = stepDeadlineMinMs + 10 * (stepMsEwma + msPerTokenEwma * plan.numBatchedTokens)
      deadlineTimer = setTimeout(() => onStepDeadline(epoch, deadlineMs), deadlineMs)
      engine().sendStep(request, (result, receivedAt) => {
        clearTimeout(deadlineTimer)
        if (epoch === engineEpoch) onReply(plan, result, sentAt, receivedAt, sentAt - since)
      })
      sentAt = performance.now()
      const outputs = undelivered
      undelivered = []
      deliver(outputs)
    }

    const onReply = (
      plan: StepPlan,
      result: Either.Either<StepReply, EngineError>,
      sentAt: number,
      receivedAt: number,
      scheduleMs: number
    ) => {
      const decodedAt = performance.now()
      busy = false
      if (stopped) return
      if (Either.isLeft(result)) return failPlan(plan, result.left)
      const reply = result.right
      numSteps++
      const stepMs = decodedAt - sentAt + scheduleMs
      stepMsEwma = numSteps === 1 ? stepMs : 0.9 * stepMsEwma + 0.1 * stepMs
      const msPerToken = (receivedAt - sentAt) / Math.max(1, plan.numBatchedTokens)
      msPerTokenEwma = numSteps === 1 ? msPerToken : 0.9 * msPerTokenEwma + 0.1 * msPerToken
      sampled.clear()
      forEachSampledToken(reply, setSampled)
      undelivered = core.applyStepResult(plan, sampled)
      if (steps.length === stepHistory) steps.shift()
      steps.push({
        num_seqs: plan.items.length,
        num_tokens: plan.numBatchedTokens,
        schedule_ms: scheduleMs,
        rpc_ms: receivedAt - sentAt,
        engine_ms: reply.timings.total_ms,
        decode_ms: decodedAt - receivedAt,
        dispatch_ms: dispatchMs
      })
      dispatchMs = 0
      tick(decodedAt)
    }

    /** The engine failed a step: every sequence in it fails; their state is dropped on both sides. */
    const failPlan = (plan: StepPlan, error: EngineError) => {
      runFork(Effect.logWarning(`engine ${options.gpuId} step failed: ${error.code}: ${error.message}`))
      for (const item of plan.items) {
        core.cancel(item.seq_id)
        fail(item.seq_id, error)
      }
      sendRelease([...plan.release, ...plan.items.map((i) => i.seq_id), ...core.takePendingRelease()])
    }
    yield* Effect.addFinalizer(() => Effect.sync(() => void (stopped = true)))

    // Supervision: when the engine process dies (or is killed for missing a step deadline),
    // its live sequences go back to the waiting queue with their output so far, and a new
    // process is started with backoff; they are prefilled again there (prompt + generated
    // tokens), so their clients see a pause, not an error. Sequences fail only if no engine
    // is back within `engineDownMaxMs`.
    const engineDownMaxMs = options.engineDownMaxMs ?? 30_000
    const failAllLive = (error: EngineError) => {
      for (const seqId of core.liveSeqIds()) {
        core.cancel(seqId)
        fail(seqId, error)
      }
      core.takePendingRelease()
    }
    const supervise = Effect.gen(function*() {
      const code = yield* current.client.process.exited
      numEngineRestarts++
      engineUp = false
      engineEpoch++
      clearTimeout(deadlineTimer)
      busy = false
      // A held-back tick left the last step's tokens here: they are in the sequences' output
      // (and prefilled again with them), so they go to their sinks, not away.
      const heldBack = undelivered
      undelivered = []
      deliver(heldBack)
      core.requeueAll()
      yield* Effect.logError(
        `engine ${options.gpuId} exited with code ${code}; restarting it, ${core.numWaiting} sequences wait for it`
      )
      const downTimer = setTimeout(() => {
        if (engineUp || stopped) return
        failAllLive(new EngineError({ code: "engine_unavailable", message: `engine ${options.gpuId} is down` }))
      }, engineDownMaxMs)
      yield* Scope.close(current.scope, Exit.void) // closes the socket: pending requests fail now (and are void)
      current = yield* startEngine.pipe(
        Effect.tapError((e) => Effect.logError(`engine ${options.gpuId} restart failed: ${e.message}`)),
        Effect.retry(Schedule.exponential(Duration.millis(200)).pipe(Schedule.union(Schedule.spaced(Duration.seconds(10)))))
      )
      clearTimeout(downTimer)
      engineUp = true
      yield* Effect.logInfo(`engine ${options.gpuId} restarted`)
      wake()
    }).pipe(Effect.forever)
    const supervisor = yield* Effect.forkScoped(supervise)
    // Stop supervising before the engines' scopes close on shutdown, or it would restart them.
    yield* Effect.addFinalizer(() => Fiber.interrupt(supervisor))

    const checkPrompt = (n: number): Either.Either<void, PromptTooLong> =>
      n === 0 || n >= maxModelLen || kv.blocksFor(n + 1) > kv.numBlocks
        ? Either.left(new PromptTooLong({ num_prompt_tokens: n, max_model_len: Math.min(maxModelLen, kv.numBlocks * kv.blockSize) }))
        : Either.void

    const start = (request: GenerateRequest, sink: SeqSink): Either.Either<SeqHandle, PromptTooLong> => {
      const checked = checkPrompt(request.promptTokenIds.length)
      if (Either.isLeft(checked)) return Either.left(checked.left)
      const seqId = nextSeqId++
      sinks.set(seqId, sink)
      core.add({
        seqId,
        promptTokenIds: request.promptTokenIds,
        maxTokens: request.maxTokens,
        sampling: request.sampling,
        priority: request.priority,
        eosTokenIds
      })
      wake()
      return Either.right({
        seqId,
        pause: () => core.setPaused(seqId, true),
        resume: () => {
          core.setPaused(seqId, false)
          wake()
        },
        cancel: () => {
          const live = sinks.delete(seqId)
          if (core.cancel(seqId)) wake()
          return live
        }
      })
    }

    const generate = (request: GenerateRequest) =>
      Effect.gen(function*() {
        const queue = yield* Queue.unbounded<SeqEvent>()
        const size = () => Option.getOrElse(queue.unsafeSize(), () => 0)
        let paused = false
        let handle: SeqHandle | undefined
        const sink: SeqSink = {
          onToken: (tokenId, finishReason, numCachedTokens) => {
            Queue.unsafeOffer(queue, { _tag: "Token", tokenId, finishReason, numCachedTokens })
            if (!paused && finishReason === undefined && size() >= options.bufferTokens) {
              paused = true
              handle?.pause()
            }
          },
          onFailed: (error) => void Queue.unsafeOffer(queue, { _tag: "Failed", error })
        }
        const h = yield* Effect.acquireRelease(
          Effect.suspend(() => start(request, sink)),
          (h) => Effect.sync(() => h.cancel())
        )
        handle = h
        const resumeIfDrained = Effect.sync(() => {
          if (paused && size() <= options.bufferTokens / 2) {
            paused = false
            h.resume()
          }
        })
        const take = Queue.take(queue).pipe(Effect.zipLeft(resumeIfDrained))
        const takeAvailable = (max: number) =>
          Queue.takeBetween(queue, 1, max).pipe(
            Effect.map((chunk) => Chunk.toReadonlyArray(chunk)),
            Effect.zipLeft(resumeIfDrained)
          )
        return { seqId: h.seqId, take, takeAvailable } satisfies Sequence
      })

    return {
      gpuId: options.gpuId,
      engine,
      engineInfo,
      maxModelLen,
      start,
      generate,
      stats: Effect.sync(() => ({
        numSteps,
        numEngineRestarts,
        numRunning: core.numRunning,
        numWaiting: core.numWaiting,
        numFreeBlocks: kv.numFreeBlocks,
        numBlocks: kv.numBlocks,
        numCachedFreeBlocks: kv.numCachedFreeBlocks,
        numPrefixQueriedTokens: kv.numQueriedTokens,
        numPrefixHitTokens: kv.numHitTokens
      })),
      checkPrompt,
      admit: ({ numPromptTokens, priority, ttftTargetMs }) => {
        if (draining) {
          return Either.left({ reason: "draining", message: `${options.gpuId} is draining (its runner is stopping)`, retryAfterS: 1 })
        }
        if (reservedAtMs.size > 0) expireReservations()
        if (freeSlots.length === 0) {
          return Either.left({ reason: "no_free_slot", message: `all ${options.numSlots} decode slots of ${options.gpuId} are taken`, retryAfterS: 1 })
        }
        const waitMs = core.predictedQueueingSteps(priority, numPromptTokens) * stepMsEwma
        if (waitMs > ttftTargetMs) {
          return Either.left({
            reason: "ttft_target",
            message: `${options.gpuId} predicts a ${Math.round(waitMs)} ms queueing delay before a first token (target ${ttftTargetMs} ms)`,
            retryAfterS: Math.min(60, Math.max(1, Math.ceil(waitMs / 1000)))
          })
        }
        const slot = freeSlots.pop()!
        slotState[slot] = SLOT_RESERVED
        reservedAtMs.set(slot, Date.now())
        const reservationId = randomInt(2 ** 48 - 1)
        reservationIds[slot] = reservationId
        return Either.right({ slot, reservationId })
      },
      claimSlot: (slot, reservationId) => {
        if (slotState[slot] !== SLOT_RESERVED || reservationIds[slot] !== reservationId) return false
        slotState[slot] = SLOT_STARTED
        reservedAtMs.delete(slot)
        return true
      },
      releaseSlot: (slot) => Effect.sync(() => freeSlot(slot)),
      releaseReservation: (slot, reservationId) => {
        if (slotState[slot] === SLOT_RESERVED && reservationIds[slot] === reservationId) freeSlot(slot)
      },
      stopAdmitting: () => void (draining = true),
      isEngineUp: () => engineUp,
      recentSteps: () => steps.slice()
    } satisfies GpuWorker
  })
