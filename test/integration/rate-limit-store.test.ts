/**
 * The rate limiter's Redis store (REDIS_URL) with the limits tiers use: a limit that does not
 * divide the minute (RPM 7, TPM 100,000) counts and refuses as one that does, and a refund
 * gives tokens back, down to nothing. A Redis that does not answer fails the check at once.
 */
import { randomUUID } from "node:crypto"
import * as Net from "node:net"
import { RateLimiter } from "@effect/experimental"
import { describe, expect, it } from "@effect/vitest"
import { Effect, Layer } from "effect"
import { layerStoreRedis } from "../../src/http/RateLimits.js"

const redisUrl = new URL(process.env["REDIS_URL"] ?? "redis://127.0.0.1:6379")

const limiter = Layer.provide(
  RateLimiter.layer,
  layerStoreRedis({ host: redisUrl.hostname, port: Number(redisUrl.port || 6379), prefix: `test:${randomUUID()}:` })
)

const consume = (key: string, limit: number, tokens: number, onExceeded: "fail" | "delay" = "fail") =>
  Effect.flatMap(RateLimiter.RateLimiter, (rl) => rl.consume({ algorithm: "fixed-window", onExceeded, window: "1 minute", limit, key, tokens }))

describe("rate limits in Redis", () => {
  it.scoped("RPM 7: seven requests in a minute, the eighth refused", () =>
    Effect.gen(function*() {
      const remaining: Array<number> = []
      for (let i = 0; i < 7; i++) remaining.push((yield* consume("rpm", 7, 1)).remaining)
      expect(remaining).toEqual([6, 5, 4, 3, 2, 1, 0])
      const refused = yield* Effect.flip(consume("rpm", 7, 1))
      expect(refused.reason).toBe("Exceeded")
    }).pipe(Effect.provide(limiter)))

  it.scoped("TPM 100,000: charges of any size count; past the limit refused; a refund gives tokens back", () =>
    Effect.gen(function*() {
      expect((yield* consume("tpm", 100_000, 98_403)).remaining).toBe(1_597)
      expect((yield* consume("tpm", 100_000, 7)).remaining).toBe(1_590)
      expect((yield* Effect.flip(consume("tpm", 100_000, 1_591))).reason).toBe("Exceeded")
      // The refused charge was counted nowhere; a refund (as RateLimits.settle makes) returns tokens.
      yield* consume("tpm", 100_000, -3_903, "delay")
      expect((yield* consume("tpm", 100_000, 5_000)).remaining).toBe(493)
      // A refund of everything leaves a fresh window.
      yield* consume("tpm", 100_000, -200_000, "delay")
      expect((yield* consume("tpm", 100_000, 1)).remaining).toBe(99_999)
    }).pipe(Effect.provide(limiter)))

  it.scoped("a Redis that accepts connections but never answers fails the check within a second (not after ioredis's retries)", () =>
    Effect.gen(function*() {
      const sockets = new Set<Net.Socket>()
      const silent = Net.createServer((socket) => void sockets.add(socket))
      yield* Effect.acquireRelease(
        Effect.async<void>((resume) => void silent.listen(0, "127.0.0.1", () => resume(Effect.void))),
        () => Effect.sync(() => (sockets.forEach((s) => s.destroy()), silent.close()))
      )
      const port = (silent.address() as Net.AddressInfo).port
      const { elapsedMs, failed } = yield* Effect.gen(function*() {
        const startMs = Date.now()
        const failed = yield* Effect.flip(consume("rpm", 7, 1)).pipe(Effect.timeout("3 seconds"))
        return { elapsedMs: Date.now() - startMs, failed }
      }).pipe(Effect.provide(Layer.provide(RateLimiter.layer, layerStoreRedis({ host: "127.0.0.1", port, prefix: "test:" }))))
      expect(failed.reason).toBe("StoreError")
      expect(elapsedMs).toBeLessThan(1000)
    }))
})
