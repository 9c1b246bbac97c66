/**
 * The HTTP server: the API with its handlers, served by NodeHttpServer.
 *
 * - `layer`: everything from config (`PORT` default 8080, `HOST` optional, `CORS_ORIGINS`, `API_KEYS`,
 *   `SSE_KEEPALIVE_INTERVAL`, `MAX_BODY_BYTES`, `HTTP_HEADERS_TIMEOUT_MS`,
 *   `HTTP_REQUEST_TIMEOUT_MS`, `MAX_CONNECTIONS_PER_CLIENT`); needs only `Conversations`.
 * - `layerServe`: the API on whatever `HttpServer` is provided (compose your own server).
 * - `layerTest`: on a random local port, with an `HttpClient` pointed at it.
 */
import {
  type HttpApi,
  HttpApiBuilder,
  HttpApiError,
  type HttpApp,
  type HttpClient,
  HttpIncomingMessage,
  type HttpRouter,
  HttpServer,
  HttpServerError,
  HttpServerRequest,
  HttpServerResponse
} from "@effect/platform"
import { NodeHttpClient, NodeHttpServer, NodeHttpServerRequest } from "@effect/platform-node"
import { Cause, Config, ConfigError, Context, Effect, Either, Layer, Option } from "effect"
import { isUtf8 } from "node:buffer"
import { createServer, type IncomingMessage, type ServerResponse } from "node:http"
import type { ListenOptions, Socket } from "node:net"
import { Conversations as ConversationsTag } from "../runtime/Conversations.js"
import type { TopologyService } from "../runtime/Topology.js"
import type { Metrics } from "../runtime/Metrics.js"
import type { RunnerStatusView } from "../runtime/RunnerStatus.js"
import type { Conversations } from "../runtime/Conversations.js"
import { Api } from "./Api.js"
import * as ApiError from "./ApiError.js"
import * as Auth from "./Auth.js"
import * as Edge from "./Edge.js"
import * as RateLimits from "./RateLimits.js"
import type { RateLimiterStore } from "@effect/experimental/RateLimiter"
import * as Handlers from "./Handlers.js"
import * as Web from "./Web.js"
import { makeUnrouted } from "./internal/unrouted.js"
import { SseSettings } from "./Sse.js"

/** A decode error's issues as one line (ApiError.formatIssues). */
const formatIssues = (error: HttpApiError.HttpApiDecodeError): string => ApiError.formatIssues(error.issues, error.message)

/**
 * `application/json`, with parameters or none, or no type at all. Not `application/*+json`: the
 * route's body decoder reads only `application/json` as JSON, and waited for ever on the others
 * (their body already read here).
 */
const isJsonContentType = (contentType: string | undefined): boolean =>
  contentType === undefined || contentType === "" || /^application\/json\s*(;|$)/i.test(contentType.trim())

/**
 * Deepest nesting of arrays and objects in a JSON text (strings skipped), counted without
 * parsing it, so that a hostile body cannot reach a recursive decoder.
 */
export const jsonDepth = (text: string): number => {
  let depth = 0
  let max = 0
  let inString = false
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i)
    if (inString) {
      if (c === 92) i++ // backslash: skip the escaped char
      else if (c === 34) inString = false
    } else if (c === 34) inString = true
    else if (c === 123 || c === 91) {
      if (++depth > max) max = depth
    } else if (c === 125 || c === 93) depth--
  }
  return max
}

/** Limits on what a request may send (`MAX_BODY_BYTES`, default 1 MiB; JSON nesting at most 32). */
export class RequestLimits extends Context.Reference<RequestLimits>()("chat/http/RequestLimits", {
  defaultValue: (): { readonly maxBodyBytes: number; readonly maxJsonDepth: number } => ({
    maxBodyBytes: 1024 * 1024,
    maxJsonDepth: 32
  })
}) {
  static readonly layerConfig = Layer.effect(
    RequestLimits,
    Effect.map(
      Config.integer("MAX_BODY_BYTES").pipe(Config.withDefault(1024 * 1024)),
      (maxBodyBytes) => ({ maxBodyBytes, maxJsonDepth: 32 })
    )
  )
}

const isMaxBytesExceeded = (e: HttpServerError.RequestError): boolean =>
  e.cause instanceof Error && e.cause.message === "maxBytes exceeded"

