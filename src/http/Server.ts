/**
 * The HTTP server: the API with its handlers, served by NodeHttpServer.
 *
 * - `layer`: everything from config (`PORT` default 8080, `HOST` optional, `API_KEYS`,
 *   `SSE_KEEPALIVE_INTERVAL`); needs only `Conversations`.
 * - `layerServe`: the API on whatever `HttpServer` is provided (compose your own server).
 * - `layerTest`: on a random local port, with an `HttpClient` pointed at it.
 */
import {
  type HttpApi,
  HttpApiBuilder,
  HttpApiError,
  type HttpApp,
  type HttpClient,
  type HttpRouter,
  HttpServer,
  HttpServerError,
  HttpServerRequest
} from "@effect/platform"
import { NodeHttpClient, NodeHttpServer } from "@effect/platform-node"
import { Cause, Config, type ConfigError, Effect, Layer, Option } from "effect"
import { createServer, type Server as NodeServer } from "node:http"
import type { ListenOptions } from "node:net"
import type { Conversations } from "../runtime/Conversations.js"
import { Api } from "./Api.js"
import * as ApiError from "./ApiError.js"
import { ApiKeys, AuthorizationLive } from "./Auth.js"
import * as Handlers from "./Handlers.js"
import { SseSettings } from "./Sse.js"

/** `role: is missing; max_tokens: Expected …` from the issues of a decode error. */
const formatIssues = (error: HttpApiError.HttpApiDecodeError): string => {
  const parts = error.issues.slice(0, 8).map((issue) =>
    issue.path.length > 0 ? `${issue.path.join(".")}: ${issue.message}` : issue.message
  )
  return parts.length > 0 ? `Invalid request: ${parts.join("; ")}` : `Invalid request: ${error.message}`
}

const isJsonContentType = (contentType: string | undefined): boolean =>
  contentType === undefined || contentType === "" || /^application\/([a-z0-9.+-]*\+)?json\b/i.test(contentType.trim())

/**
 * Bodies must be JSON (or absent): HttpApiBuilder would otherwise decode a form or text body
 * into something the schema rejects with a confusing message (`curl -d` sends a form type).
 */
const requireJsonBody = <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E | ApiError.InvalidRequest, R> =>
  Effect.gen(function*() {
    const request = yield* HttpServerRequest.HttpServerRequest
    const contentType = request.headers["content-type"]
    if (request.method !== "GET" && request.method !== "HEAD" && !isJsonContentType(contentType)) {
      return yield* new ApiError.InvalidRequest({
        message: `Content-Type must be application/json (got ${contentType})`
      })
    }
    return yield* app
  })

/**
 * Turns every failure that is not already an API error into one, so that every error response
 * is `{"error":{"code","message"}}`: decode errors (the stock HttpApiDecodeError), unreadable
 * or non-JSON bodies and non-JSON content types → `invalid_request`, no route → `not_found`, anything else → `internal`.
 */
export const normalizeErrors = (app: HttpApp.Default): HttpApp.Default<ApiError.ApiError> =>
  Effect.catchAllCause(requireJsonBody(app), (cause) =>
    Effect.gen(function*() {
      if (Cause.isInterruptedOnly(cause)) {
        return yield* Effect.failCause(cause as Cause.Cause<never>)
      }
      const failure = Cause.failureOption(cause)
      if (Option.isSome(failure)) {
        const error: unknown = failure.value
        if (ApiError.isApiError(error)) {
          return yield* Effect.fail(error)
        }
        if (error instanceof HttpApiError.HttpApiDecodeError) {
          return yield* new ApiError.InvalidRequest({ message: formatIssues(error) })
        }
        if (HttpServerError.isServerError(error) && error._tag === "RouteNotFound") {
          const request = yield* HttpServerRequest.HttpServerRequest
          return yield* new ApiError.NotFound({ message: `No route for ${request.method} ${request.url}` })
        }
      }
      const defect = Cause.dieOption(cause)
      if (
        Option.isSome(defect) && HttpServerError.isServerError(defect.value) && defect.value._tag === "RequestError"
      ) {
        // HttpApiBuilder reads bodies with `Effect.orDie(request.json)`: bad JSON is a defect.
        return yield* new ApiError.InvalidRequest({
          message: defect.value.reason === "Decode"
            ? "The request body is not valid JSON"
            : "The request body could not be read"
        })
      }
      yield* Effect.logError("unhandled HTTP failure", cause)
      return yield* new ApiError.InternalError({ message: "Internal server error" })
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
  Conversations | ApiKeys
> = HttpApiBuilder.api(Api).pipe(
  Layer.provide(Handlers.layer),
  Layer.provide(AuthorizationLive)
)

/** Serves the API on the provided `HttpServer`; logs `Listening on http://…` once started. */
export const layerServe: Layer.Layer<
  never,
  never,
  HttpServer.HttpServer | HttpRouter.HttpRouter.DefaultServices | Conversations | ApiKeys
> = HttpApiBuilder.serve().pipe(
  Layer.provide(layerNormalizeErrors),
  Layer.provide(HttpApiBuilder.middlewareOpenApi({ path: "/openapi.json" })),
  Layer.provide(layerApi),
  HttpServer.withLogAddress
)

/**
 * A Node HTTP server that, on shutdown, stops listening and closes the open connections (an
 * open SSE stream would otherwise keep `server.close` waiting forever): the request fibers of
 * those connections are interrupted, which cancels their generations. Runs before
 * NodeHttpServer's own finalizer (which then finds the server closed).
 */
export const layerNodeServer = (
  listen: ListenOptions,
  make: () => NodeServer = () => createServer()
) =>
  Layer.unwrapEffect(Effect.sync(() => {
    const server = make()
    return Layer.scopedDiscard(
      Effect.addFinalizer(() =>
        Effect.sync(() => {
          if (server.listening) server.close()
          server.closeAllConnections()
        })
      )
    ).pipe(Layer.provideMerge(NodeHttpServer.layer(() => server, listen)))
  }))

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

/** The HTTP server from config: needs only `Conversations`. */
export const layer: Layer.Layer<never, HttpServerError.ServeError | ConfigError.ConfigError, Conversations> = Layer
  .unwrapEffect(Effect.map(listenConfig, (listen) => layerNodeServer(listen)))
  .pipe(
    (server) => layerServe.pipe(Layer.provide(server)),
    Layer.provide(ApiKeys.layerConfig),
    Layer.provide(SseSettings.layerConfig)
  )

/**
 * For tests: the API on a random port of 127.0.0.1; exposes the `HttpServer` (its address)
 * and an `HttpClient` with the server's URL prepended. Provide `Conversations` and `ApiKeys`
 * (and `SseSettings` to change the keep-alive interval).
 */
export const layerTest: Layer.Layer<
  HttpServer.HttpServer | HttpClient.HttpClient,
  HttpServerError.ServeError,
  Conversations | ApiKeys
> = layerServe.pipe(
  Layer.provideMerge(HttpServer.layerTestClient.pipe(
    Layer.provide(NodeHttpClient.layerWithoutAgent),
    Layer.provide(NodeHttpClient.makeAgentLayer({ keepAlive: false })),
    Layer.provideMerge(layerNodeServer({ port: 0, host: "127.0.0.1" }))
  ))
)
