/**
 * TurnStream, the token data plane: buffering before a consumer attaches, SSE framing,
 * backpressure (token → false, then onDrain), the reader going away (onCancel, exactly once),
 * the Effect Stream consumer, and the registry.
 */
import { describe, expect, it } from "@effect/vitest"
import { Chunk, Effect, Either, Stream } from "effect"
import { DoneEvent, TurnId, Usage } from "../../src/runtime/Domain.js"
import { TurnStream, TurnStreamId, TurnStreams } from "../../src/runtime/TurnStream.js"

const done = (n: number) =>
  new DoneEvent({
    turn_id: TurnId.make("c:1"),
    finish_reason: "stop",
    usage: new Usage({ prompt_tokens: 3, completion_tokens: n, prompt_tokens_details: { cached_tokens: 0 } })
  })

const readAll = (readable: NodeJS.ReadableStream) =>
  new Promise<string>((resolve, reject) => {
    let text = ""
    readable.on("data", (chunk: string | Buffer) => (text += String(chunk)))
    readable.on("end", () => resolve(text))
    readable.on("error", reject)
  })

const producer = () => {
  const calls = { drain: 0, cancel: 0 }
  return { calls, producer: { onDrain: () => void calls.drain++, onCancel: () => void calls.cancel++ } }
}