/** How much of an over-long body `discardBody` reads, at most (bytes and ms). */
const DISCARD_MAX_BYTES = 256 * 1024 * 1024
const DISCARD_MAX_MS = 10_000

/**
 * Reads and drops what is left of a request body, up to DISCARD_MAX_BYTES or DISCARD_MAX_MS,
 * then calls `done` once, so that the error response written after it reaches its client. A
 * client (fetch, Python's urllib) writes its whole body before it reads the answer; a server
 * that closes with the body unread makes the kernel reset the connection, and the client sees
 * EPIPE or ECONNRESET instead of the error (nginx's "lingering close" does the same for this
 * reason). Past either cap the connection is simply closed. @returns a function that stops
 * reading without calling `done`.
 */
const dropBody = (incoming: IncomingMessage, done: () => void): () => void => {
  let numBytes = 0
  const onData = (chunk: Buffer) => {
    numBytes += chunk.length
    if (numBytes > DISCARD_MAX_BYTES) finish()
  }
  const timer = setTimeout(() => finish(), DISCARD_MAX_MS)
  const cleanup = () => {
    clearTimeout(timer)
    incoming.off("data", onData)
    incoming.off("end", finish)
    incoming.off("error", finish)
    incoming.off("close", finish)
  }
  function finish() {
    cleanup()
    done()
  }
  if (incoming.complete) {
    finish()
    return cleanup
  }
  incoming.on("data", onData)
  incoming.once("end", finish)
  incoming.once("error", finish)
  incoming.once("close", finish)
  incoming.resume()
  return cleanup
}

/** `dropBody` as an Effect: interrupting it stops the reading. */
const discardBody = (incoming: IncomingMessage): Effect.Effect<void> =>
  Effect.async<void>((resume) => {
    const stop = dropBody(incoming, () => resume(Effect.void))
    return Effect.sync(stop)
  })

/**
 * What came of a request body, as Node's parser handed it over (through `push`, which
 * `trackBody` wraps from the `request` event on: the parser may push a body before the
 * request's fiber runs), for methods that take one:
 * - `chunks`: its bytes, while `recording`, for `guardRequest`'s UTF-8 check (the body reader
 *   decodes invalid UTF-8 to U+FFFD, and only the bytes tell that from a U+FFFD that was
 *   sent). They are slices of the socket's read buffers: dropped once checked, and never kept
 *   of a body that is being discarded;
 * - `maxBytes`: a cap that `guardRequest` sets on a body of undeclared length (chunked): past
 *   it the rest is read from the socket and dropped rather than buffered, so the body reader
 *   sees at most `maxBytes` and the body's end, and `overflowed` says the body was longer.
 *   (The platform's own limit destroys the request, so the client would see a reset instead
 *   of the 413.) Past DISCARD_MAX_BYTES the request is destroyed after all.
 */
interface BodyTracker {
  readonly chunks: Array<Buffer>
  recording: boolean
  maxBytes: number
  numBytes: number
  overflowed: boolean
}

const bodyTrackers = new WeakMap<IncomingMessage, BodyTracker>()

const trackBody = (request: IncomingMessage): void => {
  const tracker: BodyTracker = { chunks: [], recording: true, maxBytes: Infinity, numBytes: 0, overflowed: false }
  bodyTrackers.set(request, tracker)
  const push = request.push.bind(request)
  request.push = (chunk: unknown, encoding?: BufferEncoding): boolean => {
    if (chunk === null || chunk === undefined) return push(chunk, encoding)
    tracker.numBytes += (chunk as { length: number }).length
    if (tracker.numBytes > tracker.maxBytes) {
      tracker.overflowed = true
      if (tracker.numBytes > DISCARD_MAX_BYTES) request.destroy()
      return true
    }
    if (tracker.recording && Buffer.isBuffer(chunk)) tracker.chunks.push(chunk)
    return push(chunk, encoding)
  }
}

/**
 * Headers a request may send once: Node keeps the first `Authorization` of several and joins
 * other duplicates with ", " (two `Idempotency-Key`s would make a third key).
 */
const SINGLE_HEADERS: ReadonlyMap<string, string> = new Map([
  ["authorization", "Authorization"],
  ["idempotency-key", "Idempotency-Key"],
  ["last-event-id", "Last-Event-ID"],
  // Node keeps the first of two and drops the other: which one the body is would depend on order.
  ["content-type", "Content-Type"]
])

