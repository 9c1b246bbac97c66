/**
 * detachedIn (the entity calls of an HTTP request): what a call made from a fiber keeps, as an
 * entity that the call creates keeps it for as long as it lives (the fiber refs of the fiber
 * that created it), holds nothing of the caller's context, even when the call runs in a fiber
 * forked from the caller's (a timeout's); and interrupting the caller interrupts the call.
 */
import { describe, expect, it } from "@effect/vitest"
import { Context, Deferred, Effect, Exit, Fiber, FiberRefs } from "effect"
import { detachedIn } from "../../src/actors/internal/detachedCall.js"
import { gc } from "../support/gc.js"

/** A service of the caller's context only (as an HTTP request's). */
class CallerRequest extends Context.Tag("test/CallerRequest")<CallerRequest, { readonly body: object }>() {}

describe("detachedIn", () => {
  it("keeps nothing of the caller's context in the fiber refs the call runs with", async () => {
    const detached = detachedIn(await Effect.runPromise(Effect.runtime<never>()))
    // What an entity created by the call keeps for its lifetime.
    const kept: Array<FiberRefs.FiberRefs> = []
    const createEntity = Effect.withFiberRuntime<void>((fiber) => {
      kept.push(fiber.getFiberRefs())
      return Effect.void
    })
    const call = async (): Promise<WeakRef<object>> => {
      const body = {}
      await Effect.runPromise(
        // Through a fiber of the call's own, as Effect.timeout runs it.
        Effect.timeout(detached(createEntity), "1 second").pipe(Effect.provideService(CallerRequest, { body }))
      )
      return new WeakRef(body)
    }
    const body = await call()
    await new Promise((resolve) => setImmediate(resolve))
    gc()
    expect(kept).toHaveLength(1)
    expect(body.deref()).toBeUndefined()
  })

  it.live("interrupting the caller interrupts the call, and waits for it to end", () =>
    Effect.gen(function*() {
      const detached = detachedIn(yield* Effect.runtime<never>())
      const started = yield* Deferred.make<void>()
      const ended = yield* Deferred.make<Exit.Exit<void>>()
      const caller = yield* Effect.fork(detached(
        Deferred.succeed(started, undefined).pipe(
          Effect.zipRight(Effect.never),
          Effect.onExit((exit) => Effect.zipRight(Effect.sleep("20 millis"), Deferred.succeed(ended, Exit.asVoid(exit))))
        )
      ))
      yield* Deferred.await(started)
      yield* Fiber.interrupt(caller)
      // Fiber.interrupt returned: the call's finalizer ran to its end before.
      const exit = yield* Deferred.poll(ended)
      expect(exit._tag).toBe("Some")
    }))
})