describe("TurnStream", () => {
  it("buffers before the consumer attaches, then frames SSE events with ids and a done", async () => {
    const stream = new TurnStream(TurnStreamId.make("s1"))
    stream.token("Hel")
    stream.token("lo\n\"x\"")
    const readable = stream.toSse({ keepAliveMs: 0 })
    stream.token("!")
    stream.done(done(3))
    const text = await readAll(readable)
    expect(text).toBe(
      ": accepted\n\n" +
        "event: token\nid: 0\ndata: {\"text\":\"Hel\"}\n\n" +
        "event: token\nid: 1\ndata: {\"text\":\"lo\\n\\\"x\\\"\"}\n\n" +
        "event: token\nid: 2\ndata: {\"text\":\"!\"}\n\n" +
        "event: done\nid: 3\ndata: {\"turn_id\":\"c:1\",\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":3,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n"
    )
    expect(stream.isClosed).toBe(true)
    expect(stream.token("late")).toBe(true) // ignored after the end
  })

  it("fail ends the stream with an error event and never a done", async () => {
    const stream = new TurnStream(TurnStreamId.make("s2"))
    const readable = stream.toSse({ keepAliveMs: 0 })
    stream.token("a")
    stream.fail("generation_failed", "EngineError: boom")
    stream.done(done(1))
    const text = await readAll(readable)
    expect(text).toContain("event: error\ndata: {\"error\":{\"code\":\"generation_failed\",\"message\":\"EngineError: boom\"}}")
    expect(text).not.toContain("event: done")
  })

  it("complete sends the part of the stored reply the reader lacks, then done; a no-op once ended", async () => {
    const stream = new TurnStream(TurnStreamId.make("s-complete"))
    const readable = stream.toSse({ keepAliveMs: 0 })
    stream.token("Hel")
    stream.complete("Hello there", done(2))
    stream.complete("Hello there", done(2))
    const text = await readAll(readable)
    expect(text).toBe(
      ": accepted\n\n" +
        "event: token\nid: 0\ndata: {\"text\":\"Hel\"}\n\n" +
        "event: token\nid: 1\ndata: {\"text\":\"lo there\"}\n\n" +
        "event: done\nid: 2\ndata: {\"turn_id\":\"c:1\",\"finish_reason\":\"stop\",\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":2,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n"
    )
    // Everything was read already: only done.
    const whole = new TurnStream(TurnStreamId.make("s-complete-2"))
    const readable2 = whole.toSse({ keepAliveMs: 0 })
    whole.token("Hi")
    whole.complete("Hi", done(1))
    expect(await readAll(readable2)).not.toContain("id: 1\ndata: {\"text\"")
    // A stream that began mid-turn (a resume) cannot tell what its reader lacks.
    const resumed = new TurnStream(TurnStreamId.make("s-complete-3"), () => {}, 64, 5)
    const readable3 = resumed.toSse({ keepAliveMs: 0 })
    resumed.complete("Hello", done(5))
    const text3 = await readAll(readable3)
    expect(text3).toContain("stream_incomplete")
    expect(text3).not.toContain("event: done")
  })

  it("reports a full reader and calls onDrain once it reads again", async () => {
    const stream = new TurnStream(TurnStreamId.make("s3"), undefined, 4)
    const { calls, producer: p } = producer()
    stream.setProducer(p)
    const readable = stream.toSse({ keepAliveMs: 0 })
    let accepted = 0
    while (stream.token("x".repeat(40))) accepted++
    expect(accepted).toBe(2) // the first comment and the 3rd unread event fill the 4-event buffer
    expect(calls.drain).toBe(0)
    readable.read()
    await new Promise((r) => setImmediate(r))
    expect(calls.drain).toBe(1)
    expect(calls.cancel).toBe(0)
  })

  it("a reader that goes away cancels the producer once, and only before the end", async () => {
    const registry = await Effect.runPromise(Effect.provide(TurnStreams, TurnStreams.layer))
    const stream = registry.make(64)
    const { calls, producer: p } = producer()
    stream.setProducer(p)
    expect(registry.get(stream.id)).toBe(stream)
    const readable = stream.toSse({ keepAliveMs: 0 })
    stream.token("a")
    readable.destroy()
    await new Promise((r) => setImmediate(r))
    expect(calls.cancel).toBe(1)
    stream.cancel()
    expect(calls.cancel).toBe(1)
    expect(registry.get(stream.id)).toBeUndefined()

    // After a normal end, destroying the readable cancels nothing.
    const other = registry.make(64)
    const o = producer()
    other.setProducer(o.producer)
    const r2 = other.toSse({ keepAliveMs: 0 })
    other.done(done(0))
    await readAll(r2)
    r2.destroy()
    expect(o.calls.cancel).toBe(0)
    expect(registry.size()).toBe(0)
  })

  it("with a detach grace, a reader that goes away leaves the turn running until the grace ends, or to its end once resumed", async () => {
    const left = new TurnStream(TurnStreamId.make("g1"), () => {}, 2, 0, 80)
    const a = producer()
    left.setProducer(a.producer)
    const readable = left.toSse({ keepAliveMs: 0 })
    readable.resume()
    left.token("a")
    readable.destroy()
    // Tokens go on (to the turn's log) without pausing for the reader that left.
    for (let i = 0; i < 10; i++) expect(left.token("b")).toBe(true)
    expect(a.calls.cancel).toBe(0)
    await new Promise((r) => setTimeout(r, 150))
    expect(a.calls.cancel).toBe(1)

    const registry = Effect.runSync(Effect.provide(TurnStreams, TurnStreams.layerFor("local", 80)))
    const kept = registry.make(2)
    kept.setTurnId("c:7")
    const b = producer()
    kept.setProducer(b.producer)
    const r2 = kept.toSse({ keepAliveMs: 0 })
    r2.resume()
    r2.destroy()
    registry.keepTurn("c:7")
    await new Promise((r) => setTimeout(r, 150))
    expect(b.calls.cancel).toBe(0)
    kept.done(done(1))
    expect(registry.size()).toBe(0)
  })

  it("a detached stream nothing writes to is kept only once a producer comes: else its grace ends it and the registry lets it go", async () => {
    const registry = Effect.runSync(Effect.provide(TurnStreams, TurnStreams.layerFor("local", 80)))
    // A resume's Attach whose answer came too late: detached, then the client's next resume.
    const orphan = registry.make(2)
    orphan.setTurnId("c:5")
    orphan.detach()
    registry.keepTurn("c:5")
    await new Promise((r) => setTimeout(r, 150))
    expect(registry.size()).toBe(0)
    // Its slot did attach after all: from then on it is kept.
    const late = registry.make(2)
    late.setTurnId("c:6")
    late.detach()
    registry.keepTurn("c:6")
    const p = producer()
    late.setProducer(p.producer)
    await new Promise((r) => setTimeout(r, 150))
    expect(p.calls.cancel).toBe(0)
    expect(registry.size()).toBe(1)
    late.done(done(0))
    expect(registry.size()).toBe(0)
  })

  it("a resume that comes before the old reader is known gone keeps the turn, and frees a producer that reader held back", async () => {
    const registry = Effect.runSync(Effect.provide(TurnStreams, TurnStreams.layerFor("local", 80)))
    const stream = registry.make(2)
    stream.setTurnId("c:9")
    const p = producer()
    stream.setProducer(p.producer)
    const readable = stream.toSse({ keepAliveMs: 0 })
    // A dead socket nobody reads: the reader fills and the producer is paused.
    stream.token("a")
    stream.token("b")
    expect(stream.token("c")).toBe(false)
    registry.keepTurn("c:9")
    expect(p.calls.drain).toBe(1)
    expect(stream.token("d")).toBe(true)
    // The old reader was ended (without a done); its socket then errors.
    const text = await readAll(readable)
    expect(text).not.toContain("event: done")
    readable.destroy()
    await new Promise((r) => setTimeout(r, 150))
    expect(p.calls.cancel).toBe(0)
    stream.done(done(4))
    expect(registry.size()).toBe(0)

    // Without a grace, keep does nothing: a disconnect still cancels at once.
    const plain = Effect.runSync(Effect.provide(TurnStreams, TurnStreams.layerFor("local", 0))).make(2)
    plain.setTurnId("c:10")
    const q = producer()
    plain.setProducer(q.producer)
    plain.keep()
    const r2 = plain.toSse({ keepAliveMs: 0 })
    r2.resume()
    r2.destroy()
    expect(q.calls.cancel).toBe(1)
  })

  it("a producer that arrives after the reader left is cancelled at once", () => {
    const stream = new TurnStream(TurnStreamId.make("s4"))
    stream.cancel()
    const { calls, producer: p } = producer()
    stream.setProducer(p)
    expect(calls.cancel).toBe(1)
  })

  it("cancelIfNotAttachedWithin cancels a stream nobody takes", async () => {
    const stream = new TurnStream(TurnStreamId.make("s5"))
    const { calls, producer: p } = producer()
    stream.setProducer(p)
    stream.cancelIfNotAttachedWithin(20)
    await new Promise((r) => setTimeout(r, 60))
    expect(calls.cancel).toBe(1)

    const taken = new TurnStream(TurnStreamId.make("s6"))
    const t = producer()
    taken.setProducer(t.producer)
    taken.cancelIfNotAttachedWithin(20)
    taken.toSse({ keepAliveMs: 0 })
    await new Promise((r) => setTimeout(r, 60))
    expect(t.calls.cancel).toBe(0)
    taken.done(done(0))
  })

  it.effect("toStream yields TokenEvents then the DoneEvent; an error fails it", () =>
    Effect.gen(function*() {
      const ok = new TurnStream(TurnStreamId.make("s7"))
      ok.token("a")
      ok.token("b")
      ok.done(done(2))
      const events = Chunk.toReadonlyArray(yield* Stream.runCollect(ok.toStream()))
      expect(events.map((e) => e._tag)).toEqual(["Token", "Token", "Done"])
      expect(events[1]).toMatchObject({ index: 1, text: "b" })

      const bad = new TurnStream(TurnStreamId.make("s8"))
      bad.token("a")
      bad.fail("generation_failed", "boom")
      const result = yield* Stream.runCollect(bad.toStream()).pipe(Effect.either)
      expect(Either.isLeft(result) && result.left._tag).toBe("GenerationFailed")
    }))
})