/**
 * RFC 3986 `host [":" port]`: an IP literal, or a reg-name of its characters, not empty (an
 * `http` URI with an empty host is invalid, RFC 9110 §4.2.1).
 */
const HOST_VALUE = /^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]*)?$/

/** Why a request's Host header makes it a 400 (RFC 9112 §3.2), if it does. */
const hostHeaderProblem = (request: IncomingMessage): string | undefined => {
  const raw = request.rawHeaders
  let count = 0
  for (let i = 0; i < raw.length; i += 2) if (raw[i]!.length === 4 && raw[i]!.toLowerCase() === "host") count++
  if (count === 0) return request.httpVersion === "1.1" ? "An HTTP/1.1 request needs a Host header" : undefined
  if (count > 1) return "More than one Host header"
  return HOST_VALUE.test(request.headers.host ?? "") ? undefined : "The Host header is not a host[:port]"
}

/**
 * Checks what every route must satisfy before any handler reads the request:
 * - one `Authorization`, `Idempotency-Key`, `Last-Event-ID` and `Content-Type` header at most
 *   (a request with two is ambiguous, so it is a 400);
 * - a JSON body (or none, whatever its declared type: `fetch` sends `text/plain` with an empty
 *   string): HttpApiBuilder would otherwise decode a form or text body into something the
 *   schema rejects with a confusing message (`curl -d` sends a form type);
 * - at most `maxBodyBytes`: a `Content-Length` above it is a 413, and a chunked body is kept
 *   up to the limit only; the text read here is what the route decodes (the request caches
 *   it). The rest of an over-long body is read and dropped before the 413 goes out (see
 *   `discardBody` and `BodyTracker`), so that the client gets it;
 * - valid UTF-8: where the decoded text holds a U+FFFD, the bytes that came are checked;
 * - nesting at most `maxJsonDepth` deep, checked before anything parses it.
 */
const guardRequest = <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | ApiError.ApiError, R> =>
  Effect.gen(function*() {
    const request = yield* HttpServerRequest.HttpServerRequest
    const raw = NodeHttpServerRequest.toIncomingMessage(request).rawHeaders
    const seen = new Set<string>()
    for (let i = 0; i < raw.length; i += 2) {
      const name = raw[i]!.toLowerCase()
      if (!SINGLE_HEADERS.has(name)) continue
      if (seen.has(name)) return yield* new ApiError.InvalidRequest({ message: `More than one ${SINGLE_HEADERS.get(name)} header` })
      seen.add(name)
    }
    if (request.method === "GET" || request.method === "HEAD") return yield* app
    const contentType = request.headers["content-type"]
    const jsonType = isJsonContentType(contentType)
    const notJson = () =>
      new ApiError.InvalidRequest({ message: `Content-Type must be application/json (got ${ApiError.truncateMessage(contentType ?? "")})` })
    // A body declared longer than 0 of another type is refused before it is read; a chunked
    // one once it is, unless it is empty (below).
    const declaredLength = request.headers["content-length"]
    if (!jsonType && declaredLength !== undefined && Number(declaredLength) !== 0) return yield* notJson()
    // A compressed body (or one with a transfer coding other than chunked) would be read as
    // if it were plain: refused, as nothing here decodes it.
    const encoding = request.headers["content-encoding"]
    if (encoding !== undefined && encoding.trim().toLowerCase() !== "identity") {
      return yield* new ApiError.InvalidRequest({
        message: `Content-Encoding ${ApiError.truncateMessage(encoding)} is not supported: send the body uncompressed`
      })
    }
    const transfer = request.headers["transfer-encoding"]
    if (transfer !== undefined && transfer.trim().toLowerCase() !== "chunked") {
      return yield* new ApiError.InvalidRequest({ message: `Transfer-Encoding ${ApiError.truncateMessage(transfer)} is not supported` })
    }
    const limits = yield* RequestLimits
    const incoming = NodeHttpServerRequest.toIncomingMessage(request)
    const tracker = bodyTrackers.get(incoming)
    bodyTrackers.delete(incoming)
    const declared = Number(request.headers["content-length"] ?? "0")
    if (declared > limits.maxBodyBytes) {
      if (tracker !== undefined) tracker.recording = false
      yield* discardBody(incoming)
      return yield* new ApiError.PayloadTooLarge({ message: `The body is larger than ${limits.maxBodyBytes} bytes` })
    }
    if (tracker !== undefined && request.headers["content-length"] === undefined) {
      tracker.maxBytes = limits.maxBodyBytes
      tracker.overflowed = tracker.numBytes > limits.maxBodyBytes
    }
    // The body's bytes are bounded above (its declared length, or the cap). The platform's
    // limit counts the decoded text's UTF-8 bytes, where an invalid byte becomes U+FFFD (3
    // bytes): at `maxBodyBytes` it cut off a body of invalid UTF-8 a third that size with a
    // reset instead of the 400 below. So it is only a backstop here.
    const text = yield* request.text.pipe(
      HttpIncomingMessage.withMaxBodySize(Option.some(3 * limits.maxBodyBytes)),
      Effect.mapError((e): ApiError.ApiError =>
        isMaxBytesExceeded(e)
          ? new ApiError.PayloadTooLarge({ message: `The body is larger than ${limits.maxBodyBytes} bytes` })
          : new ApiError.InvalidRequest({ message: "The request body could not be read" })
      )
    )
    if (tracker?.overflowed === true) {
      return yield* new ApiError.PayloadTooLarge({ message: `The body is larger than ${limits.maxBodyBytes} bytes` })
    }
    const chunks = tracker?.chunks.splice(0) ?? []
    if (tracker !== undefined) tracker.recording = false
    if (text.includes("\uFFFD") && !isUtf8(Buffer.concat(chunks))) {
      return yield* new ApiError.InvalidRequest({ message: "The request body is not valid UTF-8" })
    }
    if (!jsonType) {
      if (text.length > 0) return yield* notJson()
      // An empty body goes to the route as none: under its declared type the route would
      // decode it as that (a form into {}, multipart into a failure without a boundary). The
      // header goes from the request itself (its headers are the IncomingMessage's object): a
      // modified copy would read the body again, which is consumed.
      delete (request.headers as Record<string, string>)["content-type"]
    }
    if (jsonDepth(text) > limits.maxJsonDepth) {
      return yield* new ApiError.InvalidRequest({ message: `The body nests deeper than ${limits.maxJsonDepth} levels` })
    }
    return yield* app
  }) as HttpApp.Default<E | ApiError.ApiError, R>

