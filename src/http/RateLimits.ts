/**
 * Per-user RPM and TPM limits of the user's tier (`cluster.config.ts` `tiers.*.rpm/tpm`), with
 * `@effect/experimental`'s RateLimiter: a Redis store of our own when several runners share the
 * limits (one limit across gateways; see `layerStoreRedis`), the library's memory store in one
 * process. A turn is charged up front for its estimated prompt plus `max_tokens`, and
 * corrected to the actual count when it ends.
 *
 * Responses carry OpenAI's headers (`x-ratelimit-limit-requests`, `…-remaining-requests`,
 * `…-reset-requests`, and the same for tokens); a refused request is 429
 * `rate_limit_exceeded` with them and `retry-after`. Limits apply to authenticated users: with
 * authentication off (the embedded default's one local user) there are none. A store that
 * cannot be reached lets requests through (logged): limits protect the service, they must not
 * take it down.
 */
import { RateLimiter } from "@effect/experimental"
import { Context, Duration, Effect, Layer } from "effect"
import { Redis, type RedisOptions } from "ioredis"
import type { Identity } from "../runtime/Domain.js"
import { Metrics } from "../runtime/Metrics.js"
import { lookup, TopologyService } from "../runtime/Topology.js"
import * as ApiError from "./ApiError.js"
import { Authenticator } from "./Auth.js"
import { failFastRedisOptions } from "../runtime/internal/redisOptions.js"

const WINDOW = Duration.minutes(1)

/** The `x-ratelimit-*` values after a charge. */
export type RateLimitHeaders = Readonly<Record<string, string>>

/** What a request may generate: its new text (characters) and `max_tokens` (default: the topology's). */
export interface GenerationCost {
  readonly numPromptChars: number
  readonly maxTokens: number | undefined
}

export class RateLimits extends Context.Tag("chat/http/RateLimits")<RateLimits, {
  /**
   * Charges one request, and for a generation its estimated tokens (`numPromptChars / 4` +
   * `maxTokens`), to the user's tier limits; fails with RateLimited when either is used up.
   * @returns the response headers and the tokens charged (for `settle`).
   */
  readonly charge: (
    identity: Identity,
    generation?: GenerationCost
  ) => Effect.Effect<{ readonly headers: RateLimitHeaders; readonly numTokens: number }, ApiError.RateLimited>
  /** Corrects a generation's charge to its actual token count (prompt + completion). */
  readonly settle: (identity: Identity, numCharged: number, numActual: number) => Effect.Effect<void>
}>() {}

/** OpenAI's reset format: `1s`, `6m0s`. */
const resetText = (d: Duration.Duration): string => {
  const s = Math.ceil(Duration.toMillis(d) / 1000)
  return s < 60 ? `${s}s` : `${Math.floor(s / 60)}m${s % 60}s`
}

