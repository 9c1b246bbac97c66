/**
 * The browser's client of the HTTP API (README "API"): every call sends the stored key as a
 * Bearer token; every non-2xx answer becomes an `ApiError` with the body's code and message
 * and, for 429 and 503, the `Retry-After` seconds.
 */
import { makeParser } from "@effect/experimental/Sse"

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    /** Seconds from `Retry-After`, when the server sent one. */
    readonly retryAfterS: number | undefined
  ) {
    super(message)
  }
}

export interface Turn {
  readonly turn_id: string
  readonly seq: number
  readonly role: "system" | "user" | "assistant"
  readonly content: string
  readonly status: "completed" | "cancelled" | "failed" | "filtered"
}

export interface HistoryPage {
  readonly turns: ReadonlyArray<Turn>
  readonly next_cursor: string | null
  readonly zero_retention?: boolean
}

export interface ConversationListItem {
  readonly conversation_id: string
  readonly model: string
  readonly title: string
  readonly created_at_ms: number
}

export interface MemoryFact {
  readonly fact_id: string
  readonly content: string
  readonly created_at_ms: number
}

export interface Usage {
  readonly prompt_tokens: number
  readonly completion_tokens: number
}

/** One event of a turn's stream (`token`, then one `done` or `error`). */
export type TurnEvent =
  | { readonly kind: "token"; readonly id: string; readonly text: string }
  | { readonly kind: "done"; readonly turnId: string; readonly finishReason: string; readonly usage: Usage }
  | { readonly kind: "error"; readonly code: string; readonly message: string }

export interface Client {
  readonly request: <A>(method: string, path: string, body?: unknown, headers?: Record<string, string>) => Promise<A>
  /** The raw response of a request (for streams); errors as `request`. */
  readonly open: (method: string, path: string, body?: unknown, headers?: Record<string, string>, signal?: AbortSignal) => Promise<Response>
}

const errorOf = async (response: Response): Promise<ApiError> => {
  const retry = response.headers.get("retry-after")
  let code = `http_${response.status}`
  let message = response.statusText || `HTTP ${response.status}`
  try {
    const body = await response.json() as { error?: { code?: string; message?: string } }
    if (typeof body.error?.code === "string") code = body.error.code
    if (typeof body.error?.message === "string") message = body.error.message
  } catch {
    // not JSON: keep the status line
  }
  return new ApiError(response.status, code, message, retry === null ? undefined : Number(retry))
}

/** A client sending `key` (none: the service runs without authentication). */
export const makeClient = (key: string | undefined): Client => {
  const open = async (method: string, path: string, body?: unknown, headers: Record<string, string> = {}, signal?: AbortSignal) => {
    const all: Record<string, string> = { ...headers }
    if (key !== undefined && key !== "") all["authorization"] = `Bearer ${key}`
    if (body !== undefined) all["content-type"] = "application/json"
    const init: RequestInit = { method, headers: all }
    if (body !== undefined) init.body = JSON.stringify(body)
    if (signal !== undefined) init.signal = signal
    const response = await fetch(path, init)
    if (!response.ok) throw await errorOf(response)
    return response
  }
  return {
    open,
    request: async <A>(method: string, path: string, body?: unknown, headers?: Record<string, string>) => {
      const response = await open(method, path, body, headers)
      if (response.status === 204) return undefined as A
      return await response.json() as A
    }
  }
}

/**
 * Reads one SSE response to its end, calling `onEvent` for each turn event (with the
 * Sse parser of @effect/experimental). @returns whether a final event (`done`/`error`) came:
 * false means the connection ended first (a network drop), and the caller resumes.
 */
export const readTurnEvents = async (response: Response, onEvent: (event: TurnEvent) => void): Promise<boolean> => {
  if (response.body === null) return false
  let final = false
  const parser = makeParser((e) => {
    if (e._tag !== "Event") return
    const data = JSON.parse(e.data) as Record<string, any>
    if (e.event === "token") onEvent({ kind: "token", id: e.id ?? "", text: String(data["text"] ?? "") })
    else if (e.event === "done") {
      final = true
      onEvent({ kind: "done", turnId: String(data["turn_id"]), finishReason: String(data["finish_reason"]), usage: data["usage"] as Usage })
    } else if (e.event === "error") {
      final = true
      onEvent({ kind: "error", code: String(data["error"]?.code ?? "error"), message: String(data["error"]?.message ?? "") })
    }
  })
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader()
  try {
    for (;;) {
      const { done, value } = await reader.read()
      if (done) break
      parser.feed(value)
      if (final) break
    }
  } catch {
    // the connection dropped mid-stream
  } finally {
    reader.cancel().catch(() => {})
  }
  return final
}

/** How a turn's stream is being read, for the page to show. */
export interface TurnCallbacks {
  readonly onEvent: (event: TurnEvent) => void
  /** The connection dropped; attempt `n` to resume starts in `delayMs`. */
  readonly onReconnect?: (n: number, delayMs: number) => void
}

const MAX_RESUMES = 12

/** How following a turn ended: its final event came, there was nothing to follow (204), or the page stopped reading. */
export type FollowEnd = "ended" | "nothing" | "aborted"

/**
 * Follows a turn's stream to its end across connection drops. `open(lastEventId, attempt)`
 * opens attempt 0 (the turn's POST, or a resume after a page reload) and each later one, after
 * a drop, with the id of the last token event seen: the caller resumes with `GET …/stream`
 * and `Last-Event-ID` (so no token is shown twice or lost) or, before any token, sends the
 * turn's POST again with the same `Idempotency-Key` (the server answers with that turn's
 * stream, never a second turn). `open` returns undefined for a 204 (nothing more to send: the
 * turn ended meanwhile). An `ApiError` ends the turn; a network error is retried like a drop;
 * `signal` (the page leaving) stops it.
 */
export const followTurn = async (
  open: (lastEventId: string | undefined, attempt: number) => Promise<Response | undefined>,
  callbacks: TurnCallbacks,
  signal?: AbortSignal
): Promise<FollowEnd> => {
  let lastEventId: string | undefined
  const onEvent = (e: TurnEvent) => {
    if (e.kind === "token") lastEventId = e.id
    callbacks.onEvent(e)
  }
  const aborted = () => signal?.aborted === true
  for (let attempt = 0; ; attempt++) {
    if (aborted()) return "aborted"
    let response: Response | undefined | null
    try {
      response = await open(lastEventId, attempt)
    } catch (e) {
      if (aborted()) return "aborted"
      if (e instanceof ApiError) throw e
      response = null
    }
    if (response === undefined) return "nothing"
    if (response !== null && await readTurnEvents(response, onEvent)) return "ended"
    if (aborted()) return "aborted"
    if (attempt >= MAX_RESUMES) {
      throw new ApiError(0, "network_error", "The connection keeps dropping; reload the page to see the reply", undefined)
    }
    const delayMs = Math.min(4000, 250 * 2 ** attempt)
    callbacks.onReconnect?.(attempt + 1, delayMs)
    await new Promise((r) => setTimeout(r, delayMs))
  }
}

/** `204 No Content` as `undefined`, any other response as it is. */
export const unlessNoContent = (response: Response): Response | undefined => response.status === 204 ? undefined : response
