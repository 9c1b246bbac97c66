/**
 * What every HTTP response gets, whatever route answers it:
 *
 * - a request id: `x-request-id` on the response (the client's own when it sent a sane one,
 *   else a new UUID), and `request_id` on every log line of that request;
 * - CORS for the origins in `CORS_ORIGINS` (comma-separated; `*` for any; empty: none):
 *   preflight `OPTIONS` answered 204 with `Access-Control-Allow-*`, and the headers a browser
 *   client reads (request id, rate limits, `retry-after`, `x-conversation-id`) exposed.
 */
import { HttpApp, HttpMiddleware, HttpServerRequest, HttpServerResponse } from "@effect/platform"
import { Config, Context, Effect, Layer } from "effect"
import { randomUUID } from "node:crypto"

export class CorsSettings extends Context.Reference<CorsSettings>()("chat/http/CorsSettings", {
  defaultValue: (): { readonly allowedOrigins: ReadonlyArray<string> } => ({ allowedOrigins: [] })
}) {
  static readonly layer = (allowedOrigins: ReadonlyArray<string>) => Layer.succeed(CorsSettings, { allowedOrigins })

  /** `CORS_ORIGINS`: comma-separated origins (`https://chat.example.com`), or `*`. */
  static readonly layerConfig = Layer.effect(
    CorsSettings,
    Effect.map(
      Config.string("CORS_ORIGINS").pipe(Config.withDefault("")),
      (raw) => ({ allowedOrigins: raw.split(",").map((o) => o.trim()).filter((o) => o.length > 0) })
    )
  )
}

const SANE_REQUEST_ID = /^[A-Za-z0-9._:-]{1,64}$/

/** The response's request id: the client's `x-request-id` when sane (1-64 of `[A-Za-z0-9._:-]`), else a new UUID. */
export const requestIdFor = (given: string | undefined): string =>
  given !== undefined && SANE_REQUEST_ID.test(given) ? given : randomUUID()

const exposedHeaders = [
  "x-request-id",
  "x-conversation-id",
  "retry-after",
  "x-ratelimit-limit-requests",
  "x-ratelimit-remaining-requests",
  "x-ratelimit-reset-requests",
  "x-ratelimit-limit-tokens",
  "x-ratelimit-remaining-tokens",
  "x-ratelimit-reset-tokens"
]

/** Wraps the whole app (outside routing, so that a preflight never reaches it). */
export const middleware = <E, R>(app: HttpApp.Default<E, R>): HttpApp.Default<E, R | HttpServerRequest.HttpServerRequest> =>
  Effect.gen(function*() {
    const request = yield* HttpServerRequest.HttpServerRequest
    const requestId = requestIdFor(request.headers["x-request-id"])
    yield* HttpApp.appendPreResponseHandler((_request, response) =>
      Effect.succeed(HttpServerResponse.setHeader(response, "x-request-id", requestId))
    )
    const { allowedOrigins } = yield* CorsSettings
    const withCors = allowedOrigins.length === 0 ? app : HttpMiddleware.cors({
      allowedOrigins,
      allowedMethods: ["GET", "POST", "PATCH", "DELETE", "OPTIONS"],
      allowedHeaders: ["authorization", "content-type", "idempotency-key", "last-event-id", "x-request-id"],
      exposedHeaders,
      maxAge: 600
    })(app)
    return yield* Effect.annotateLogs(withCors, "request_id", requestId)
  })
