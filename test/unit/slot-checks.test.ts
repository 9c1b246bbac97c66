/**
 * Failover's slot checks (src/actors/internal/failover.ts): every period, one RunningTurns per
 * GPU asks about every watched turn there; a GPU that does not answer leaves its turns with no
 * verdict ("no answer says nothing"), and a turn moved meanwhile takes no answer about its old slot.
 */
import { describe, expect, it } from "@effect/vitest"
import { Effect, Runtime, TestClock } from "effect"
import type { GpuScheduler } from "../../src/actors/GpuScheduler.js"
import * as failover from "../../src/actors/internal/failover.js"
import { TurnId } from "../../src/runtime/Domain.js"

type Gpus = Effect.Effect.Success<typeof GpuScheduler.client>
type Asked = { readonly slot_id: string; readonly turn_id: string }

describe("slot checks", () => {
  it.effect("one RunningTurns per GPU and period for all the turns watched there", () =>
    Effect.gen(function*() {
      const calls: Array<{ gpuId: string; turns: ReadonlyArray<Asked> }> = []
      const gpus = ((gpuId: string) => ({
        RunningTurns: ({ turns }: { turns: ReadonlyArray<Asked> }) => {
          calls.push({ gpuId, turns })
          // gpu-b's runner is gone: no answer. On gpu-a, slot 1 lost its turn; answers take 100 ms.
          return gpuId === "gpu-b" ? Effect.never : Effect.delay(Effect.succeed(turns.map((t) => t.slot_id !== "gpu-a/1")), "100 millis")
        }
      })) as unknown as Gpus
      const runtime = yield* Effect.runtime<never>()
      const checks = failover.slotChecks(gpus, (effect) => Runtime.runFork(runtime)(effect))
      const turn = (n: number, slotId: string) => ({ turnId: TurnId.make(`c:${n}`), slotId, start: undefined })
      const [t1, t2, t3, t4] = [turn(1, "gpu-a/0"), turn(2, "gpu-a/1"), turn(3, "gpu-b/0"), turn(4, "gpu-a/2")]
      for (const t of [t1, t2, t3, t4]) checks.add(t)
      expect(calls).toEqual([])

      // t4 moves to gpu-b as its check is under way: the answer about gpu-a/2 is not about it.
      const moving = Effect.sync(() => void (t4.slotId = "gpu-b/1"))
      yield* TestClock.adjust("5 seconds")
      yield* moving
      yield* TestClock.adjust("1 second") // gpu-b's call times out
      expect(calls.map((c) => [c.gpuId, c.turns.map((t) => t.turn_id)]).sort()).toEqual([
        ["gpu-a", ["c:1", "c:2", "c:4"]],
        ["gpu-b", ["c:3"]]
      ])
      expect([t1, t2, t3, t4].map((t) => checks.latest(t)?.running)).toEqual([true, false, undefined, undefined])
      expect(checks.latest(t2)?.slotId).toBe("gpu-a/1")
      expect(checks.latest(t4)).toBeUndefined()

      // Turns no longer watched are not asked about; with none left, nothing is sent.
      checks.remove(t1)
      checks.remove(t3)
      yield* TestClock.adjust("5 seconds")
      expect(calls.slice(2).map((c) => [c.gpuId, c.turns.map((t) => t.turn_id)]).sort()).toEqual([
        ["gpu-a", ["c:2"]],
        ["gpu-b", ["c:4"]]
      ])
      checks.remove(t2)
      checks.remove(t4)
      yield* TestClock.adjust("1 second")
      yield* TestClock.adjust("20 seconds")
      expect(calls).toHaveLength(4)
    }))
})
