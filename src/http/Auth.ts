/**
 * Identity: who sends a request. `Authorization: Bearer <token>`, where the token is
 *
 * - a JWT (RFC 7519) verified with `jose`: HS256 with `JWT_SECRET`, or RS256/ES256 with the
 *   public keys of the JWKS file `JWT_JWKS_FILE`; `JWT_ISSUER` and `JWT_AUDIENCE` are checked
 *   when set. Claims: `sub` → user id (required), `tier` (default: the topology's default
 *   tier), `org` (optional);
 * - or a static API key from `API_KEYS`: comma-separated entries `key` or
 *   `key=user[:tier[:org]]` (a bare key is its own user, `key-<sha256 prefix>`).
 *
 * With neither configured (the embedded default) every request is the one local user
 * `local` at the default tier. Missing, malformed, expired or forged tokens, and a tier the
 * topology does not have, get 401 `{"error":{"code":"unauthorized",…}}` with
 * `WWW-Authenticate: Bearer`.
 */
import { readFileSync } from "node:fs"
import { createHash, timingSafeEqual } from "node:crypto"
import { HttpApiMiddleware, HttpApiSecurity, HttpServerRequest } from "@effect/platform"
import { Config, ConfigError, Context, Effect, Layer, Option, Redacted, Schema } from "effect"
import { createLocalJWKSet, type JWTPayload, jwtVerify } from "jose"
import { Identity, noValidation, StorableText, UserId } from "../runtime/Domain.js"
import { lookup, type Topology, TopologyService } from "../runtime/Topology.js"
import * as ApiError from "./ApiError.js"

const isStorable = Schema.is(StorableText)

/** The identity of the request being handled (provided by the Authorization middleware). */
export class CurrentIdentity extends Context.Tag("chat/http/CurrentIdentity")<CurrentIdentity, Identity>() {}

/** How tokens are checked: API keys (by digest) and an optional JWT verifier. */
export interface AuthSettings {
  readonly apiKeys: ReadonlyArray<{ readonly digest: Buffer; readonly identity: Identity }>
  /** Verifies a JWT's signature and registered claims; absent: JWTs are not accepted. */
  readonly verifyJwt: ((token: string) => Promise<JWTPayload>) | undefined
  readonly tiers: ReadonlyArray<string>
  readonly defaultTier: string
}

export class Authenticator extends Context.Tag("chat/http/Authenticator")<Authenticator, {
  /** Whether any credential is configured (else every request is the local user). */
  readonly enabled: boolean
  /** The identity a bearer token stands for. */
  readonly authenticate: (token: string) => Effect.Effect<Identity, ApiError.Unauthorized>
  /** The identity of every request when authentication is off. */
  readonly local: Identity
}>() {}

const digest = (value: string): Buffer => createHash("sha256").update(value, "utf8").digest()

const unauthorized = (message: string) => new ApiError.Unauthorized({ message })

/** A compact JWS: three base64url parts. */
const looksLikeJwt = (token: string) => /^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*$/.test(token)

