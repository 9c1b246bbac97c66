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
 * resident memory for Qwen3's. Requests queue on it in order. Should it fail to start or
 * die, pending and later calls reject, and callers encode on the main thread instead.
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
parentPort.on("message", ({ id, text }) => {
  let ids
  try {
    ids = Uint32Array.from(tokenizer.encode(text, { add_special_tokens: false }).ids)
  } catch (e) {
    parentPort.postMessage({ id, error: String(e) })
    return
  }
  parentPort.postMessage({ id, ids }, [ids.buffer])
})
`

export interface OffThreadEncoder {
  /** Token ids of `text` (no special tokens added), computed on the worker; rejects if it fails. */
  readonly encode: (text: string) => Promise<Uint32Array>
}

interface Pending {
  readonly resolve: (ids: Uint32Array) => void
  readonly reject: (error: Error) => void
}

/**
 * @param modelDir a Hugging Face model directory (tokenizer.json, tokenizer_config.json): the
 *   one the main thread's tokenizer was loaded from.
 * @param idleMs how long (ms) the worker stays up with nothing to do.
 */
export const offThreadEncoder = (modelDir: string, idleMs = 30_000): OffThreadEncoder => {
  const library = createRequire(import.meta.url).resolve("@huggingface/tokenizers")
  let worker: Worker | undefined
  let nextId = 0
  const pending = new Map<number, Pending>()
  let idleTimer: NodeJS.Timeout | undefined

  const failAll = (error: Error) => {
    for (const p of pending.values()) p.reject(error)
    pending.clear()
  }
  const stop = () => {
    const w = worker
    worker = undefined
    if (w !== undefined) void w.terminate()
  }
  const start = (): Worker => {
    const w = new Worker(WORKER_SOURCE, { eval: true, workerData: { library, modelDir } })
    // Never what keeps the process alive: a pending call is the caller's to await.
    w.unref()
    w.on("message", (m: { id: number; ids?: Uint32Array; error?: string }) => {
      const p = pending.get(m.id)
      if (p === undefined) return
      pending.delete(m.id)
      if (m.ids !== undefined) p.resolve(m.ids)
      else p.reject(new Error(`off-thread encode failed: ${m.error ?? "unknown"}`))
      if (pending.size === 0) idleTimer = setTimeout(stop, idleMs).unref()
    })
    const lost = (error: Error) => {
      if (worker === w) worker = undefined
      failAll(error)
    }
    w.on("error", lost)
    w.on("exit", (code) => lost(new Error(`tokenizer worker exited with code ${code}`)))
    return w
  }

  return {
    encode: (text) =>
      new Promise<Uint32Array>((resolve, reject) => {
        if (idleTimer !== undefined) clearTimeout(idleTimer)
        idleTimer = undefined
        const id = nextId++
        pending.set(id, { resolve, reject })
        try {
          worker ??= start()
          worker.postMessage({ id, text })
        } catch (e) {
          pending.delete(id)
          reject(e instanceof Error ? e : new Error(String(e)))
        }
      })
  }
}
