/**
 * Optional Bearer authentication. With keys configured (`API_KEYS`, comma-separated) every
 * request of a protected group must carry `Authorization: Bearer <one of them>`, else 401
 * `{"error":{"code":"unauthorized",…}}`. With no keys (the embedded default) everything passes.
 */
import { HttpApiMiddleware, HttpApiSecurity, HttpServerRequest } from "@effect/platform"
import { Config, type ConfigError, Context, Effect, Layer, Option, Redacted } from "effect"
import { createHash, timingSafeEqual } from "node:crypto"
import * as ApiError from "./ApiError.js"

/** The accepted API keys; empty means authentication is off. */
export class ApiKeys extends Context.Tag("chat/http/ApiKeys")<ApiKeys, {
  readonly keys: ReadonlyArray<Redacted.Redacted<string>>
}>() {
  static readonly make = (keys: Iterable<string>): Context.Tag.Service<ApiKeys> => ({
    keys: Array.from(keys, (key) => key.trim()).filter((key) => key.length > 0).map((key) => Redacted.make(key))
  })

  static readonly layer = (keys: Iterable<string>): Layer.Layer<ApiKeys> => Layer.succeed(ApiKeys, ApiKeys.make(keys))

  /** Authentication off. */
  static readonly layerNone: Layer.Layer<ApiKeys> = ApiKeys.layer([])

  /** From `API_KEYS` (comma-separated, secret); absent or empty: authentication off. */
  static readonly layerConfig: Layer.Layer<ApiKeys, ConfigError.ConfigError> = Layer.effect(
    ApiKeys,
    Effect.gen(function*() {
      const raw = yield* Config.option(Config.redacted("API_KEYS"))
      const service = ApiKeys.make(Option.match(raw, { onNone: () => [], onSome: (r) => Redacted.value(r).split(",") }))
      if (service.keys.length === 0) {
        yield* Effect.logWarning("API_KEYS is not set: the HTTP API accepts requests without authentication")
      } else {
        yield* Effect.logInfo(`HTTP API: bearer authentication with ${service.keys.length} key(s)`)
      }
      return service
    })
  )
}

export class Authorization extends HttpApiMiddleware.Tag<Authorization>()("chat/http/Authorization", {
  failure: ApiError.UnauthorizedJson,
  security: { bearer: HttpApiSecurity.bearer }
}) {}

const digest = (value: string): Buffer => createHash("sha256").update(value, "utf8").digest()

export const AuthorizationLive: Layer.Layer<Authorization, never, ApiKeys> = Layer.effect(
  Authorization,
  Effect.gen(function*() {
    const { keys } = yield* ApiKeys
    const digests = keys.map((key) => digest(Redacted.value(key)))
    if (digests.length === 0) {
      return Authorization.of({ bearer: () => Effect.void })
    }
    return Authorization.of({
      bearer: (token) =>
        Effect.gen(function*() {
          const request = yield* HttpServerRequest.HttpServerRequest
          const header = request.headers.authorization
          if (header === undefined || header === "") {
            return yield* new ApiError.Unauthorized({ message: "Missing bearer token (Authorization: Bearer <key>)" })
          }
          if (!/^Bearer /i.test(header)) {
            return yield* new ApiError.Unauthorized({ message: "The Authorization header must use the Bearer scheme" })
          }
          const given = digest(Redacted.value(token).trim())
          // Compare every key (constant time per key) so the answer time does not depend on which matched.
          let ok = false
          for (const expected of digests) {
            ok = timingSafeEqual(given, expected) || ok
          }
          if (!ok) {
            return yield* new ApiError.Unauthorized({ message: "Invalid API key" })
          }
        })
    })
  })
)