/** The error response: `{"error":{"code","message"}}` with the headers its status calls for. */
export const errorResponse = (e: ApiError.ApiError): HttpServerResponse.HttpServerResponse => {
  const { code, status } = ApiError.statusAndCode(e)
  const headers: Record<string, string> = {}
  if (e._tag === "Unauthorized") headers["www-authenticate"] = "Bearer"
  if (e._tag === "RateLimited") {
    Object.assign(headers, e.headers)
    headers["retry-after"] = String(e.retry_after_s)
  }
  if (e._tag === "Overloaded" || e._tag === "StorageUnavailable" || e._tag === "ShuttingDown" || e._tag === "NotReady") {
    headers["retry-after"] = String(e.retry_after_s)
  }
  // The rest of an over-long body is not read: the connection cannot be reused.
  if (e._tag === "PayloadTooLarge") headers["connection"] = "close"
  if (e._tag === "MethodNotAllowed") headers["allow"] = e.allow
  return HttpServerResponse.unsafeJson(ApiError.errorJson(status, code, e.message), {
    status,
    headers
  })
}

/** Why no route took a request, from the API's routes, the OpenAPI document's and the web client's. */
const unroutedRequest = makeUnrouted(Api, [
  { method: "GET", path: "/openapi.json" },
  ...Web.routes.map((path) => ({ method: "GET", path }))
])

/**
 * Turns every failure into an error response `{"error":{"code","message"}}`: API errors as
 * they are, decode errors (the stock HttpApiDecodeError), unreadable or non-JSON bodies and
 * non-JSON content types → `invalid_request`, no route → `not_found` (a route under other
 * methods: `method_not_allowed` with `Allow`), anything else →
 * `internal`. Responses are built here (not by HttpApiBuilder's error encoding) so that they
 * carry their headers: `WWW-Authenticate` on a 401, `Retry-After` on a 503.
 */
