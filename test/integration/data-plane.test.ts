/**
 * The token data plane between two runners over real ZeroMQ sockets on loopback: a GPU
 * runner's RemoteSinks write into a gateway's TurnStreams. Backpressure crosses runners per
 * stream: a reader that stops reading pauses only its own sink, and resumes it when it drains.
 */
import { describe, expect, it } from "@effect/vitest"
import { Context, Duration, Effect, Layer, Stream } from "effect"
import * as DataPlane from "../../src/runtime/DataPlane.js"
import type { Topology } from "../../src/runtime/Topology.js"
import * as TurnEventLog from "../../src/runtime/TurnEventLog.js"
import { TurnStreams } from "../../src/runtime/TurnStream.js"
import { freeListenPort } from "../support/ports.js"

const topologyWith = async (): Promise<Topology> => {
  const runner = async (name: string, roles: Array<"gateway" | "gpu">) => ({
    name,
    roles,
    region: "local",
    gpus: [],
    host: "127.0.0.1",
    cluster_port: await freeListenPort(),
    data_port: await freeListenPort()
  })
  return { runners: [await runner("gw", ["gateway"]), await runner("gpu", ["gpu"])] } as unknown as Topology
}

/** One runner's data plane and stream registry. */
const runnerLayer = (topology: Topology, name: string) =>
  DataPlane.layerZmq(topology, name).pipe(
    Layer.provideMerge(TurnStreams.layerFor(name)),
    Layer.provide(TurnEventLog.layerMemory)
  )

const waitFor = (condition: () => boolean, ms = 5000) =>
  Effect.gen(function*() {
    const deadline = Date.now() + ms
    while (!condition()) {
      if (Date.now() > deadline) return yield* Effect.dieMessage("condition not met in time")
      yield* Effect.sleep(Duration.millis(10))
    }
  })

describe("data plane across two runners (ZeroMQ on loopback)", () => {
  it.scopedLive("a gateway stream whose reader is full pauses only its own remote sink, and resumes it when read", () =>
    Effect.gen(function*() {
      const topology = yield* Effect.promise(topologyWith)
      const gw = yield* Layer.build(runnerLayer(topology, "gw"))
      const gpu = yield* Layer.build(runnerLayer(topology, "gpu"))
      const streams = Context.get(gw, TurnStreams)
      const plane = Context.get(gpu, DataPlane.DataPlane)

      const slow = streams.make(8)
      const fast = streams.make(8)
      const slowSink = plane.sink(slow.id)!
      const fastSink = plane.sink(fast.id)!
      let slowDrained = 0
      slowSink.setProducer({ onDrain: () => void slowDrained++, onCancel: () => {} })
      fastSink.setProducer({ onDrain: () => {}, onCancel: () => {} })

      // The fast stream's reader reads everything; the slow one's reader reads nothing yet.
      const fastText: Array<string> = []
      yield* Effect.forkScoped(Stream.runForEach(fast.toStream(), (e) => Effect.sync(() => e._tag === "Token" && fastText.push(e.text))))
      // One token per "step" on each, as the step loop writes them.
      let step = 0
      while (slowSink.token(`s${step} `)) {
        expect(fastSink.token(`f${step} `)).toBe(true)
        step++
        yield* Effect.sleep(Duration.millis(5))
        if (step > 200) break
      }
      // The gateway told the GPU runner to pause the slow stream once 8 events sat unread.
      expect(step).toBeGreaterThanOrEqual(8)
      expect(step).toBeLessThan(200)
      // The fast one flows on meanwhile.
      for (let i = 0; i < 20; i++) {
        expect(fastSink.token(`f${step + i} `)).toBe(true)
        yield* Effect.sleep(Duration.millis(5))
      }
      yield* waitFor(() => fastText.length === step + 20)
      expect(slowDrained).toBe(0)
      // The slow reader starts reading: the sink is told to resume, and every token arrives once.
      const slowText: Array<string> = []
      yield* Effect.forkScoped(Stream.runForEach(slow.toStream(), (e) => Effect.sync(() => e._tag === "Token" && slowText.push(e.text))))
      yield* waitFor(() => slowDrained > 0)
      expect(slowSink.token("last")).toBe(true)
      yield* waitFor(() => slowText.length === step + 2)
      expect(slowText.join("")).toBe(Array.from({ length: step + 1 }, (_, i) => `s${i} `).join("") + "last")
    }), 30_000)
})