const make = Effect.gen(function*() {
  const limiter = yield* RateLimiter.RateLimiter
  const topology = yield* TopologyService
  const { enabled } = yield* Authenticator
  const metrics = yield* Metrics
  const storeFailed = (e: RateLimiter.RateLimitStoreError) =>
    Effect.logWarning("rate limit store unavailable; letting the request through", e.message)
  const tierOf = (identity: Identity) => lookup(topology.tiers, identity.tier) ?? lookup(topology.tiers, topology.default_tier)!

  const consume = (key: string, limit: number, tokens: number) =>
    limiter.consume({ algorithm: "fixed-window", onExceeded: "fail", window: WINDOW, limit, key, tokens }).pipe(
      Effect.map((r) => ({ limit: r.limit, remaining: r.remaining, reset: r.resetAfter })),
      Effect.catchIf(
        (e): e is RateLimiter.RateLimitStoreError => e.reason === "StoreError",
        (e) => Effect.as(storeFailed(e), { limit, remaining: limit, reset: Duration.zero })
      )
    )

  const refused = (
    tier: string,
    what: "requests" | "tokens",
    e: RateLimiter.RateLimitExceeded,
    headers: Record<string, string>
  ): ApiError.RateLimited => {
    const retryAfterS = Math.max(1, Math.ceil(Duration.toMillis(e.retryAfter) / 1000))
    metrics.rateLimitRejected(tier, what)
    return new ApiError.RateLimited({
      message: `Rate limit reached: ${e.limit} ${what} per minute for your tier; try again in ${retryAfterS} s`,
      retry_after_s: retryAfterS,
      headers: {
        ...headers,
        [`x-ratelimit-limit-${what}`]: String(e.limit),
        [`x-ratelimit-remaining-${what}`]: "0",
        [`x-ratelimit-reset-${what}`]: resetText(e.retryAfter)
      }
    })
  }

  const settle = (identity: Identity, numCharged: number, numActual: number): Effect.Effect<void> =>
    !enabled || numActual === numCharged
      ? Effect.void
      : limiter.consume({
        algorithm: "fixed-window",
        // Never refused: the tokens were spent already.
        onExceeded: "delay",
        window: WINDOW,
        limit: tierOf(identity).tpm,
        key: `tpm:${identity.user_id}`,
        tokens: Math.trunc(numActual - numCharged)
      }).pipe(Effect.asVoid, Effect.catchAll(() => Effect.void))

  return RateLimits.of({
    charge: (identity, generation) =>
      Effect.gen(function*() {
        const tier = tierOf(identity)
        // Capped at the limit: an estimate above it would be refused forever (the prompt's real
        // size is checked later, and the charge corrected at the end).
        const numTokens = generation === undefined
          ? 0
          : Math.min(tier.tpm, Math.ceil(generation.numPromptChars / 4) + (generation.maxTokens ?? topology.generation.max_tokens))
        if (!enabled) return { headers: {}, numTokens }
        // Both limits in one round trip's time: the token charge is given back if the request one refuses.
        const [requestsResult, tokensResult] = yield* Effect.all([
          Effect.either(consume(`rpm:${identity.user_id}`, tier.rpm, 1)),
          numTokens === 0 ? Effect.succeed(undefined) : Effect.either(consume(`tpm:${identity.user_id}`, tier.tpm, numTokens))
        ], { concurrency: 2 })
        if (requestsResult._tag === "Left") {
          if (tokensResult?._tag === "Right") yield* settle(identity, numTokens, 0)
          return yield* Effect.fail(refused(identity.tier, "requests", requestsResult.left, {}))
        }
        const requests = requestsResult.right
        const headers: Record<string, string> = {
          "x-ratelimit-limit-requests": String(requests.limit),
          "x-ratelimit-remaining-requests": String(requests.remaining),
          "x-ratelimit-reset-requests": resetText(requests.reset)
        }
        if (tokensResult === undefined) return { headers, numTokens }
        if (tokensResult._tag === "Left") return yield* Effect.fail(refused(identity.tier, "tokens", tokensResult.left, headers))
        const tokens = tokensResult.right
        return {
          headers: {
            ...headers,
            "x-ratelimit-limit-tokens": String(tokens.limit),
            "x-ratelimit-remaining-tokens": String(tokens.remaining),
            "x-ratelimit-reset-tokens": resetText(tokens.reset)
          },
          numTokens
        }
      }),
    settle
  })
})

/**
 * The fixed window in Redis: a key holds the tokens counted, and each token adds
 * `refill_ms` (window / limit) to its expiry; a charge that would pass the limit is counted
 * nowhere. As @effect/experimental's own script, except that the expiry is rounded up to whole
 * milliseconds (Redis refuses a fractional PX: theirs failed for any limit that does not divide
 * the window, a TPM of 100,000 being 0.6 ms a token) and a refund that leaves nothing deletes
 * the key (a PX ≤ 0 is refused too). Returns { count, expiry in ms }.
 */
