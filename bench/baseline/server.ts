/**
 * The baseline: a bare node:http server with the service's routes and SSE events, and a single
 * global step loop with the sim engine's timing, and nothing else (no cluster, database,
 * actors, engine process, tokenizer). It is the limit of this machine for the benchmark's
 * traffic: the service's figures are reported next to it.
 *
 * Scheduling mirrors src/runtime/SchedulerCore.ts (vLLM v1 style, without KV limits): each
 * step, running sequences first (1 decode token each, or the rest of their prefill), then
 * waiting ones are admitted while running < max-num-seqs, all under a budget of
 * max-num-batched-tokens tokens; a chunk that completes a prompt samples a token. The step
 * sleeps `stepSeconds` (bench/baseline/stepModel.ts = the sim engine's model), then every
 * sampled token is written to its stream as `event: token`. A stream whose socket buffer holds
 * more than `client-buffer-tokens` unsent events is paused until it drains (backpressure);
 * a client that disconnects cancels its sequence.
 *
 *   node --import tsx bench/baseline/server.ts --port 0 [--max-num-seqs 2048]
 *        [--max-num-batched-tokens 8192] [--client-buffer-tokens 64] [--time-scale 1]
 *
 * Prints `READY <port>` on stdout once listening.
 */
import http from "node:http"
import { performance } from "node:perf_hooks"
import { randomUUID } from "node:crypto"
import { DEFAULT_STEP_MODEL, stepSeconds, type PassItem } from "./stepModel.js"

const arg = (name: string, fallback: number): number => {
  const i = process.argv.indexOf(`--${name}`)
  if (i < 0) return fallback
  const n = Number(process.argv[i + 1])
  if (!Number.isFinite(n) || n < 0) throw new Error(`--${name} must be a non-negative number`)
  return n
}

const options = {
  port: arg("port", 0),
  maxNumSeqs: arg("max-num-seqs", 2048),
  maxNumBatchedTokens: arg("max-num-batched-tokens", 8192),
  clientBufferTokens: arg("client-buffer-tokens", 64),
  timeScale: arg("time-scale", 1),
  /** Prompt tokens of a first turn beyond its content (the service's Qwen3 chat template adds 12). */
  firstTurnOverhead: arg("first-turn-overhead", 12),
  /** Prompt tokens each later turn adds beyond its content and the previous reply (measured: 10). */
  nextTurnOverhead: arg("next-turn-overhead", 10),
  /**
   * The service re-tokenizes the previous reply's text for the next prompt; the sim's random
   * token ids re-tokenize to ~5 % more tokens (measured: 300 → 317).
   */
  retokenizeFactor: arg("retokenize-factor", 1.05),
  maxModelLen: arg("max-model-len", 4096)
}
const model = { ...DEFAULT_STEP_MODEL, timeScale: options.timeScale }

/** Token texts of the size the sim's detokenized Qwen3 ids have (a few bytes each). */
const TEXTS = [" Sanchez", "冈", "orElse", ".clone", " Gaming", " the", "ing", " data", "_PROP", " résumé", " x", "));\n"]

interface Conversation {
  context: number
  turns: number
  busy: boolean
}

interface Seq {
  readonly id: number
  readonly res: http.ServerResponse
  readonly conversation: Conversation
  readonly conversationId: string
  readonly promptTokens: number
  readonly maxTokens: number
  /** Prompt + generated tokens so far. */
  length: number
  computed: number
  generated: number
  paused: boolean
  done: boolean
}

const conversations = new Map<string, Conversation>()
const waiting: Array<Seq> = []
const running: Array<Seq> = []
let nextSeqId = 1
let wake: (() => void) | undefined
let steps = 0

const json = (res: http.ServerResponse, status: number, body: unknown) => {
  const text = JSON.stringify(body)
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) })
  res.end(text)
}
const apiError = (res: http.ServerResponse, status: number, code: string, message: string) => json(res, status, { error: { code, message } })

const readBody = (req: http.IncomingMessage): Promise<string> =>
  new Promise((resolve, reject) => {
    let text = ""
    req.setEncoding("utf8")
    req.on("data", (d: string) => {
      text += d
      if (text.length > 1_000_000) req.destroy(new Error("body too large"))
    })
    req.on("end", () => resolve(text))
    req.on("error", reject)
  })

const remove = (queue: Array<Seq>, seq: Seq) => {
  const i = queue.indexOf(seq)
  if (i >= 0) queue.splice(i, 1)
}

const finish = (seq: Seq) => {
  if (seq.done) return
  seq.done = true
  remove(running, seq)
  remove(waiting, seq)
  seq.conversation.busy = false
}

/** Count of unsent events buffered in the response's socket path, roughly (bytes / 40). */
const lagging = (seq: Seq) => seq.res.writableLength > options.clientBufferTokens * 40

const emitToken = (seq: Seq, tokenIndex: number) => {
  const text = TEXTS[(seq.id * 31 + tokenIndex * 7) % TEXTS.length]!
  seq.res.write(`event: token\nid: ${tokenIndex}\ndata: ${JSON.stringify({ text })}\n\n`)
}