export const normalizeErrors = (app: HttpApp.Default): HttpApp.Default =>
  Effect.catchAllCause(guardRequest(app), (cause) =>
    Effect.gen(function*() {
      if (Cause.isInterruptedOnly(cause)) {
        return yield* Effect.failCause(cause as Cause.Cause<never>)
      }
      const failure = Cause.failureOption(cause)
      if (Option.isSome(failure)) {
        const error: unknown = failure.value
        if (ApiError.isApiError(error)) return errorResponse(error)
        if (error instanceof HttpApiError.HttpApiDecodeError) {
          return errorResponse(new ApiError.InvalidRequest({ message: formatIssues(error) }))
        }
        if (HttpServerError.isServerError(error) && error._tag === "RouteNotFound") {
          const request = yield* HttpServerRequest.HttpServerRequest
          const route = `${request.method} ${request.url.slice(0, 200)}`
          const unrouted = unroutedRequest(request.method, request.url)
          if (unrouted._tag === "NotFound") return errorResponse(new ApiError.NotFound({ message: `No route for ${route}` }))
          // The route is there: the router refused a parameter (over 100 characters, or not
          // percent-decodable).
          if (unrouted._tag === "ParamRefused") {
            return errorResponse(new ApiError.InvalidRequest({ message: `A path parameter of ${route} is too long or badly percent-encoded` }))
          }
          return errorResponse(new ApiError.MethodNotAllowed({ message: `${request.method} is not served at this path`, allow: unrouted.allow }))
        }
      }
      const defect = Cause.dieOption(cause)
      if (
        Option.isSome(defect) && HttpServerError.isServerError(defect.value) && defect.value._tag === "RequestError"
      ) {
        // HttpApiBuilder reads bodies with `Effect.orDie(request.json)`: bad JSON is a defect.
        return errorResponse(
          new ApiError.InvalidRequest({
            message: defect.value.reason === "Decode"
              ? "The request body is not valid JSON"
              : "The request body could not be read"
          })
        )
      }
      yield* Effect.logError("unhandled HTTP failure", cause)
      return errorResponse(new ApiError.InternalError({ message: "Internal server error" }))
    }))

/**
 * Installed as the HttpApi-level middleware: it sees failures before HttpApiBuilder encodes them
 * with the API's error schema (which includes every group's and endpoint's errors, so every
 * `ApiError` is encodable; the middleware signature only admits the API-level ones, hence the cast).
 */
export const layerNormalizeErrors: Layer.Layer<never> = HttpApiBuilder.middleware(
  normalizeErrors as unknown as HttpApiBuilder.MiddlewareFn<never>
)

/** The API with its handlers and middleware. */
export const layerApi: Layer.Layer<
  HttpApi.Api,
  never,
  Conversations | Auth.Authenticator | RateLimits.RateLimits | Metrics | RunnerStatusView | TopologyService
> = HttpApiBuilder.api(Api).pipe(
  Layer.provide(Handlers.layer),
  Layer.provide(Auth.AuthorizationLive)
)

/** Serves the API on the provided `HttpServer`; logs `Listening on http://…` once started. */
export const layerServe: Layer.Layer<
  never,
  never,
  HttpServer.HttpServer | HttpRouter.HttpRouter.DefaultServices | Conversations | Auth.Authenticator | RateLimits.RateLimits | Metrics | RunnerStatusView | TopologyService
> = HttpApiBuilder.serve((app) => Edge.middleware(Web.middleware(app))).pipe(
  Layer.provide(layerNormalizeErrors),
  Layer.provide(HttpApiBuilder.middlewareOpenApi({ path: "/openapi.json" })),
  Layer.provide(layerApi),
  HttpServer.withLogAddress
)

/** Connection-level limits of the Node server (each from config in `layer`). */
export interface ConnectionLimits {
  /** A request whose head is not complete after this long gets 408 (`HTTP_HEADERS_TIMEOUT_MS`, 10 s). */
  readonly headersTimeoutMs: number
  /** A request not fully received after this long gets 408 (`HTTP_REQUEST_TIMEOUT_MS`, 30 s). */
  readonly requestTimeoutMs: number
  /** Open connections per client address; more are answered 429 and closed (`MAX_CONNECTIONS_PER_CLIENT`, 1024). */
  readonly maxConnectionsPerClient: number
}

export const defaultConnectionLimits: ConnectionLimits = {
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 30_000,
  maxConnectionsPerClient: 1024
}

const HEALTHZ_BODY = JSON.stringify({ status: "ok" })

const rawResponse = (status: string, code: string, message: string): string => {
  const body = JSON.stringify(ApiError.errorJson(Number(status.slice(0, 3)), code, message))
  return `HTTP/1.1 ${status}\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\nConnection: close\r\n\r\n${body}`
}