const FIXED_WINDOW_SCRIPT = `
local tokens = tonumber(ARGV[1])
local refill_ms = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
local current = tonumber(redis.call("GET", KEYS[1]))
local pttl = 0
if current then
  pttl = redis.call("PTTL", KEYS[1])
  -- A key without an expiry (not written here) would count for ever: a fresh window.
  if pttl < 0 then
    current = 0
    pttl = 0
  end
else
  current = 0
end
local count = current + tokens
if limit and tokens > 0 and count > limit then
  return { count, pttl }
end
local next_pttl = math.ceil(pttl + refill_ms * tokens)
if count <= 0 or next_pttl <= 0 then
  redis.call("DEL", KEYS[1])
  return { math.max(count, 0), 0 }
end
redis.call("SET", KEYS[1], count, "PX", next_pttl)
return { count, next_pttl }
`

/**
 * A limit check that takes longer lets the request through, as an unreachable store does (and
 * one is not queued while Redis is away: `failFastRedisOptions`).
 */
const STORE_COMMAND_TIMEOUT_MS = 250
/** How long the store's layer waits for its first connection (Redis down: it goes on without). */
const STORE_CONNECT_WAIT_MS = 2000

interface RedisWithFixedWindow extends Redis {
  fixedWindowMs(key: string, tokens: number, refillMs: number, ...limit: Array<number>): Promise<[number, number]>
}

/**
 * The limits' Redis store, keys under `prefix`: the fixed window of {@link FIXED_WINDOW_SCRIPT},
 * the one algorithm RateLimits uses (the token bucket fails). Fails with RateLimitStoreError
 * when Redis does not answer.
 */
export const layerStoreRedis = (options: RedisOptions & { readonly prefix: string }): Layer.Layer<RateLimiter.RateLimiterStore> =>
  Layer.scoped(
    RateLimiter.RateLimiterStore,
    Effect.gen(function*() {
      const redis = yield* Effect.acquireRelease(
        Effect.sync(() =>
          new Redis({ ...options, ...failFastRedisOptions(STORE_COMMAND_TIMEOUT_MS) }) as RedisWithFixedWindow
        ),
        (redis) => Effect.promise(() => redis.quit().catch(() => undefined))
      )
      redis.defineCommand("fixedWindowMs", { lua: FIXED_WINDOW_SCRIPT, numberOfKeys: 1 })
      // Reconnection is ioredis's; its errors meanwhile are the commands' (logged by RateLimits).
      redis.on("error", () => undefined)
      // Connected before the first request where Redis is up (commands are not queued meanwhile).
      yield* Effect.async<void>((resume) => {
        const done = () => (clearTimeout(timer), redis.off("ready", done), resume(Effect.void))
        const timer = setTimeout(done, STORE_CONNECT_WAIT_MS)
        redis.once("ready", done)
      })
      return RateLimiter.RateLimiterStore.of({
        tokenBucket: () => Effect.fail(new RateLimiter.RateLimitStoreError({ message: "this store has no token bucket" })),
        fixedWindow: ({ key, limit, refillRate, tokens }) =>
          Effect.tryPromise({
            try: () => redis.fixedWindowMs(`${options.prefix}${key}`, tokens, Duration.toMillis(refillRate), ...(limit === undefined ? [] : [limit])),
            catch: (cause) => new RateLimiter.RateLimitStoreError({ message: "Failed to execute fixedWindow rate limiting command", cause })
          }).pipe(Effect.map(([count, ttl]) => [Number(count), Number(ttl)] as const))
      })
    })
  )

/** Needs a `RateLimiter.RateLimiterStore` (memory, or {@link layerStoreRedis}). */
export const layer: Layer.Layer<RateLimits, never, RateLimiter.RateLimiterStore | TopologyService | Authenticator | Metrics> = Layer.effect(
  RateLimits,
  make
).pipe(Layer.provide(RateLimiter.layer))
