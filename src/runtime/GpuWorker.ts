/**
 * GpuWorker: everything one GPU's runner holds for it: the engine process and its client, the
 * continuous-batching SchedulerCore with its KvBlockManager, the step loop, and the token
 * buffers of the sequences it serves. The GpuScheduler and DecodeSlot entities of that GPU are
 * pinned to this runner (shard group) and talk to it in-process.
 *
 * Step loop: schedule → one `step` request → apply the result → hand each sampled token to
 * its sequence's buffer. A buffer holding `bufferTokens` unread tokens pauses its sequence
 * (backpressure) until the reader drains half of it. Cancellation frees the sequence's blocks
 * at once; the engine is told in the next step (or a bare `release` when idle).
 */
import { Chunk, Duration, Effect, ExecutionStrategy, Exit, Fiber, Option, Queue, Schedule, Scope } from "effect"
import * as EngineClient from "./EngineClient.js"
import type { InfoReply, StepRequest } from "./EngineProtocol.js"
import { EngineError, PromptTooLong } from "./Errors.js"
import { KvBlockManager } from "./KvBlockManager.js"
import { type SamplingParams, SchedulerCore, type StepPlan, type FinishReason } from "./SchedulerCore.js"

/** What a sequence's reader receives. */
export type SeqEvent =
  | { readonly _tag: "Token"; readonly tokenId: number; readonly finishReason: FinishReason | undefined }
  | { readonly _tag: "Failed"; readonly error: EngineError }

export interface GenerateRequest {
  readonly promptTokenIds: ReadonlyArray<number>
  readonly maxTokens: number
  readonly sampling: SamplingParams
  readonly priority: number
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
}

/**
 * Where one step's time went, in ms. `engine_ms` is the engine's own `timings.total_ms`;
 * `rpc_ms - engine_ms` is IPC plus msgpack encode/decode plus reply Schema decoding.
 * TypeScript-side overhead = schedule_ms + (rpc_ms - engine_ms) + dispatch_ms.
 */
export interface StepRecord {
  readonly num_seqs: number
  readonly num_tokens: number
  readonly schedule_ms: number
  readonly rpc_ms: number
  readonly engine_ms: number
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
   * Queues a sequence; it is cancelled (blocks freed, engine told) when the scope closes
   * unless it finished first. Fails with PromptTooLong if it could never fit.
   */
  readonly generate: (request: GenerateRequest) => Effect.Effect<Sequence, PromptTooLong, Scope.Scope>
  readonly stats: Effect.Effect<StepStats>
  /** Reserves a DecodeSlot index; `undefined` when all are taken. */
  readonly acquireSlot: Effect.Effect<number | undefined>
  readonly releaseSlot: (slot: number) => Effect.Effect<void>
  /** The last steps' timings (a ring of `stepHistory` entries), oldest first. */
  readonly recentSteps: () => ReadonlyArray<StepRecord>
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
}

interface Reader {
  readonly queue: Queue.Queue<SeqEvent>
  paused: boolean
}

