/**
 * Encodes text on a worker thread, so that a long message does not hold the event loop.
 *
 * @huggingface/tokenizers encodes at 2–10 µs a character (measured on this project's Qwen3
 * tokenizer: 65,536 random CJK characters, one pre-token, take ~700 ms; 65,000 characters of
 * short words ~150 ms), and a message may hold 65,536 characters. On the event loop that is a
 * stall for every stream, health check and shard-lock refresh of the runner. The worker loads
 * its own copy of the same tokenizer.json and tokenizer_config.json with the same library, so
 * its ids are the ones the main thread would compute.
 *
 * One worker, started on first use (~0.4 s to load the vocabulary, off the event loop) and
 * stopped after `idleMs` without work: it holds its own copy of the tokenizer, ~130 MB of
 * resident memory for Qwen3's. Jobs wait here in order and go to the worker one at a time, so
 * a job whose caller went away (its signal aborted) before its turn is dropped, not encoded.
 * Should the worker fail to start or die, its job and the waiting ones reject, and callers
 * encode on the main thread instead; the next job starts a new worker.
 */
import { createRequire } from "node:module"
import { Worker } from "node:worker_threads"

/** The worker's program (CommonJS, `eval`): no file of its own to locate under dist/ or tsx. */
const WORKER_SOURCE = `
const { parentPort, workerData } = require("node:worker_threads")
const { readFileSync } = require("node:fs")
const { join } = require("node:path")
const { Tokenizer } = require(workerData.library)
const read = (name) => JSON.parse(readFileSync(join(workerData.modelDir, name), "utf8"))
const tokenizer = new Tokenizer(read("tokenizer.json"), read("tokenizer_config.json"))
parentPort.on("message", (texts) => {
  let encoded
  try {
    encoded = texts.map((text) => Uint32Array.from(tokenizer.encode(text, { add_special_tokens: false }).ids))
  } catch (e) {
    parentPort.postMessage({ error: String(e) })
    return
  }
  parentPort.postMessage({ encoded }, encoded.map((ids) => ids.buffer))
})
`

export interface OffThreadEncoder {
  /**
   * Token ids of each of `texts` (no special tokens added), computed on the worker. Rejects if
   * the worker fails, or with an AbortError once `signal` aborts before the job started.
   */
  readonly encode: (texts: ReadonlyArray<string>, signal?: AbortSignal) => Promise<Array<Uint32Array>>
}

interface Job {
  readonly texts: ReadonlyArray<string>
  readonly signal: AbortSignal | undefined
  readonly resolve: (encoded: Array<Uint32Array>) => void
  readonly reject: (error: Error) => void
}

/**
 * @param modelDir a Hugging Face model directory (tokenizer.json, tokenizer_config.json): the
 *   one the main thread's tokenizer was loaded from.
 * @param idleMs how long (ms) the worker stays up with nothing to do.
 */
export const offThreadEncoder = (modelDir: string, idleMs = 30_000): OffThreadEncoder => {
  const library = createRequire(import.meta.url).resolve("@huggingface/tokenizers")
  const waiting: Array<Job> = []
  let worker: Worker | undefined
  /** The job on `worker` now. */
  let running: Job | undefined
  let idleTimer: NodeJS.Timeout | undefined

  const stop = () => {
    const w = worker
    worker = undefined
    // Its exit is expected: nothing runs on it.
    if (w !== undefined) void w.terminate()
  }
  const start = (): Worker => {
    const w = new Worker(WORKER_SOURCE, { eval: true, workerData: { library, modelDir } })
    // Never what keeps the process alive: a waiting caller holds its own promise.
    w.unref()
    w.on("message", (m: { encoded?: Array<Uint32Array>; error?: string }) => {
      const job = running
      running = undefined
      if (job !== undefined) {
        if (m.encoded !== undefined) job.resolve(m.encoded)
        else job.reject(new Error(`off-thread encode failed: ${m.error ?? "unknown"}`))
      }
      next()
    })
    // Only the current worker's loss fails jobs; one stopped when idle had none.
    const lost = (error: Error) => {
      if (worker !== w) return
      worker = undefined
      const job = running
      running = undefined
      job?.reject(error)
      for (const j of waiting.splice(0)) j.reject(error)
    }
    w.on("error", lost)
    w.on("exit", (code) => lost(new Error(`tokenizer worker exited with code ${code}`)))
    return w
  }
  const next = () => {
    if (running !== undefined) return
    let job = waiting.shift()
    while (job !== undefined && job.signal?.aborted === true) {
      job.reject(new Error("AbortError: the caller went away"))
      job = waiting.shift()
    }
    if (job === undefined) {
      if (worker !== undefined) idleTimer = setTimeout(stop, idleMs).unref()
      return
    }
    if (idleTimer !== undefined) clearTimeout(idleTimer)
    idleTimer = undefined
    try {
      worker ??= start()
      running = job
      worker.postMessage(job.texts)
    } catch (e) {
      running = undefined
      job.reject(e instanceof Error ? e : new Error(String(e)))
      next()
    }
  }

  return {
    encode: (texts, signal) =>
      new Promise<Array<Uint32Array>>((resolve, reject) => {
        waiting.push({ texts, signal, resolve, reject })
        next()
      })
  }
}