/**
 * A Node HTTP server with the connection limits applied (slow or lying clients get 408 from
 * Node's own request timers, malformed HTTP 400 and a head over 16 KiB 431, each with a JSON
 * error; a client address past its connection bound gets 429; `CONNECT`
 * gets 405), which, on shutdown, stops listening and closes the open connections (an open SSE
 * stream would otherwise keep `server.close` waiting forever): the request fibers of those
 * connections are interrupted, which cancels their generations. Runs before NodeHttpServer's
 * own finalizer (which then finds the server closed).
 */
export const layerNodeServer = (
  listen: ListenOptions,
  limits: ConnectionLimits = defaultConnectionLimits
) =>
  Layer.unwrapEffect(Effect.sync(() => {
    const server = createServer({
      headersTimeout: limits.headersTimeoutMs,
      requestTimeout: limits.requestTimeoutMs,
      // How often Node checks those timers (default 30 s).
      connectionsCheckingInterval: Math.min(1000, limits.headersTimeoutMs),
      // Checked below instead, where the answer gets the API's JSON error (Node's has no body).
      requireHostHeader: false
    })
    // Every header is kept (the head's size is bounded anyway): past Node's default count of
    // 2,000 the rest were dropped unseen, and a second Authorization with them.
    server.maxHeadersCount = 0
    const perClient = new Map<string, number>()
    server.on("connection", (socket: Socket) => {
      const address = socket.remoteAddress ?? ""
      const n = (perClient.get(address) ?? 0) + 1
      perClient.set(address, n)
      socket.once("close", () => {
        const left = (perClient.get(address) ?? 1) - 1
        if (left === 0) perClient.delete(address)
        else perClient.set(address, left)
      })
      if (n > limits.maxConnectionsPerClient) {
        socket.end(rawResponse("429 Too Many Requests", "too_many_connections", `At most ${limits.maxConnectionsPerClient} open connections per client`))
      }
    })
    // Liveness (`GET /healthz`) is answered here, ahead of the API: through the API a request
    // costs ~130 KB of fiber allocations, and an orchestrator probing every few ms would itself
    // cause the collector pauses it sees. Only while the API serves (before and after, the
    // fallback below answers 503 `not_ready`), and not for browsers (an `Origin` header),
    // which need the API's CORS handling.
    const emit = server.emit.bind(server) as (event: string | symbol, ...args: Array<any>) => boolean
    server.emit = ((event: string | symbol, ...args: Array<any>): boolean => {
      if (event === "request") {
        const [request, response] = args as [IncomingMessage, ServerResponse]
        if (request.method !== "GET" && request.method !== "HEAD") trackBody(request)
        // RFC 9112 §3.2: an HTTP/1.1 request without a Host header is a 400, and so is any
        // request with two, or with one that is no `host[:port]`.
        const hostProblem = hostHeaderProblem(request)
        if (hostProblem !== undefined) {
          const body = JSON.stringify(ApiError.errorJson(400, "invalid_request", hostProblem))
          // The body, if any, is read and dropped first (not kept): see dropBody.
          const tracker = bodyTrackers.get(request)
          if (tracker !== undefined) tracker.recording = false
          bodyTrackers.delete(request)
          dropBody(request, () => {
            response.writeHead(400, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body), Connection: "close" }).end(body)
          })
          return true
        }
        if (server.listenerCount("request") > 1 && request.method === "GET" && request.url === "/healthz" && request.headers.origin === undefined) {
          const requestId = Edge.requestIdFor(request.headers["x-request-id"] as string | undefined)
          // Vary: the same URL with an Origin gets the API's CORS headers.
          response.writeHead(200, { "content-type": "application/json", "x-request-id": requestId, vary: "Origin" }).end(HEALTHZ_BODY)
          return true
        }
      }
      return emit(event, ...args)
    }) as typeof server.emit
    // What Node answers itself (malformed HTTP, a head over its 16 KiB, a request too slow)
    // gets the API's JSON error with a code; Node's own answers have no body. As Node does,
    // nothing is written where a response has begun on the socket.
    // A bad request pipelined behind good ones (on the same socket, before their responses)
    // is answered after them, in order, so their answers are not lost. Node's parser, once it
    // failed, reports an error for every later chunk (and a request timeout for the broken
    // message): the first is the socket's answer, the rest are ignored, and the socket reads
    // no more.
    const failedSockets = new WeakSet<Socket>()
    server.on("clientError", (error: NodeJS.ErrnoException, socket: Socket) => {
      if (failedSockets.has(socket)) return
      failedSockets.add(socket)
      socket.pause()
      const answer = (withStatus: boolean) => {
        if (withStatus && socket.writable && error.code !== "ECONNRESET") {
          const [status, code, message] = error.code === "HPE_HEADER_OVERFLOW"
            ? ["431 Request Header Fields Too Large", "headers_too_large", "The request's headers are larger than 16 KiB"]
            : error.code === "ERR_HTTP_REQUEST_TIMEOUT"
            ? ["408 Request Timeout", "request_timeout", "The request did not arrive in time"]
            : error.code === "HPE_CHUNK_EXTENSIONS_OVERFLOW"
            ? ["413 Payload Too Large", "payload_too_large", "The request's chunk extensions are too large"]
            : ["400 Bad Request", "invalid_request", "The request is not valid HTTP/1.1"]
          socket.write(rawResponse(status, code, message))
        }
        socket.destroy()
      }
      const inFlight = () => {
        const response = (socket as Socket & { _httpMessage?: ServerResponse | null })._httpMessage
        return response === undefined || response === null || response.writableFinished ? undefined : response
      }
      // A request too slow (its body never came), or one whose body is malformed (a bad chunk:
      // its handler waits for the rest, which never comes, and Node's request timeout on it
      // is ignored below), is the one in flight: answered now, unless its response has begun,
      // when the connection just ends.
      const isBroken = (response: ServerResponse) => error.code === "ERR_HTTP_REQUEST_TIMEOUT" || !response.req.complete
      const first = inFlight()
      if (first === undefined || isBroken(first)) return answer(first?.headersSent !== true)
      // Node hands the socket to the next queued response as one finishes, before this runs.
      const afterResponses = (response: ServerResponse) => {
        response.once("finish", () => {
          const following = inFlight()
          if (following === undefined || isBroken(following)) answer(following?.headersSent !== true)
          else afterResponses(following)
        })
        response.once("close", () => {
          if (!response.writableFinished) socket.destroy()
        })
      }
      afterResponses(first)
    })
    // An Expect other than 100-continue: Node's own 417 has no body.
    server.on("checkExpectation", (_request: IncomingMessage, response: ServerResponse) => {
      const body = JSON.stringify(ApiError.errorJson(417, "expectation_failed", "Only Expect: 100-continue is supported"))
      response.writeHead(417, { "Content-Type": "application/json", "Content-Length": Buffer.byteLength(body), Connection: "close" }).end(body)
    })
    server.on("connect", (_request, socket: Socket) => {
      socket.end(rawResponse("405 Method Not Allowed", "method_not_allowed", "CONNECT is not supported"))
    })
    // The server listens before the API attaches its handler, and the handler goes before the
    // server closes: a request that came in between would have no listener and never be
    // answered. It gets a 503 now, and a client retrying after a second finds the API.
    server.on("request", (_request, response: ServerResponse) => {
      if (server.listenerCount("request") > 1) return
      const body = JSON.stringify(ApiError.errorJson(503, "not_ready", "The server is starting or stopping; retry shortly"))
      response.writeHead(503, { "Content-Type": "application/json", "Retry-After": "1", Connection: "close" }).end(body)
    })
    return Layer.scopedDiscard(
      Effect.addFinalizer(() =>
        Effect.sync(() => {
          if (server.listening) server.close()
          server.closeAllConnections()
        })
      )
    ).pipe(Layer.provideMerge(NodeHttpServer.layer(() => server, listen)))
  }))