export const make = (options: GpuWorkerOptions): Effect.Effect<GpuWorker, EngineError, Scope.Scope> =>
  Effect.gen(function*() {
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
    const kv = new KvBlockManager(engineInfo.num_blocks, engineInfo.block_size)
    const core = new SchedulerCore(kv, {
      maxNumBatchedTokens: options.maxNumBatchedTokens,
      maxNumSeqs: options.maxNumSeqs,
      maxModelLen
    })
    const eosTokenIds: ReadonlySet<number> = new Set(engineInfo.model.eos_token_ids)
    const readers = new Map<number, Reader>()
    const wakeup = yield* Queue.sliding<void>(1)
    const wake = () => void Queue.unsafeOffer(wakeup, undefined)
    const freeSlots = Array.from({ length: options.numSlots }, (_, i) => options.numSlots - 1 - i)
    let nextSeqId = 1
    let numSteps = 0
    const stepHistory = options.stepHistory ?? 1024
    const steps: Array<StepRecord> = []

    const deliver = (seqId: number, event: SeqEvent) => {
      const reader = readers.get(seqId)
      if (reader === undefined) return
      Queue.unsafeOffer(reader.queue, event)
      if (event._tag === "Failed" || event.finishReason !== undefined) {
        readers.delete(seqId)
      } else if (!reader.paused && Option.getOrElse(reader.queue.unsafeSize(), () => 0) >= options.bufferTokens) {
        reader.paused = true
        core.setPaused(seqId, true)
      }
    }

    /** The engine failed a step: every sequence in it fails; their state is dropped on both sides. */
    const failPlan = (plan: StepPlan, error: EngineError) =>
      Effect.gen(function*() {
        yield* Effect.logWarning(`engine ${options.gpuId} step failed: ${error.code}: ${error.message}`)
        for (const item of plan.items) {
          core.cancel(item.seq_id)
          deliver(item.seq_id, { _tag: "Failed", error })
        }
        const ids = [...plan.release, ...plan.items.map((i) => i.seq_id), ...core.takePendingRelease()]
        yield* engine().release(ids).pipe(Effect.ignore)
      })

    const runStep = (plan: StepPlan, scheduleMs: number) =>
      Effect.gen(function*() {
        const request: StepRequest = plan.release.length > 0 ? { release: plan.release, seqs: plan.items } : { seqs: plan.items }
        const t0 = performance.now()
        const reply = yield* engine().step(request)
        const t1 = performance.now()
        numSteps++
        const sampled = new Map<number, number>()
        for (const out of reply.outputs) if (out.token !== undefined) sampled.set(out.seq_id, out.token)
        for (const out of core.applyStepResult(plan, sampled)) {
          deliver(out.seqId, { _tag: "Token", tokenId: out.tokenId, finishReason: out.finishReason })
        }
        if (steps.length === stepHistory) steps.shift()
        steps.push({
          num_seqs: plan.items.length,
          num_tokens: plan.numBatchedTokens,
          schedule_ms: scheduleMs,
          rpc_ms: t1 - t0,
          engine_ms: reply.timings.total_ms,
          dispatch_ms: performance.now() - t1
        })
      }).pipe(Effect.catchAll((error) => failPlan(plan, error)))

    const loop = Effect.gen(function*() {
      const t0 = performance.now()
      const plan = core.schedule()
      if (plan !== undefined) return yield* runStep(plan, performance.now() - t0)
      const release = core.takePendingRelease()
      if (release.length > 0) return yield* engine().release(release).pipe(Effect.ignore)
      yield* Queue.take(wakeup)
    }).pipe(Effect.forever)
    const loopFiber = yield* Effect.forkScoped(loop)
    yield* Effect.addFinalizer(() => Fiber.interrupt(loopFiber))

    // Supervision: when the engine process dies, every live sequence fails at once (its
    // reader gets Failed, its blocks are freed), and a new process is started with backoff.
    const supervise = Effect.gen(function*() {
      const code = yield* current.client.process.exited
      numEngineRestarts++
      const error = new EngineError({ code: "engine_exited", message: `engine ${options.gpuId} exited with code ${code}` })
      yield* Effect.logError(`${error.message}; failing its sequences and restarting it`)
      for (const seqId of [...readers.keys()]) {
        core.cancel(seqId)
        deliver(seqId, { _tag: "Failed", error })
      }
      core.takePendingRelease() // the new process starts with no sequences
      yield* Scope.close(current.scope, Exit.void) // closes the socket: pending requests fail now
      current = yield* startEngine.pipe(
        Effect.tapError((e) => Effect.logError(`engine ${options.gpuId} restart failed: ${e.message}`)),
        Effect.retry(Schedule.exponential(Duration.millis(200)).pipe(Schedule.union(Schedule.spaced(Duration.seconds(10)))))
      )
      yield* Effect.logInfo(`engine ${options.gpuId} restarted`)
      wake()
    }).pipe(Effect.forever)
    const supervisor = yield* Effect.forkScoped(supervise)
    // Stop supervising before the engines' scopes close on shutdown, or it would restart them.
    yield* Effect.addFinalizer(() => Fiber.interrupt(supervisor))

    const generate = (request: GenerateRequest) =>
      Effect.gen(function*() {
        const n = request.promptTokenIds.length
        if (n === 0 || n >= maxModelLen || kv.blocksFor(n + 1) > kv.numBlocks) {
          return yield* new PromptTooLong({ num_prompt_tokens: n, max_model_len: Math.min(maxModelLen, kv.numBlocks * kv.blockSize) })
        }
        const seqId = nextSeqId++
        const reader: Reader = { queue: yield* Queue.unbounded<SeqEvent>(), paused: false }
        yield* Effect.acquireRelease(
          Effect.sync(() => {
            readers.set(seqId, reader)
            core.add({
              seqId,
              promptTokenIds: request.promptTokenIds,
              maxTokens: request.maxTokens,
              sampling: request.sampling,
              priority: request.priority,
              eosTokenIds
            })
            wake()
          }),
          () =>
            Effect.sync(() => {
              readers.delete(seqId)
              if (core.cancel(seqId)) wake()
            })
        )
        const resumeIfDrained = Effect.sync(() => {
          if (reader.paused && Option.getOrElse(reader.queue.unsafeSize(), () => 0) <= options.bufferTokens / 2) {
            reader.paused = false
            core.setPaused(seqId, false)
            wake()
          }
        })
        const take = Queue.take(reader.queue).pipe(Effect.zipLeft(resumeIfDrained))
        const takeAvailable = (max: number) =>
          Queue.takeBetween(reader.queue, 1, max).pipe(
            Effect.map((chunk) => Chunk.toReadonlyArray(chunk)),
            Effect.zipLeft(resumeIfDrained)
          )
        return { seqId, take, takeAvailable } satisfies Sequence
      })

    return {
      gpuId: options.gpuId,
      engine,
      engineInfo,
      maxModelLen,
      generate,
      stats: Effect.sync(() => ({
        numSteps,
        numEngineRestarts,
        numRunning: core.numRunning,
        numWaiting: core.numWaiting,
        numFreeBlocks: kv.numFreeBlocks,
        numBlocks: kv.numBlocks
      })),
      acquireSlot: Effect.sync(() => freeSlots.pop()),
      releaseSlot: (slot) => Effect.sync(() => void freeSlots.push(slot)),
      recentSteps: () => steps.slice()
    } satisfies GpuWorker
  })