const makeAuthenticator = (settings: AuthSettings): Context.Tag.Service<Authenticator> => {
  const local = new Identity({ user_id: UserId.make("local"), tier: settings.defaultTier, org_id: null }, noValidation)
  const enabled = settings.apiKeys.length > 0 || settings.verifyJwt !== undefined
  const byKey = (token: string): Identity | undefined => {
    const given = digest(token)
    // Every key is compared (constant time each), so the answer time does not tell which matched.
    let found: Identity | undefined
    for (const key of settings.apiKeys) {
      if (timingSafeEqual(given, key.digest) && found === undefined) found = key.identity
    }
    return found
  }
  const byJwt = (verify: (token: string) => Promise<JWTPayload>, token: string) =>
    Effect.tryPromise({
      try: () => verify(token),
      catch: (e) => {
        const code = (e as { readonly code?: unknown }).code
        return unauthorized(code === "ERR_JWT_EXPIRED" ? "The token has expired" : "Invalid token")
      }
    }).pipe(
      Effect.flatMap((claims) => {
        const sub = claims.sub
        if (typeof sub !== "string" || sub.length === 0) return Effect.fail(unauthorized("The token has no subject (sub)"))
        if (sub.length > 256) {
          return Effect.fail(unauthorized("The token's subject (sub) is longer than 256 characters"))
        }
        // Ids and orgs are stored: text PostgreSQL cannot hold (NUL, a lone surrogate) is refused here.
        if (!isStorable(sub)) return Effect.fail(unauthorized("The token's subject (sub) is not valid text"))
        const tier = claims["tier"] ?? settings.defaultTier
        if (typeof tier !== "string" || !settings.tiers.includes(tier)) {
          return Effect.fail(unauthorized("The token's tier is not one of this service's tiers"))
        }
        // At most 256 characters, cut between code points (a cut pair would not be storable).
        const org = typeof claims["org"] === "string" ? Array.from(claims["org"]).slice(0, 256).join("") : null
        if (org !== null && !isStorable(org)) return Effect.fail(unauthorized("The token's org is not valid text"))
        return Effect.succeed(
          new Identity({ user_id: UserId.make(sub), tier, org_id: org }, noValidation)
        )
      })
    )
  return {
    enabled,
    local,
    authenticate: (token) =>
      Effect.suspend(() => {
        if (!enabled) return Effect.succeed(local)
        if (token.length === 0) return Effect.fail(unauthorized("Missing bearer token (Authorization: Bearer <token>)"))
        if (token.length > 8192) return Effect.fail(unauthorized("Invalid token"))
        if (settings.verifyJwt !== undefined && looksLikeJwt(token)) return byJwt(settings.verifyJwt, token)
        const identity = byKey(token)
        return identity === undefined ? Effect.fail(unauthorized("Invalid API key")) : Effect.succeed(identity)
      })
  }
}

/**
 * Parses `API_KEYS` entries (`key` or `key=user[:tier[:org]]`) against the topology's tiers.
 * @throws nothing: a bad entry is a ConfigError naming its position (never the key).
 */
export const parseApiKeys = (
  raw: string,
  topology: Pick<Topology, "tiers" | "default_tier">
): Effect.Effect<AuthSettings["apiKeys"], ConfigError.ConfigError> =>
  Effect.forEach(
    raw.split(",").map((entry) => entry.trim()).filter((entry) => entry.length > 0),
    (entry, i) => {
      const eq = entry.indexOf("=")
      const key = eq < 0 ? entry : entry.slice(0, eq)
      const [user, tier, org] = eq < 0 ? [] : entry.slice(eq + 1).split(":")
      const keyDigest = digest(key)
      const userId = user === undefined || user === "" ? `key-${keyDigest.toString("hex").slice(0, 16)}` : user
      const tierName = tier === undefined || tier === "" ? topology.default_tier : tier
      if (key.length === 0 || lookup(topology.tiers, tierName) === undefined) {
        return Effect.fail(ConfigError.InvalidData(["API_KEYS"], `entry ${i + 1}: empty key or unknown tier "${tierName}"`))
      }
      return Effect.succeed({
        digest: keyDigest,
        identity: new Identity({ user_id: UserId.make(userId), tier: tierName, org_id: org === undefined || org === "" ? null : org }, noValidation)
      })
    }
  )

/** Parses `ADMIN_API_KEYS` (comma-separated keys): each an operator identity of its own (`admin-<sha256 prefix>`). */
export const parseAdminKeys = (raw: string, defaultTier: string): AuthSettings["apiKeys"] =>
  raw.split(",").map((key) => key.trim()).filter((key) => key.length > 0).map((key) => {
    const keyDigest = digest(key)
    const userId = UserId.make(`admin-${keyDigest.toString("hex").slice(0, 16)}`)
    return { digest: keyDigest, identity: new Identity({ user_id: userId, tier: defaultTier, org_id: null, admin: true }, noValidation) }
  })

