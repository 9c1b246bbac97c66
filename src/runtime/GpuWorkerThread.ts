/**
 * GpuWorkerThread: a GpuWorker whose step loop (engine process, SchedulerCore, ZeroMQ client)
 * runs on a worker thread of its own. The main thread keeps the HTTP sockets, the actors and
 * the per-token work (detokenization, SSE writes); the step loop only schedules, talks to the
 * engine and posts one message per step. Why: on the main thread an engine reply waited for a
 * busy event loop (measured at 1024 streams on 2 cores: 15–27 ms p50 per ~57 ms step), and
 * the GPU idled meanwhile. Here the next step leaves as soon as the reply is in.
 *
 * Same contract as GpuWorker.make, with one difference: `pause`, `resume` and `cancel` reach
 * the step loop one message later (microseconds when the main thread is not stalled), so
 * a cancelled sequence's blocks are free by the step after the message lands.
 */
import { Worker } from "node:worker_threads"
import { Deferred, Duration, Effect, Either, Exit, Scope } from "effect"
import type { InfoReply } from "./EngineProtocol.js"
import { EngineError, type PromptTooLong } from "./Errors.js"
import {
  checkPrompt,
  generateFrom,
  type GenerateRequest,
  type GpuWorker,
  type GpuWorkerOptions,
  type SeqHandle,
  type SeqSink,
  type StepRecord,
  type StepStats
} from "./GpuWorker.js"
import { FINISH_REASON, type FromWorker, type ToWorker } from "./internal/gpuWorkerThreadProtocol.js"

export const make = (options: GpuWorkerOptions): Effect.Effect<GpuWorker, EngineError, Scope.Scope> =>
  Effect.gen(function*() {
    const thread = new Worker(new URL("./internal/gpuWorkerThreadBoot.mjs", import.meta.url), { workerData: options })
    const post = (message: ToWorker) => thread.postMessage(message)
    const ready = yield* Deferred.make<{ readonly info: InfoReply; readonly maxModelLen: number }, EngineError>()
    const sinks = new Map<number, SeqSink>()
    const replies = new Map<number, (message: FromWorker) => void>()
    const stepHistory = options.stepHistory ?? 1024
    const steps: Array<StepRecord> = []
    let nextTicket = 1
    let nextRequestId = 1
    let exited = false

    const failAll = (error: EngineError) => {
      const all = [...sinks.values()]
      sinks.clear()
      for (const sink of all) sink.onFailed(error)
    }
    thread.on("message", (message: FromWorker) => {
      switch (message.t) {
        case "ready":
          return Deferred.unsafeDone(ready, Exit.succeed(message))
        case "error":
          return Deferred.unsafeDone(ready, Exit.fail(new EngineError({ code: message.code, message: message.message })))
        case "out": {
          const data = message.data
          for (let i = 0; i < data.length; i += 3) {
            const ticket = data[i]!
            const sink = sinks.get(ticket)
            if (sink === undefined) continue
            const finishReason = FINISH_REASON[data[i + 2]!]
            if (finishReason !== undefined) sinks.delete(ticket)
            sink.onToken(data[i + 1]!, finishReason)
          }
          for (const [ticket, code, text] of message.failed) {
            const sink = sinks.get(ticket)
            sinks.delete(ticket)
            sink?.onFailed(new EngineError({ code, message: text }))
          }
          for (const step of message.steps) {
            if (steps.length === stepHistory) steps.shift()
            steps.push(step)
          }
          return
        }
        case "reply":
        case "replyError": {
          const resume = replies.get(message.id)
          replies.delete(message.id)
          return resume?.(message)
        }
      }
    })
    thread.on("error", (e) => {
      const error = new EngineError({ code: "worker_failed", message: `step loop thread failed: ${e.message}` })
      Deferred.unsafeDone(ready, Exit.fail(error))
      failAll(error)
    })
    thread.on("exit", (code) => {
      exited = true
      const error = new EngineError({ code: "worker_exited", message: `step loop thread exited with ${code}` })
      Deferred.unsafeDone(ready, Exit.fail(error))
      failAll(error)
      for (const resume of replies.values()) resume({ t: "replyError", id: 0, code: error.code, message: error.message })
      replies.clear()
    })
    yield* Effect.addFinalizer(() =>
      Effect.async<void>((resume) => {
        if (exited) return resume(Effect.void)
        thread.once("exit", () => resume(Effect.void))
        post({ t: "close" })
      }).pipe(
        Effect.timeout(Duration.seconds(10)),
        Effect.catchAll(() => Effect.promise(() => thread.terminate())),
        Effect.asVoid
      )
    )

    const { info: engineInfo, maxModelLen } = yield* Deferred.await(ready)

    const request = <A>(t: "stats" | "info") =>
      Effect.async<A, EngineError>((resume) => {
        if (exited) return resume(Effect.fail(new EngineError({ code: "worker_exited", message: "step loop thread is gone" })))
        const id = nextRequestId++
        replies.set(id, (message) =>
          resume(
            message.t === "reply"
              ? Effect.succeed(message.value as A)
              : Effect.fail(new EngineError({ code: (message as { code: string }).code, message: (message as { message: string }).message }))
          ))
        post({ t, id })
      })

    const start = (req: GenerateRequest, sink: SeqSink): Either.Either<SeqHandle, PromptTooLong> => {
      const tooLong = checkPrompt(req.promptTokenIds.length, maxModelLen, engineInfo.num_blocks, engineInfo.block_size)
      if (tooLong !== undefined) return Either.left(tooLong)
      const ticket = nextTicket++
      sinks.set(ticket, sink)
      post({ t: "start", ticket, request: req })
      return Either.right({
        seqId: ticket,
        pause: () => post({ t: "pause", ticket }),
        resume: () => post({ t: "resume", ticket }),
        cancel: () => {
          const live = sinks.delete(ticket)
          if (live) post({ t: "cancel", ticket })
          return live
        }
      })
    }

    // Slots are handed out here: admission needs no round trip to the thread.
    const freeSlots = Array.from({ length: options.numSlots }, (_, i) => options.numSlots - 1 - i)
    return {
      gpuId: options.gpuId,
      engineInfo,
      info: request<InfoReply>("info"),
      maxModelLen,
      start,
      generate: generateFrom(start, options.bufferTokens),
      stats: request<StepStats>("stats").pipe(Effect.orDie),
      acquireSlot: Effect.sync(() => freeSlots.pop()),
      releaseSlot: (slot) => Effect.sync(() => void freeSlots.push(slot)),
      recentSteps: () => steps.slice()
    } satisfies GpuWorker
  })