/** The connection limits from config (see {@link ConnectionLimits}). */
export const connectionLimitsConfig: Config.Config<ConnectionLimits> = Config.all({
  headersTimeoutMs: Config.integer("HTTP_HEADERS_TIMEOUT_MS").pipe(Config.withDefault(defaultConnectionLimits.headersTimeoutMs)),
  requestTimeoutMs: Config.integer("HTTP_REQUEST_TIMEOUT_MS").pipe(Config.withDefault(defaultConnectionLimits.requestTimeoutMs)),
  maxConnectionsPerClient: Config.integer("MAX_CONNECTIONS_PER_CLIENT").pipe(
    Config.withDefault(defaultConnectionLimits.maxConnectionsPerClient)
  )
})

/** `PORT` (default 8080) and `HOST` (default: all interfaces). */
export const listenConfig: Config.Config<ListenOptions> = Config.all({
  port: Config.port("PORT").pipe(Config.withDefault(8080)),
  host: Config.option(Config.string("HOST")),
  // Node's default accept backlog (511) overflowed at 2048 clients connecting at once while
  // the event loop was busy (ECONNRESET on connect); the kernel caps it at net.core.somaxconn.
  backlog: Config.integer("LISTEN_BACKLOG").pipe(Config.withDefault(4096))
}).pipe(
  Config.map(({ backlog, host, port }): ListenOptions =>
    Option.isSome(host) ? { port, host: host.value, backlog } : { port, backlog }
  )
)

