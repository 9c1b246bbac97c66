/**
 * Worker-thread side of GpuWorkerThread: runs a GpuWorker (engine process, step loop) on this
 * thread and bridges it to the main thread with messages (protocol in gpuWorkerThreadProtocol).
 * The sinks only pack outputs; one message per step carries every sequence's token.
 */
import { parentPort, workerData } from "node:worker_threads"
import { Effect, Fiber } from "effect"
import type { EngineError } from "../Errors.js"
import * as GpuWorker from "../GpuWorker.js"
import { FINISH_CODE, type FromWorker, type ToWorker } from "./gpuWorkerThreadProtocol.js"

const port = parentPort!
const post = (message: FromWorker, transfer?: ReadonlyArray<ArrayBuffer>) =>
  port.postMessage(message, transfer as Array<ArrayBuffer> | undefined)

const program = Effect.scoped(Effect.gen(function*() {
  const worker = yield* GpuWorker.make(workerData as GpuWorker.GpuWorkerOptions)
  const handles = new Map<number, GpuWorker.SeqHandle>()
  let out: Array<number> = []
  let failed: Array<readonly [number, string, string]> = []
  let lastStepSent: GpuWorker.StepRecord | undefined
  let flushScheduled = false
  const flush = () => {
    flushScheduled = false
    const steps = worker.recentSteps()
    const newSteps = steps.slice(lastStepSent === undefined ? 0 : steps.lastIndexOf(lastStepSent) + 1)
    lastStepSent = steps[steps.length - 1] ?? lastStepSent
    if (out.length === 0 && failed.length === 0 && newSteps.length === 0) return
    const data = Int32Array.from(out)
    post({ t: "out", data, failed, steps: newSteps }, [data.buffer])
    out = []
    failed = []
  }
  const scheduleFlush = () => {
    if (flushScheduled) return
    flushScheduled = true
    queueMicrotask(flush)
  }
  const sinkFor = (ticket: number): GpuWorker.SeqSink => ({
    onToken: (tokenId, finishReason) => {
      out.push(ticket, tokenId, finishReason === undefined ? 0 : FINISH_CODE[finishReason])
      if (finishReason !== undefined) handles.delete(ticket)
      scheduleFlush()
    },
    onFailed: (error: EngineError) => {
      handles.delete(ticket)
      failed.push([ticket, error.code, error.message])
      scheduleFlush()
    }
  })

  port.on("message", (message: ToWorker) => {
    switch (message.t) {
      case "start": {
        const started = worker.start(message.request, sinkFor(message.ticket))
        if (started._tag === "Left") {
          failed.push([message.ticket, "prompt_too_long", started.left.message])
          scheduleFlush()
        } else {
          handles.set(message.ticket, started.right)
        }
        return
      }
      case "pause":
        return handles.get(message.ticket)?.pause()
      case "resume":
        return handles.get(message.ticket)?.resume()
      case "cancel": {
        const handle = handles.get(message.ticket)
        handles.delete(message.ticket)
        return void handle?.cancel()
      }
      case "stats":
        return void Effect.runPromise(worker.stats).then((value) => post({ t: "reply", id: message.id, value }))
      case "info":
        return void Effect.runPromise(Effect.either(worker.info)).then((result) =>
          post(
            result._tag === "Right"
              ? { t: "reply", id: message.id, value: result.right }
              : { t: "replyError", id: message.id, code: result.left.code, message: result.left.message }
          )
        )
      case "close":
        return void Effect.runPromise(Fiber.interrupt(fiber)).finally(() => process.exit(0))
    }
  })
  post({ t: "ready", info: worker.engineInfo, maxModelLen: worker.maxModelLen })
  return yield* Effect.never
}))

const fiber = Effect.runFork(
  program.pipe(
    Effect.catchAll((error) => Effect.sync(() => post({ t: "error", code: error.code, message: error.message })))
  )
)
