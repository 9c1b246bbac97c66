/**
 * The HTTP/SSE client of the load generator: node:http with one keep-alive agent (no socket
 * limit), a minimal SSE parser that timestamps every `event: token` on arrival.
 */
import http from "node:http"
import { performance } from "node:perf_hooks"

export const makeAgent = (): http.Agent => new http.Agent({ keepAlive: true, maxSockets: Infinity, maxFreeSockets: 4096, keepAliveMsecs: 10_000 })

export type ErrorKind = "http" | "sse_error" | "no_done" | "network"

export interface TurnResult {
  /** performance.now() when the request was sent. */
  readonly start: number
  /** Arrival times (performance.now()) of the token events. */
  readonly tokenTimes: Array<number>
  /** When the stream ended (done, error or close). */
  end: number
  ok: boolean
  error?: { kind: ErrorKind; message: string }
  promptTokens?: number
  completionTokens?: number
  /** usage.prompt_tokens_details.cached_tokens: prompt tokens served from the prefix cache. */
  cachedTokens?: number
  /** Aborted by the load generator itself (end of a measurement window): not an error. */
  aborted: boolean
}

export interface Target {
  readonly host: string
  readonly port: number
  readonly agent: http.Agent
  /** Sent as `Authorization` on every request (a service with authentication on). */
  readonly authorization?: string | undefined
}

interface Sent {
  /** Destroys the request in flight (the current attempt). */
  readonly destroy: () => void
}

/**
 * POSTs JSON. A request that fails with ECONNRESET on a reused keep-alive socket before any
 * response (the server closed the idle socket as we reused it: the request was never
 * processed) is sent again, up to 3 times, as Node's documentation of `request.reusedSocket`
 * advises. Retries are counted in `retries`.
 */
const request = (
  target: Target,
  path: string,
  body: unknown,
  onResponse: (res: http.IncomingMessage) => void,
  onError: (e: Error) => void,
  signal?: AbortSignal
): Sent => {
  const payload = JSON.stringify(body)
  let current: http.ClientRequest
  const send = (attempt: number) => {
    let responded = false
    const req = http.request({
      host: target.host,
      port: target.port,
      path,
      method: "POST",
      agent: target.agent,
      ...(signal === undefined ? {} : { signal }),
      headers: {
        "content-type": "application/json",
        "content-length": Buffer.byteLength(payload),
        accept: "text/event-stream",
        ...(target.authorization === undefined ? {} : { authorization: target.authorization })
      }
    }, (res) => {
      responded = true
      onResponse(res)
    })
    current = req
    req.on("error", (e: NodeJS.ErrnoException) => {
      if (!responded && req.reusedSocket && e.code === "ECONNRESET" && attempt < 3 && signal?.aborted !== true) {
        retries.count++
        send(attempt + 1)
      } else {
        onError(new Error(`${e.message} (${req.reusedSocket ? "reused" : "new"} socket, attempt ${attempt + 1})`))
      }
    })
    req.end(payload)
  }
  send(0)
  return { destroy: () => current.destroy() }
}

/** Requests re-sent after a keep-alive race (see `request`). */
export const retries = { count: 0 }

/** POST /v1/conversations → conversation id. */
export const createConversation = (target: Target, signal?: AbortSignal): Promise<string> =>
  new Promise((resolve, reject) => {
    request(target, "/v1/conversations", {}, (res) => {
      let text = ""
      res.setEncoding("utf8")
      res.on("data", (d: string) => (text += d))
      res.on("end", () => {
        if (res.statusCode !== 201 && res.statusCode !== 200) return reject(new Error(`create conversation: HTTP ${res.statusCode}: ${text.slice(0, 200)}`))
        try {
          resolve((JSON.parse(text) as { conversation_id: string }).conversation_id)
        } catch (e) {
          reject(new Error(`create conversation: bad body ${text.slice(0, 200)}`))
        }
      })
      res.on("error", reject)
    }, reject, signal)
  })

export interface Turn {
  readonly result: TurnResult
  readonly finished: Promise<TurnResult>
  /** Disconnects (the service cancels the generation). */
  readonly abort: () => void
  /** Stops reading (the socket is paused: TCP backpressure) / resumes. */
  readonly pause: () => void
  readonly resume: () => void
}

/**
 * POST /v1/conversations/{id}/turns and read its SSE stream. `onToken` runs for every token
 * event (for live throughput counters).
 */
export const streamTurn = (
  target: Target,
  conversationId: string,
  content: string,
  maxTokens: number,
  onToken?: (now: number) => void
): Turn => {
  const result: TurnResult = { start: performance.now(), tokenTimes: [], end: 0, ok: false, aborted: false }
  let settle!: (r: TurnResult) => void
  const finished = new Promise<TurnResult>((resolve) => (settle = resolve))
  let done = false
  let response: http.IncomingMessage | undefined
  let pauseRequested = false
  const finish = (ok: boolean, error?: { kind: ErrorKind; message: string }) => {
    if (done) return
    done = true
    result.end = performance.now()
    result.ok = ok
    if (error !== undefined && !result.aborted) result.error = error
    settle(result)
  }
  const req = request(target, `/v1/conversations/${conversationId}/turns`, { role: "user", content, max_tokens: maxTokens }, (res) => {
    response = res
    res.setEncoding("utf8")
    if (pauseRequested) res.pause()
    if (res.statusCode !== 200) {
      let text = ""
      res.on("data", (d: string) => (text += d))
      res.on("end", () => finish(false, { kind: "http", message: `HTTP ${res.statusCode}: ${text.slice(0, 200)}` }))
      res.on("error", (e) => finish(false, { kind: "network", message: e.message }))
      return
    }
    let buffer = ""
    res.on("data", (chunk: string) => {
      const now = performance.now()
      buffer += chunk
      let sep: number
      while ((sep = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, sep)
        buffer = buffer.slice(sep + 2)
        if (block.startsWith("event: token")) {
          result.tokenTimes.push(now)
          onToken?.(now)
        } else if (block.startsWith("event: done")) {
          const data = block.slice(block.indexOf("data: ") + 6)
          try {
            const usage = (JSON.parse(data) as {
              usage?: { prompt_tokens?: number; completion_tokens?: number; prompt_tokens_details?: { cached_tokens?: number } }
            }).usage
            if (usage?.prompt_tokens !== undefined) result.promptTokens = usage.prompt_tokens
            if (usage?.completion_tokens !== undefined) result.completionTokens = usage.completion_tokens
            if (usage?.prompt_tokens_details?.cached_tokens !== undefined) result.cachedTokens = usage.prompt_tokens_details.cached_tokens
          } catch {
            // usage is informative only
          }
          // The server ends the response after done; the socket goes back to the agent.
          finish(true)
          return
        } else if (block.startsWith("event: error")) {
          finish(false, { kind: "sse_error", message: block.slice(block.indexOf("data: ") + 6, 300) })
          return
        }
        // keep-alive comments and unknown events are ignored
      }
    })
    res.on("end", () => finish(false, { kind: "no_done", message: "stream ended without done" }))
    res.on("close", () => finish(false, { kind: "no_done", message: "stream closed without done" }))
    res.on("error", (e) => finish(false, { kind: "network", message: e.message }))
  }, (e) => finish(false, { kind: "network", message: e.message }))
  return {
    result,
    finished,
    abort: () => {
      if (done) return
      result.aborted = true
      req.destroy()
      finish(false)
    },
    pause: () => {
      pauseRequested = true
      response?.pause()
    },
    resume: () => {
      pauseRequested = false
      response?.resume()
    }
  }
}