/**
 * `SHUTDOWN_GRACE_MS` (ms, digits only; unset or empty: 10,000): how long a stop lets in-flight
 * turns finish. Read here and by the process's stop deadline (main.ts); another value is a
 * start-up error (`Config.integer` would take "" as 0).
 */
export const shutdownGraceMsConfig: Config.Config<number> = Config.string("SHUTDOWN_GRACE_MS").pipe(
  Config.withDefault(""),
  Config.mapOrFail((raw) => {
    const text = raw.trim()
    if (text === "") return Either.right(10_000)
    return /^\d{1,9}$/.test(text)
      ? Either.right(Number(text))
      : Either.left(ConfigError.InvalidData(["SHUTDOWN_GRACE_MS"], "must be a whole number of milliseconds, 0 or more"))
  })
)

/**
 * Graceful stop (SIGTERM): a finalizer that runs before the API stops serving and before the
 * server closes its connections: it drains the turns (`Conversations.drain`) so that every
 * in-flight turn finishes within `SHUTDOWN_GRACE_MS` (default 10 s) or is stored `cancelled`
 * and its client told `shutting_down`; a deploy does not look like a crash.
 */
export const layerDrainOnStop: Layer.Layer<never, ConfigError.ConfigError, Conversations> = Layer.scopedDiscard(
  Effect.gen(function*() {
    const graceMs = yield* shutdownGraceMsConfig
    const conversations = yield* ConversationsTag
    yield* Effect.addFinalizer(() => conversations.drain(graceMs))
  })
)

/**
 * The HTTP server from config: needs `Conversations`, the topology (the tiers of identities
 * and their limits) and the rate limiter's store (memory, or Redis shared by gateways).
 */
export const layer: Layer.Layer<
  never,
  HttpServerError.ServeError | ConfigError.ConfigError,
  Conversations | TopologyService | RateLimiterStore | Metrics | RunnerStatusView
> = Layer
  .unwrapEffect(Effect.map(Config.all([listenConfig, connectionLimitsConfig]), ([listen, limits]) => layerNodeServer(listen, limits)))
  .pipe(
    // Built after the server and the API, so its finalizer runs before theirs.
    (server) => layerDrainOnStop.pipe(Layer.provideMerge(layerServe), Layer.provide(server)),
    Layer.provide(RateLimits.layer),
    Layer.provideMerge(Auth.layerConfig),
    Layer.provide(SseSettings.layerConfig),
    Layer.provide(RequestLimits.layerConfig),
    Layer.provide(Edge.CorsSettings.layerConfig),
    Layer.provide(Web.WebAssets.layerConfig)
  )

/**
 * For tests: the API on a random port of 127.0.0.1; exposes the `HttpServer` (its address)
 * and an `HttpClient` with the server's URL prepended. Provide `Conversations` and `Auth.Authenticator`
 * (and `SseSettings` to change the keep-alive interval, `RequestLimits` the body limits).
 */
export const layerTestWith = (limits: ConnectionLimits = defaultConnectionLimits): Layer.Layer<
  HttpServer.HttpServer | HttpClient.HttpClient,
  HttpServerError.ServeError,
  Conversations | Auth.Authenticator | RateLimits.RateLimits | Metrics | RunnerStatusView | TopologyService
> =>
  layerServe.pipe(
    Layer.provideMerge(HttpServer.layerTestClient.pipe(
      Layer.provide(NodeHttpClient.layerWithoutAgent),
      Layer.provide(NodeHttpClient.makeAgentLayer({ keepAlive: false })),
      Layer.provideMerge(layerNodeServer({ port: 0, host: "127.0.0.1" }, limits))
    ))
  )

/** {@link layerTestWith} the default connection limits. */
export const layerTest = layerTestWith()