/** A JWT verifier from `JWT_SECRET` (HS256) or `JWT_JWKS_FILE` (RS256/ES256). */
const jwtVerifier = (options: {
  readonly secret: Option.Option<Redacted.Redacted<string>>
  readonly jwksFile: Option.Option<string>
  readonly issuer: Option.Option<string>
  readonly audience: Option.Option<string>
}): Effect.Effect<AuthSettings["verifyJwt"], ConfigError.ConfigError> =>
  Effect.gen(function*() {
    // A token without `exp` would be good for ever: refused.
    const claims = {
      requiredClaims: ["exp"],
      ...(Option.isSome(options.issuer) ? { issuer: options.issuer.value } : {}),
      ...(Option.isSome(options.audience) ? { audience: options.audience.value } : {})
    }
    if (Option.isSome(options.jwksFile)) {
      const path = options.jwksFile.value
      const jwks = yield* Effect.try({
        try: () => createLocalJWKSet(JSON.parse(readFileSync(path, "utf8"))),
        catch: (e) => ConfigError.InvalidData(["JWT_JWKS_FILE"], `cannot read a JWKS from ${path}: ${String(e).slice(0, 200)}`)
      })
      return (token: string) => jwtVerify(token, jwks, { algorithms: ["RS256", "ES256"], ...claims }).then((r) => r.payload)
    }
    if (Option.isSome(options.secret)) {
      const key = new TextEncoder().encode(Redacted.value(options.secret.value))
      if (key.length < 32) return yield* Effect.fail(ConfigError.InvalidData(["JWT_SECRET"], "must be at least 32 bytes (HS256)"))
      return (token: string) => jwtVerify(token, key, { algorithms: ["HS256"], ...claims }).then((r) => r.payload)
    }
    return undefined
  })

/** From settings (tests). */
export const layer = (settings: AuthSettings): Layer.Layer<Authenticator> => Layer.succeed(Authenticator, makeAuthenticator(settings))

/** Authentication off: every request is the local user at the default tier. */
export const layerLocal = (defaultTier = "free"): Layer.Layer<Authenticator> =>
  layer({ apiKeys: [], verifyJwt: undefined, tiers: [defaultTier], defaultTier })

/** From `API_KEYS`, `ADMIN_API_KEYS`, `JWT_SECRET`, `JWT_JWKS_FILE`, `JWT_ISSUER`, `JWT_AUDIENCE` and the topology's tiers. */
export const layerConfig: Layer.Layer<Authenticator, ConfigError.ConfigError, TopologyService> = Layer.effect(
  Authenticator,
  Effect.gen(function*() {
    const topology = yield* TopologyService
    const rawKeys = yield* Config.option(Config.redacted("API_KEYS"))
    const rawAdminKeys = yield* Config.option(Config.redacted("ADMIN_API_KEYS"))
    const apiKeys = [
      ...(Option.isSome(rawKeys) ? yield* parseApiKeys(Redacted.value(rawKeys.value), topology) : []),
      ...(Option.isSome(rawAdminKeys) ? parseAdminKeys(Redacted.value(rawAdminKeys.value), topology.default_tier) : [])
    ]
    const verifyJwt = yield* jwtVerifier({
      secret: yield* Config.option(Config.redacted("JWT_SECRET")),
      jwksFile: yield* Config.option(Config.string("JWT_JWKS_FILE")),
      issuer: yield* Config.option(Config.string("JWT_ISSUER")),
      audience: yield* Config.option(Config.string("JWT_AUDIENCE"))
    })
    const service = makeAuthenticator({ apiKeys, verifyJwt, tiers: Object.keys(topology.tiers), defaultTier: topology.default_tier })
    if (!service.enabled) {
      yield* Effect.logWarning("no API_KEYS, JWT_SECRET or JWT_JWKS_FILE: every request is the local user (no authentication)")
    } else {
      yield* Effect.logInfo(`HTTP API: bearer authentication (${apiKeys.length} API key(s)${verifyJwt === undefined ? "" : ", JWTs"})`)
    }
    return service
  })
)

export class Authorization extends HttpApiMiddleware.Tag<Authorization>()("chat/http/Authorization", {
  failure: ApiError.UnauthorizedJson,
  provides: CurrentIdentity,
  security: { bearer: HttpApiSecurity.bearer }
}) {}

export const AuthorizationLive: Layer.Layer<Authorization, never, Authenticator> = Layer.effect(
  Authorization,
  Effect.gen(function*() {
    const authenticator = yield* Authenticator
    return Authorization.of({
      bearer: (token) =>
        Effect.gen(function*() {
          if (!authenticator.enabled) return authenticator.local
          const header = (yield* HttpServerRequest.HttpServerRequest).headers.authorization
          if (header === undefined || header === "") {
            return yield* unauthorized("Missing bearer token (Authorization: Bearer <token>)")
          }
          if (!/^Bearer /i.test(header)) return yield* unauthorized("The Authorization header must use the Bearer scheme")
          return yield* authenticator.authenticate(Redacted.value(token).trim())
        })
    })
  })
)