const turn = async (req: http.IncomingMessage, res: http.ServerResponse, conversationId: string) => {
  const conversation = conversations.get(conversationId)
  if (conversation === undefined) return apiError(res, 404, "conversation_not_found", `no conversation ${conversationId}`)
  let body: { role?: unknown; content?: unknown; max_tokens?: unknown }
  try {
    body = JSON.parse(await readBody(req)) as typeof body
  } catch {
    return apiError(res, 400, "invalid_request", "body is not JSON")
  }
  if (body.role !== "user" || typeof body.content !== "string" || body.content.length === 0) {
    return apiError(res, 400, "invalid_request", "expected {role: \"user\", content, max_tokens?}")
  }
  if (conversation.busy) return apiError(res, 409, "turn_in_progress", "a turn is streaming")
  const maxTokens = typeof body.max_tokens === "number" ? body.max_tokens : 256
  // Content tokens: the load generator sends n one-token words, each with its leading space.
  const contentTokens = Math.max(1, body.content.split(" ").length - 1)
  const promptTokens = conversation.turns === 0
    ? contentTokens + options.firstTurnOverhead
    : conversation.context + contentTokens + options.nextTurnOverhead
  if (promptTokens >= options.maxModelLen) return apiError(res, 400, "prompt_too_long", `prompt of ${promptTokens} tokens`)
  conversation.busy = true
  res.writeHead(200, { "content-type": "text/event-stream; charset=utf-8", "cache-control": "no-cache", "x-accel-buffering": "no", connection: "keep-alive" })
  res.flushHeaders()
  const seq: Seq = {
    id: nextSeqId++,
    res,
    conversation,
    conversationId,
    promptTokens,
    maxTokens,
    length: promptTokens,
    computed: 0,
    generated: 0,
    paused: false,
    done: false
  }
  res.on("close", () => finish(seq)) // disconnect = cancel
  res.on("drain", () => {
    if (seq.paused && !seq.done) {
      seq.paused = false
      wake?.()
    }
  })
  waiting.push(seq)
  wake?.()
}

/** Sleeps until `deadline` (performance.now() ms): a timer, then yielding turns for the last ms. */
const sleepUntil = (deadline: number): Promise<void> =>
  new Promise((resolve) => {
    const poll = () => (performance.now() >= deadline ? resolve() : setImmediate(poll))
    const ms = Math.floor(deadline - performance.now()) - 1
    if (ms > 0) setTimeout(poll, ms)
    else poll()
  })

const stepLoop = async () => {
  for (;;) {
    // Plan: running first, then admissions, under the token budget.
    let budget = options.maxNumBatchedTokens
    const items: Array<{ seq: Seq; n: number; start: number; sample: boolean }> = []
    for (const seq of running) {
      if (budget <= 0) break
      if (seq.paused) continue
      const n = Math.min(seq.length - seq.computed, budget)
      if (n <= 0) continue
      items.push({ seq, n, start: seq.computed, sample: seq.computed + n === seq.length })
      budget -= n
    }
    while (waiting.length > 0 && budget > 0 && running.length < options.maxNumSeqs) {
      const seq = waiting.shift()!
      running.push(seq)
      const n = Math.min(seq.length - seq.computed, budget)
      items.push({ seq, n, start: seq.computed, sample: seq.computed + n === seq.length })
      budget -= n
    }
    if (items.length === 0) {
      await new Promise<void>((resolve) => (wake = resolve))
      wake = undefined
      continue
    }
    const passItems: Array<PassItem> = items.map((i) => ({ numTokens: i.n, startPos: i.start }))
    const t0 = performance.now()
    await sleepUntil(t0 + stepSeconds(model, passItems) * 1000)
    steps++
    for (const { seq, n, start, sample } of items) {
      if (seq.done || seq.computed !== start) continue // cancelled during the step
      seq.computed += n
      if (!sample) continue
      const index = seq.generated
      seq.generated++
      seq.length++
      emitToken(seq, index)
      if (seq.generated >= seq.maxTokens || seq.length >= options.maxModelLen) {
        const conversation = seq.conversation
        const turnNo = conversation.turns * 2 + 1
        conversation.turns++
        conversation.context = seq.promptTokens + Math.round(seq.generated * options.retokenizeFactor)
        seq.res.end(
          `event: done\nid: ${seq.generated}\ndata: ${JSON.stringify({
            turn_id: `${seq.conversationId}:${turnNo}`,
            finish_reason: "length",
            usage: { prompt_tokens: seq.promptTokens, completion_tokens: seq.generated }
          })}\n\n`
        )
        finish(seq)
      } else if (lagging(seq)) {
        seq.paused = true
      }
    }
  }
}

const server = http.createServer((req, res) => {
  const url = req.url ?? "/"
  if (req.method === "GET" && url === "/healthz") return json(res, 200, { status: "ok" })
  if (req.method === "GET" && url === "/stats") return json(res, 200, { steps, running: running.length, waiting: waiting.length, conversations: conversations.size })
  if (req.method === "POST" && url === "/v1/conversations") {
    req.resume()
    req.on("end", () => {
      const id = `conv_${randomUUID().replace(/-/g, "")}`
      conversations.set(id, { context: 0, turns: 0, busy: false })
      json(res, 201, { conversation_id: id })
    })
    return
  }
  const m = /^\/v1\/conversations\/([A-Za-z0-9_]+)\/turns$/.exec(url)
  if (req.method === "POST" && m !== null) {
    turn(req, res, m[1]!).catch((e) => apiError(res, 500, "internal", String(e)))
    return
  }
  apiError(res, 404, "not_found", `no route ${req.method} ${url}`)
})
server.keepAliveTimeout = 60_000
server.headersTimeout = 65_000
server.maxConnections = 100_000
server.listen(options.port, "127.0.0.1", () => {
  const address = server.address()
  process.stdout.write(`READY ${typeof address === "object" && address !== null ? address.port : options.port}\n`)
})
void stepLoop()
// Nothing to flush: drop every connection and exit at once.
const stop = () => {
  server.closeAllConnections()
  process.exit(0)
}
process.on("SIGTERM", stop)
process.on("SIGINT", stop)
